"""FicMart payment gateway: domain, storage and HTTP API."""
