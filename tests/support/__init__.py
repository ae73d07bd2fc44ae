"""Test-only helpers: request and payment factories, parked operations, a TCP proxy that cuts connections."""
