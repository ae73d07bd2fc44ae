"""Settings from environment variables, validated once at start-up (pydantic-settings).

env.py       how every process reads its variables: EnvSettings, ConfigError, --help epilogs
shared.py    the settings every gateway process shares (Settings), and parse/load of them
database.py  the database timeouts (DB_*_TIMEOUT_SECONDS), part of the shared settings
checks.py    the formats of the shared values: URLs, callers' and operators' keys, card keys

The names callers use are importable from here (`from gateway import config`, `config.Settings`).
The worker's and the mock bank's own settings are worker/settings.py and mockbank/config.py.
"""

from gateway.config.checks import MERCHANT_NAME, ops_key_bits, ops_name_problem
from gateway.config.database import DEFAULT_DB_TIMEOUTS, DbTimeouts
from gateway.config.env import ConfigError, EnvSettings, epilog, exit_on_error, nice_field, one_of
from gateway.config.shared import DEV_API_KEYS, PUBLISHED_CARD_KEYS, Settings, load, parse

__all__ = [
    "DEFAULT_DB_TIMEOUTS",
    "DEV_API_KEYS",
    "MERCHANT_NAME",
    "PUBLISHED_CARD_KEYS",
    "ConfigError",
    "DbTimeouts",
    "EnvSettings",
    "Settings",
    "epilog",
    "exit_on_error",
    "load",
    "nice_field",
    "one_of",
    "ops_key_bits",
    "ops_name_problem",
    "parse",
]
