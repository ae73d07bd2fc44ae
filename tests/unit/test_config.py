"""Settings of every process (gateway.config, worker.settings, mockbank.config): defaults,
validation of every variable, a message naming it, exit code 2 on a bad value."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway import config
from gateway.api.admin import AdminSettings
from gateway.cards import SINGLE_KEY_ID, CardKey
from gateway.config import ConfigError, Settings
from mockbank.config import Config as BankConfig
from worker.settings import RelaySettings, WebhookSettings, WorkerSettings
from worker.sweeper import Housekeeping

VARIABLES = (
    "DATABASE_URL",
    "AMQP_URL",
    "BANK_URL",
    "GATEWAY_API_KEYS",
    "CARD_ENCRYPTION_KEY",
    "CARD_ENCRYPTION_KEYS",
    "LOG_LEVEL",
    "GATEWAY_ENV",
)
DEV = {"GATEWAY_ENV": "development"}
GOOD_KEY = base64.b64encode(b"k" * 32).decode()


@pytest.fixture
def clean_env(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ---------------------------------------------------------------- defaults
def test_defaults_are_the_documented_ones():
    # docs/api.md, "Processes and configuration".
    s = config.parse({})
    assert isinstance(s, Settings)
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/gateway"
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.bank_url == "http://127.0.0.1:8787"
    assert s.log_level == "info"
    assert s.card_key is None
    assert s.environment == "production" and not s.development
    assert s.api_keys == {"sk_test_ficmart_dev": "ficmart"}
    assert ("GATEWAY_API_KEYS", config.DEV_API_KEYS) in [(n, d) for n, d, _ in Settings.variables()]


def test_database_timeouts_default_and_parse():
    assert config.parse({}).db_timeouts == config.DbTimeouts(
        acquire=10.0, command=35.0, statement=30.0, lock=3.0, idle_in_transaction=60.0
    )
    env = {
        "DB_ACQUIRE_TIMEOUT_SECONDS": "2",
        "DB_COMMAND_TIMEOUT_SECONDS": "12",
        "DB_STATEMENT_TIMEOUT_SECONDS": "10",
        "DB_LOCK_TIMEOUT_SECONDS": "0.5",
        "DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS": "20",
    }
    assert config.parse(env).db_timeouts == config.DbTimeouts(
        acquire=2.0, command=12.0, statement=10.0, lock=0.5, idle_in_transaction=20.0
    )


def test_empty_values_fall_back_to_defaults():
    assert config.parse({name: "" for name in VARIABLES if not name.startswith("CARD_")}) == config.parse({})


def test_unrelated_variables_are_ignored():
    assert config.parse({"PATH": "/bin", "HOME": "/root", "FAILURE_RATE": "1"}) == config.parse({})


def test_settings_are_frozen():
    s = config.parse({})
    with pytest.raises(ValidationError, match="frozen"):
        s.bank_url = "http://elsewhere"  # type: ignore[misc]


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------- good values
@pytest.mark.parametrize(
    "value",
    [
        "postgresql://postgres@127.0.0.1:5432/gateway",
        "postgres://user:secret@db.example.com/gateway",
        "postgresql://u@localhost/g?sslmode=require",
        "postgresql://u@[::1]:5432/g",
        # a failover formation: libpq's multi-host URI, the primary found by asking
        "postgresql://gw:pw@db1:5441,db2:5442/gateway?target_session_attrs=read-write",
        "postgresql://gw@db1,db2,[::1]:5433/gateway?target_session_attrs=primary&sslmode=require",
    ],
)
def test_database_url_good(value):
    assert config.parse({"DATABASE_URL": value}).database_url == value


@pytest.mark.parametrize(
    "value",
    [
        "amqp://guest:guest@127.0.0.1:5672/",
        "amqp://guest:guest@rabbit:5672/vhost",
        "amqps://u:p@broker.example.com/%2Fprod",
        # a cluster: one URL per node
        "amqp://g:g@mq1:5672/gw,amqp://g:g@mq2:5673/gw,amqp://g:g@mq3:5674/gw",
    ],
)
def test_amqp_url_good(value):
    assert config.parse({"AMQP_URL": value}).amqp_url == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://127.0.0.1:8787", "http://127.0.0.1:8787"),
        ("http://127.0.0.1:8787/", "http://127.0.0.1:8787"),
        ("https://bank.example.com/", "https://bank.example.com"),
        ("https://bank.example.com/prefix//", "https://bank.example.com/prefix"),
        ("http://localhost", "http://localhost"),
    ],
)
def test_bank_url_good_and_trailing_slash_dropped(value, expected):
    assert config.parse({"BANK_URL": value}).bank_url == expected


@pytest.mark.parametrize("value", ["http://bank.example.com", "http://mockbank:8787", "http://10.0.0.7:8787"])
def test_a_plain_http_bank_off_this_machine_is_refused_outside_development(value):
    """Card numbers and CVVs go to the bank: never in clear over a network, unless asked for."""
    with pytest.raises(ConfigError) as info:
        config.parse({"BANK_URL": value})
    assert "BANK_URL must be https" in str(info.value) and "GATEWAY_ENV=development" in str(info.value)
    assert config.parse({"BANK_URL": value, "GATEWAY_ENV": "development"}).bank_url == value


@pytest.mark.parametrize(
    "value", ["http://127.0.0.1:8787", "http://127.8.9.10", "http://localhost:1", "http://[::1]:8787"]
)
def test_a_plain_http_bank_on_a_loopback_address_is_accepted(value):
    assert config.parse({"BANK_URL": value}).bank_url == value


@pytest.mark.parametrize("value", ["debug", "info", "warning", "error", "DEBUG", "Info", "WARNING"])
def test_log_level_good(value):
    assert config.parse({"LOG_LEVEL": value}).log_level == value.lower()


# ------------------------------------------------------------ bad values
BAD_VALUES = [
    # DATABASE_URL
    ("DATABASE_URL", "mysql://root@127.0.0.1/gateway"),
    ("DATABASE_URL", "http://127.0.0.1:5432/gateway"),
    ("DATABASE_URL", "postgresql://"),
    ("DATABASE_URL", "postgresql:///gateway"),
    ("DATABASE_URL", "127.0.0.1:5432/gateway"),
    ("DATABASE_URL", "not a url"),
    ("DATABASE_URL", "gateway"),
    # AMQP_URL
    ("AMQP_URL", "http://guest:guest@127.0.0.1:5672/"),
    ("AMQP_URL", "amqp://"),
    ("AMQP_URL", "amqp:///vhost"),
    ("AMQP_URL", "rabbit:5672"),
    ("AMQP_URL", "guest:guest@127.0.0.1:5672"),
    # BANK_URL
    ("BANK_URL", "ftp://127.0.0.1:8787"),
    ("BANK_URL", "127.0.0.1:8787"),
    ("BANK_URL", "http://"),
    ("BANK_URL", "http:///path"),
    ("BANK_URL", "localhost"),
    ("BANK_URL", "postgresql://127.0.0.1"),
    # LOG_LEVEL
    ("LOG_LEVEL", "verbose"),
    ("LOG_LEVEL", "critical"),
    ("LOG_LEVEL", "warn"),
    ("LOG_LEVEL", "trace"),
    ("LOG_LEVEL", " info"),
    ("LOG_LEVEL", "10"),
    # GATEWAY_API_KEYS
    ("GATEWAY_API_KEYS", "sk_test_ficmart_dev"),  # no name
    ("GATEWAY_API_KEYS", ":sk_test_ficmart_dev"),  # empty name
    ("GATEWAY_API_KEYS", "ficmart:"),  # empty key
    ("GATEWAY_API_KEYS", "ficmart:short"),  # key under 8 characters
    ("GATEWAY_API_KEYS", "ficmart:1234567"),  # 7 characters
    ("GATEWAY_API_KEYS", "ficmart:sk_test\nficmart"),  # control character
    ("GATEWAY_API_KEYS", "ficmart:sk_test\tficmart"),
    ("GATEWAY_API_KEYS", "ficmart:sk_test\x00ficmart"),
    ("GATEWAY_API_KEYS", "a:key_one_xx,"),  # trailing empty pair
    ("GATEWAY_API_KEYS", ",a:key_one_xx"),
    ("GATEWAY_API_KEYS", "a:key_one_xx,,b:key_two_xx"),
    ("GATEWAY_API_KEYS", "a:key_one_xx,b"),
    ("GATEWAY_API_KEYS", "a:same_key_x,b:same_key_x"),  # the same key for two callers
    ("GATEWAY_API_KEYS", "a:same_key_x,a:same_key_x"),
    ("GATEWAY_API_KEYS", " , "),
    # CARD_ENCRYPTION_KEY
    ("CARD_ENCRYPTION_KEY", "not base64!"),
    ("CARD_ENCRYPTION_KEY", "a"),
    ("CARD_ENCRYPTION_KEY", base64.b64encode(b"k" * 31).decode()),
    ("CARD_ENCRYPTION_KEY", base64.b64encode(b"k" * 33).decode()),
    ("CARD_ENCRYPTION_KEY", base64.b64encode(b"k" * 16).decode()),
    ("CARD_ENCRYPTION_KEY", base64.b64encode(b"k" * 64).decode()),
    ("CARD_ENCRYPTION_KEY", base64.urlsafe_b64encode(b"\xfb" * 32).decode()),  # urlsafe alphabet
    ("CARD_ENCRYPTION_KEY", GOOD_KEY.rstrip("=")),  # padding removed
    ("CARD_ENCRYPTION_KEY", GOOD_KEY + "\n" + "x"),
    ("CARD_ENCRYPTION_KEY", b"k".hex() * 32),  # hex, not base64: 64 chars
    # GATEWAY_POST_RATES
    ("GATEWAY_POST_RATES", "ficmart"),  # no rate
    ("GATEWAY_POST_RATES", "ficmart:0"),
    ("GATEWAY_POST_RATES", "ficmart:-5"),
    ("GATEWAY_POST_RATES", "ficmart:inf"),
    ("GATEWAY_POST_RATES", "ficmart:many"),
    ("GATEWAY_POST_RATES", "nobody:100"),  # not a caller of GATEWAY_API_KEYS
    # CARD_ENCRYPTION_KEYS
    ("CARD_ENCRYPTION_KEYS", GOOD_KEY),  # no id
    ("CARD_ENCRYPTION_KEYS", f":{GOOD_KEY}"),
    ("CARD_ENCRYPTION_KEYS", f"new key:{GOOD_KEY}"),  # a space in the id
    ("CARD_ENCRYPTION_KEYS", f"{'x' * 33}:{GOOD_KEY}"),
    ("CARD_ENCRYPTION_KEYS", "k1:" + base64.b64encode(b"k" * 31).decode()),
    ("CARD_ENCRYPTION_KEYS", f"k1:{GOOD_KEY},"),
    ("CARD_ENCRYPTION_KEYS", f"k1:{GOOD_KEY},k1:" + base64.b64encode(b"j" * 32).decode()),  # one id twice
    ("CARD_ENCRYPTION_KEYS", f"k1:{GOOD_KEY},k2:{GOOD_KEY}"),  # one key twice
    # database timeouts: positive, finite, and lock < statement < command
    ("DB_ACQUIRE_TIMEOUT_SECONDS", "0"),
    ("DB_ACQUIRE_TIMEOUT_SECONDS", "inf"),
    ("DB_COMMAND_TIMEOUT_SECONDS", "-1"),
    ("DB_COMMAND_TIMEOUT_SECONDS", "30"),  # not above the statement timeout: the client would cancel first
    ("DB_STATEMENT_TIMEOUT_SECONDS", "nan"),
    ("DB_STATEMENT_TIMEOUT_SECONDS", "2"),  # below the lock timeout
    ("DB_LOCK_TIMEOUT_SECONDS", "ten"),
    ("DB_LOCK_TIMEOUT_SECONDS", "30"),
    ("DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", "0"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
@pytest.mark.parametrize("uses_card_key", [None, False, True], ids=["unchecked", "no-card-key", "card-key"])
def test_bad_value_raises_config_error_naming_the_variable(name, value, uses_card_key):
    env = {name: value, **DEV}
    if uses_card_key and not name.startswith("CARD_ENCRYPTION_KEY"):
        env["CARD_ENCRYPTION_KEY"] = GOOD_KEY
    with pytest.raises(ConfigError) as info:
        config.parse(env, uses_card_key=uses_card_key)
    assert name in str(info.value)


# Values a URL parser accepts but no client can use: the process must stop
# at start with a ConfigError naming the variable, not fail later (or with
# a bare ValueError that load() does not turn into exit code 2).
BAD_URL_VALUES = [
    ("DATABASE_URL", "postgresql://[::1/gateway"),  # unbalanced IPv6 bracket
    ("DATABASE_URL", "postgresql://u@127.0.0.1:notaport/gateway"),
    ("DATABASE_URL", "postgresql://u@127.0.0.1:99999/gateway"),
    ("DATABASE_URL", "postgresql://u@db1:5441,db2:99999/gateway?target_session_attrs=read-write"),
    ("DATABASE_URL", "postgresql://u@db1:5441,/gateway?target_session_attrs=read-write"),  # an empty host
    # several hosts and no way to tell the primary: a process could land on a standby
    ("DATABASE_URL", "postgresql://u@db1:5441,db2:5442/gateway"),
    ("DATABASE_URL", "postgresql://u@db1:5441,db2:5442/gateway?target_session_attrs=any"),
    ("DATABASE_URL", "postgresql://u@db1/gateway?target_session_attrs=standby"),  # the gateway writes
    ("AMQP_URL", "amqp://g:g@mq1:5672/,http://mq2:5672/"),  # the second node is no AMQP URL
    ("AMQP_URL", "amqp://g:g@mq1:5672/,"),  # an empty node
    ("AMQP_URL", "amqp://guest:guest@[::1:5672/"),
    ("AMQP_URL", "amqp://guest:guest@127.0.0.1:port/"),
    ("AMQP_URL", "amqp://guest:guest@127.0.0.1:65536/"),
    ("BANK_URL", "http://[::1"),
    ("BANK_URL", "http://127.0.0.1:notaport"),
    ("BANK_URL", "http://127.0.0.1:99999"),
]


def test_post_rates_are_read_per_caller():
    settings = config.parse({"GATEWAY_POST_RATES": " ficmart: 2.5 ", **DEV})
    assert settings.post_rates == {"ficmart": 2.5}
    assert config.parse(DEV).post_rates == {}


@pytest.mark.parametrize(("name", "value"), BAD_URL_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_URL_VALUES])
def test_unusable_url_raises_config_error_naming_the_variable(name, value):
    with pytest.raises(ConfigError) as info:
        config.parse({name: value})
    assert name in str(info.value)


def test_bad_url_message_shows_the_value():
    with pytest.raises(ConfigError, match="BANK_URL.*ftp://x"):
        config.parse({"BANK_URL": "ftp://x"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "postgresql://gateway:s3cretpw@db:notaport/gateway"),
        ("DATABASE_URL", "mysql://gateway:s3cretpw@db/gateway"),
        ("DATABASE_URL", "postgresql://db:bad/gateway?sslmode=require&password=s3cretpw"),
        ("DATABASE_URL", "gateway:s3cretpw@db/gateway"),  # no scheme
        ("AMQP_URL", "amqp://gateway:s3c/ret@pw@rabbit:99999/"),
        ("BANK_URL", "http://user:s3cretpw@bank.example.com"),
    ],
)
def test_url_errors_never_show_a_password(name, value):
    with pytest.raises(ConfigError) as info:
        config.parse({name: value})
    assert name in str(info.value) and "s3c" not in str(info.value)


def test_log_level_message_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        config.parse({"LOG_LEVEL": "verbose"})
    for level in ("debug", "info", "warning", "error", "verbose"):
        assert level in str(info.value)


def test_api_keys_error_does_not_print_the_key():
    secret = "ficmart:sk_live_\nsecretvalue"
    with pytest.raises(ConfigError) as info:
        config.parse({"GATEWAY_API_KEYS": secret})
    assert "secretvalue" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        config.parse({"GATEWAY_API_KEYS": "a:sk_live_dup_secret,b:sk_live_dup_secret"})
    assert "sk_live_dup_secret" not in str(info.value)


# ------------------------------------------------------ GATEWAY_API_KEYS
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ficmart:sk_test_ficmart_dev", {"sk_test_ficmart_dev": "ficmart"}),
        ("ficmart:12345678", {"12345678": "ficmart"}),  # exactly 8 characters
        ("a:key_one_xx,b:key_two_xx", {"key_one_xx": "a", "key_two_xx": "b"}),
        ("a:key_one_xx, b:key_two_xx", {"key_one_xx": "a", "key_two_xx": "b"}),
        (" a:key_one_xx ,b:key_two_xx ", {"key_one_xx": "a", "key_two_xx": "b"}),
        # one caller with two keys (rotation): both map to the caller
        ("ficmart:old_key_123,ficmart:new_key_456", {"old_key_123": "ficmart", "new_key_456": "ficmart"}),
        # only the first colon separates name from key
        ("ops:sk:with:colons", {"sk:with:colons": "ops"}),
        ("order-service:Abc!@#$%^&*()_+=", {"Abc!@#$%^&*()_+=": "order-service"}),
    ],
)
def test_api_keys_parsing(value, expected):
    assert config.parse({"GATEWAY_API_KEYS": value}).api_keys == expected


def test_api_keys_many_callers():
    value = ",".join(f"caller{i}:key_{i:08d}" for i in range(50))
    keys = config.parse({"GATEWAY_API_KEYS": value}).api_keys
    assert len(keys) == 50
    assert keys["key_00000007"] == "caller7"


@pytest.mark.parametrize(
    "name",
    [
        "ficmart shop",  # a space split the long polls' wake-up (500 on its long polls)
        "ficmart\x1fshop",  # the separator of (merchant, idempotency key)
        "FicMart",  # one caller in two spellings would be two
        "ficmart.eu",  # payments.events.<name> must stay one level
        "-ficmart",  # not an option to a command line
        "_ficmart",
        "fic/mart",
        "ficmärt",
        "x" * 65,
    ],
)
def test_api_keys_caller_names_are_refused_unless_safe(name):
    with pytest.raises(ConfigError) as info:
        config.parse({"GATEWAY_API_KEYS": f"ok:key_one_xx,{name}:sk_live_secret_1"})
    assert "GATEWAY_API_KEYS" in str(info.value) and "pair 2" in str(info.value)
    assert "sk_live_secret_1" not in str(info.value)


@pytest.mark.parametrize("name", ["ficmart", "order-service", "shop_2", "7eleven", "x" * 64])
def test_api_keys_caller_names_of_the_safe_charset(name):
    assert config.parse({"GATEWAY_API_KEYS": f"{name}:sk_live_secret_1"}).api_keys == {"sk_live_secret_1": name}


# --------------------------------------------------- CARD_ENCRYPTION_KEY
def test_card_key_decoded():
    raw = os.urandom(32)
    assert config.parse({"CARD_ENCRYPTION_KEY": base64.b64encode(raw).decode()}).card_key == raw


def test_card_key_optional_in_development_unless_used():
    assert config.parse(DEV, uses_card_key=False).card_key is None
    assert config.parse({"CARD_ENCRYPTION_KEY": "", **DEV}, uses_card_key=False).card_key is None


@pytest.mark.parametrize("env", [{}, {"CARD_ENCRYPTION_KEY": ""}], ids=["unset", "empty"])
def test_card_key_required(env):
    with pytest.raises(ConfigError, match="CARD_ENCRYPTION_KEY"):
        config.parse({**env, **DEV}, uses_card_key=True)


def test_card_key_checked_even_when_not_needed():
    with pytest.raises(ConfigError, match="CARD_ENCRYPTION_KEY"):
        config.parse({"CARD_ENCRYPTION_KEY": "nope"})


def test_card_key_length_in_message():
    with pytest.raises(ConfigError, match="32 bytes.*16"):
        config.parse({"CARD_ENCRYPTION_KEY": base64.b64encode(b"x" * 16).decode()})


def test_card_key_error_does_not_echo_the_value():
    value = base64.b64encode(b"secret-key-material-31-bytes!!!").decode()
    with pytest.raises(ConfigError) as info:
        config.parse({"CARD_ENCRYPTION_KEY": value})
    assert value not in str(info.value)


# --------------------------------------------------- CARD_ENCRYPTION_KEYS (rotation)
def test_card_keys_are_id_key_pairs_newest_first():
    new, old = os.urandom(32), os.urandom(32)
    value = f" 2026-12:{base64.b64encode(new).decode()} , 2026-06:{base64.b64encode(old).decode()}"
    s = config.parse({"CARD_ENCRYPTION_KEYS": value})
    assert s.card_keyring == (CardKey("2026-12", new), CardKey("2026-06", old))


def test_a_single_card_key_is_the_key_named_default():
    raw = os.urandom(32)
    s = config.parse({"CARD_ENCRYPTION_KEY": base64.b64encode(raw).decode()})
    assert s.card_keyring == (CardKey(SINGLE_KEY_ID, raw),) and SINGLE_KEY_ID == "default"
    assert config.parse({}).card_keyring == ()


def test_card_keys_and_a_single_card_key_are_not_both_taken():
    env = {"CARD_ENCRYPTION_KEY": GOOD_KEY, "CARD_ENCRYPTION_KEYS": f"new:{PRODUCTION_KEY}"}
    with pytest.raises(ConfigError, match="CARD_ENCRYPTION_KEYS or CARD_ENCRYPTION_KEY, not both"):
        config.parse(env)


def test_card_keys_satisfy_the_card_key_requirement():
    env = {"GATEWAY_API_KEYS": "shop:live_key_1", "CARD_ENCRYPTION_KEYS": f"new:{PRODUCTION_KEY}"}
    assert config.parse(env, uses_card_key=True).card_keyring[0].id == "new"


@pytest.mark.parametrize("published", sorted(config.PUBLISHED_CARD_KEYS))
def test_production_refuses_a_published_key_among_the_card_keys(published):
    keys = f"new:{PRODUCTION_KEY},old:{base64.b64encode(published).decode()}"
    env = {"GATEWAY_API_KEYS": "shop:live_key_1", "CARD_ENCRYPTION_KEYS": keys}
    with pytest.raises(ConfigError, match="CARD_ENCRYPTION_KEYS \\(key 'old'\\) is a published development key"):
        config.parse(env, uses_card_key=False)
    assert len(config.parse({**env, **DEV}, uses_card_key=True).card_keyring) == 2


def test_card_keys_errors_do_not_echo_keys_or_ids():
    backwards = f"{base64.b64encode(b'secretsecretsecretsecretsecretse').decode()}:k1"
    with pytest.raises(ConfigError) as info:
        config.parse({"CARD_ENCRYPTION_KEYS": backwards})
    assert "c2VjcmV0" not in str(info.value) and "pair 1" in str(info.value)


# ------------------------------------------------------------------ load()
def test_load_reads_os_environ(clean_env):
    clean_env.setenv("BANK_URL", "https://bank.internal:9000/")
    clean_env.setenv("LOG_LEVEL", "DEBUG")
    clean_env.setenv("GATEWAY_API_KEYS", "shop:shop_key_1")
    clean_env.setenv("CARD_ENCRYPTION_KEY", base64.b64encode(b"q" * 32).decode())
    s = config.load(uses_card_key=True)
    assert s.bank_url == "https://bank.internal:9000"
    assert s.log_level == "debug"
    assert s.api_keys == {"shop_key_1": "shop"}
    assert s.card_key == b"q" * 32


def test_load_defaults_in_development(clean_env):
    clean_env.setenv("GATEWAY_ENV", "development")
    assert config.load(uses_card_key=False) == config.parse(DEV)


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_load_exits_2_with_message_on_stderr(clean_env, capsys, name, value):
    clean_env.setenv(name, value.replace("\x00", "\x01"))  # the OS environment cannot hold NUL
    clean_env.setenv("GATEWAY_ENV", "development")
    with pytest.raises(SystemExit) as info:
        config.load(uses_card_key=False)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert name in err
    assert err.startswith("configuration error:")
    assert "Traceback" not in err


@pytest.mark.parametrize(("name", "value"), BAD_URL_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_URL_VALUES])
def test_load_exits_2_on_unusable_url(clean_env, capsys, name, value):
    clean_env.setenv(name, value)
    clean_env.setenv("GATEWAY_ENV", "development")
    with pytest.raises(SystemExit) as info:
        config.load(uses_card_key=False)
    assert info.value.code == 2
    assert name in capsys.readouterr().err


def test_load_exits_2_when_card_key_required_and_missing(clean_env, capsys):
    clean_env.setenv("GATEWAY_ENV", "development")
    with pytest.raises(SystemExit) as info:
        config.load(uses_card_key=True)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "CARD_ENCRYPTION_KEY" in err and "required" in err


def test_load_exit_has_no_chained_exception(clean_env):
    clean_env.setenv("LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as info:
        config.load(uses_card_key=False)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ is True


def test_only_the_documented_names_are_read(clean_env):
    # The fields are settable by their Python names in code, never from the environment.
    clean_env.setenv("bank_url", "http://elsewhere:1")
    clean_env.setenv("log_level", "debug")
    clean_env.setenv("GATEWAY_ENV", "development")
    assert config.load(uses_card_key=False) == config.parse(DEV)


# ------------------------------------------------- fail closed (production is the default)
PRODUCTION_KEY = base64.b64encode(b"\x07" * 32).decode()


@pytest.mark.parametrize("uses_card_key", [False, True], ids=["relay", "api-and-worker"])
def test_production_requires_api_keys_and_card_key(uses_card_key):
    with pytest.raises(ConfigError) as info:
        config.parse({}, uses_card_key=uses_card_key)
    assert "GATEWAY_API_KEYS is required" in str(info.value)
    assert "CARD_ENCRYPTION_KEY is required" in str(info.value)


@pytest.mark.parametrize(
    "api_keys", ["ficmart:sk_test_ficmart_dev", "shop:sk_test_anything_else", "a:live_key_1,b:sk_test_key_2"]
)
def test_production_refuses_development_api_keys(api_keys):
    with pytest.raises(ConfigError, match="GATEWAY_API_KEYS holds a development key") as info:
        config.parse({"GATEWAY_API_KEYS": api_keys, "CARD_ENCRYPTION_KEY": PRODUCTION_KEY}, uses_card_key=True)
    assert "sk_test_ficmart_dev" not in str(info.value)  # the message never echoes a key


@pytest.mark.parametrize("published", sorted(config.PUBLISHED_CARD_KEYS))
def test_production_refuses_published_card_keys(published):
    env = {"GATEWAY_API_KEYS": "shop:live_key_1", "CARD_ENCRYPTION_KEY": base64.b64encode(published).decode()}
    with pytest.raises(ConfigError, match="CARD_ENCRYPTION_KEY is a published development key"):
        config.parse(env, uses_card_key=True)
    assert config.parse({**env, **DEV}, uses_card_key=True).card_key == published


def test_compose_no_longer_publishes_a_card_key():
    # compose.yaml's old default stays refused; the file itself must not carry a key any more.
    compose = (Path(__file__).parents[2] / "compose.yaml").read_text()
    assert "ZGV2LW9ubHktY2FyZC1rZXktTk9ULUZPUi1QUk9EISE=" not in compose
    assert "sk_test_ficmart_dev}" not in compose


def test_production_takes_real_secrets():
    env = {"GATEWAY_API_KEYS": "shop:live_key_1", "CARD_ENCRYPTION_KEY": PRODUCTION_KEY}
    s = config.parse(env, uses_card_key=True)
    assert s.api_keys == {"live_key_1": "shop"} and not s.development


def test_development_mode_takes_the_documented_key_by_default():
    s = config.parse({**DEV, "CARD_ENCRYPTION_KEY": GOOD_KEY}, uses_card_key=True)
    assert s.api_keys == {"sk_test_ficmart_dev": "ficmart"} and s.development
    # a relay in development needs no card key; in production it refuses to start without one
    assert config.parse(DEV, uses_card_key=False).card_key is None


def test_parse_reads_only_the_given_mapping(clean_env):
    clean_env.setenv("GATEWAY_ENV", "development")
    clean_env.setenv("LOG_LEVEL", "debug")
    s = config.parse({})
    assert s.environment == "production" and s.log_level == "info"


@pytest.mark.parametrize("script", ["gateway-api", "gateway-worker", "gateway-relay"])
@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "GATEWAY_API_KEYS"),
        ({"GATEWAY_API_KEYS": "shop:live_key_1"}, "CARD_ENCRYPTION_KEY"),
        (
            {"GATEWAY_API_KEYS": "ficmart:sk_test_ficmart_dev", "CARD_ENCRYPTION_KEY": PRODUCTION_KEY},
            "GATEWAY_API_KEYS",
        ),
        (
            {"GATEWAY_API_KEYS": "shop:live_key_1", "CARD_ENCRYPTION_KEY": base64.b64encode(b"k" * 32).decode()},
            "CARD_ENCRYPTION_KEY",
        ),
    ],
    ids=["nothing", "no-card-key", "dev-api-key", "published-card-key"],
)
def test_processes_refuse_to_start_without_their_secrets(script, env, variable):
    # The real console scripts, started as an operator would, outside development mode: they
    # exit at once (before connecting anywhere: the addresses lead nowhere) naming the variable.
    unreachable = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none", "AMQP_URL": "amqp://x:y@127.0.0.1:9/"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / script)],
        env={"PATH": os.environ.get("PATH", ""), **unreachable, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("configuration error:") and variable in result.stderr


def test_the_api_admin_port_defaults_to_9100_and_0_turns_it_off():
    assert AdminSettings.parse({}).port == 9100
    assert AdminSettings.parse({"API_ADMIN_PORT": "0"}).port == 0


@pytest.mark.parametrize("value", ["-1", "65536", "x", "9100.5"])
def test_a_bad_api_admin_port_is_refused_naming_it(value):
    with pytest.raises(ConfigError, match="API_ADMIN_PORT"):
        AdminSettings.parse({"API_ADMIN_PORT": value})


def test_gateway_api_refuses_admin_ports_past_65535_for_its_processes():
    env = {"PATH": os.environ.get("PATH", ""), **DEV, "CARD_ENCRYPTION_KEY": GOOD_KEY, "API_ADMIN_PORT": "65535"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "gateway-api"), "--workers", "2", "--port", "8080"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "API_ADMIN_PORT 65535" in result.stderr, result.stderr


# ---------------------------------------- worker, relay and mock bank settings
WORKER_DEFAULTS = {
    "metrics_port": 9101,
    "bank_timeout": 20.0,
    "prefetch": 1000,
    "concurrency": 1000,
    "db_pool_size": 20,
    "retry_ladder": (1, 5, 30, 120, 600),
    "nice": 10,
    "quick_retries": 3,
    "quick_retry_base": 0.5,
    "lease_margin": 10.0,
    "confirm_delay": 1.0,
    "authorize_key_max_age_hours": 23.0,
    "outage_hold": 300.0,
    "db_backoff_max": 30.0,
    "breaker_window": 10.0,
    "breaker_min_operations": 20,
    "breaker_failure_ratio": 0.5,
    "breaker_unreachable_operations": 5,
    "breaker_probe_interval": 1.0,
    "breaker_trial_calls": 3,
    "sweep_interval": 15.0,
    "stuck_after": 60.0,
    "sweep_batch": 500,
    "reconcile_interval": 3600.0,
    "reconcile_rate": 5.0,
    "reconcile_limit": 500,
    "max_deliveries": 20,
    "key_retention_hours": 48.0,
    "event_retention_days": 30.0,
    "prune_batch": 500,
    "abandon_after_hours": 24.0,
}


def test_worker_and_relay_defaults():
    assert WorkerSettings.parse({}).model_dump() == WORKER_DEFAULTS
    assert WorkerSettings.parse({}).lease_seconds == 30.0
    relay = RelaySettings.parse({})
    assert (relay.batch_size, relay.poll_seconds) == (200, 1.0)
    assert relay.metrics_port == 9102
    assert relay.retry_ladder == WORKER_DEFAULTS["retry_ladder"]
    assert relay.nice == 10


def test_worker_values_are_typed():
    cfg = WorkerSettings.parse(
        {"WORKER_RETRY_LADDER": " 1, 2,4 ", "WORKER_PREFETCH": "7", "BANK_TIMEOUT_SECONDS": "2.5", "PATH": "/bin"}
    )
    assert cfg.retry_ladder == (1, 2, 4) and cfg.prefetch == 7 and cfg.bank_timeout == 2.5
    assert cfg.lease_seconds == 12.5
    assert WorkerSettings.parse({"RECONCILE_INTERVAL_SECONDS": "0", "WORKER_CONFIRM_DELAY_SECONDS": "0"}) is not None


def test_every_worker_variable_is_documented_with_its_default():
    epilog = config.epilog(WorkerSettings)
    for name, default, what in WorkerSettings.variables():
        assert f"{name} ({default}): {what}" in epilog and what
    assert "WORKER_RETRY_LADDER (1,5,30,120,600)" in epilog and "BANK_TIMEOUT_SECONDS (20)" in epilog


def _names(model) -> list[str]:
    return [name for name, _, _ in model.variables()]


# Every variable of the worker, the relay and the mock bank with values it must refuse.
NUMBER_RULES = {
    # name: (integer?, bad values)
    "BANK_TIMEOUT_SECONDS": (False, ["0", "-1", "x", "nan", "inf"]),
    "WORKER_PREFETCH": (True, ["0", "1.5", "x", "-3"]),
    "WORKER_CONCURRENCY": (True, ["0", "2.5", "many"]),
    "WORKER_DB_POOL_SIZE": (True, ["1", "0", "x"]),
    "WORKER_QUICK_RETRIES": (True, ["0", "x"]),
    "WORKER_QUICK_RETRY_BASE_SECONDS": (False, ["-0.1", "x", "inf"]),
    "WORKER_LEASE_MARGIN_SECONDS": (False, ["0", "x"]),
    "WORKER_CONFIRM_DELAY_SECONDS": (False, ["-1", "x", "nan"]),
    "WORKER_AUTHORIZE_KEY_MAX_AGE_HOURS": (False, ["0", "x"]),
    "WORKER_OUTAGE_HOLD_SECONDS": (False, ["0", "x", "inf"]),
    "WORKER_DB_BACKOFF_MAX_SECONDS": (False, ["0", "x"]),
    "BREAKER_WINDOW_SECONDS": (False, ["0", "x"]),
    "BREAKER_MIN_OPERATIONS": (True, ["0", "x", "1.5"]),
    "BREAKER_FAILURE_RATIO": (False, ["0", "1.5", "x", "nan"]),
    "BREAKER_UNREACHABLE_OPERATIONS": (True, ["0", "x"]),
    "BREAKER_PROBE_SECONDS": (False, ["0", "x"]),
    "BREAKER_TRIAL_CALLS": (True, ["0", "x"]),
    "SWEEPER_INTERVAL_SECONDS": (False, ["0", "x"]),
    "SWEEPER_STUCK_AFTER_SECONDS": (False, ["0", "x"]),
    "SWEEPER_BATCH_SIZE": (True, ["0", "x"]),
    "RECONCILE_INTERVAL_SECONDS": (False, ["-1", "x"]),
    "RECONCILE_RATE": (False, ["0", "x"]),
    "RECONCILE_LIMIT": (True, ["0", "x"]),
    # docs/api.md promises keys for at least 24 hours.
    "IDEMPOTENCY_KEY_RETENTION_HOURS": (False, ["23.9", "0", "two days", "inf"]),
    "IDEMPOTENCY_PRUNE_BATCH_SIZE": (True, ["0", "1.5", "x"]),
    # gateway-api.md: the events feed keeps events 30 days.
    "EVENT_RETENTION_DAYS": (False, ["29.9", "0", "x", "inf"]),
    "WEBHOOK_CONCURRENCY": (True, ["0", "x", "1.5"]),
    "WEBHOOK_ENDPOINT_CONCURRENCY": (True, ["0", "-2", "x"]),
    "WEBHOOK_RETRY_BASE_SECONDS": (False, ["0", "x", "inf"]),
    "WEBHOOK_RETRY_MAX_SECONDS": (False, ["0", "-1", "x"]),
    "WEBHOOK_RETRY_WINDOW_HOURS": (False, ["0", "-1", "nan"]),
    "WEBHOOK_POLL_SECONDS": (False, ["0", "x"]),
    "WEBHOOK_METRICS_PORT": (True, ["-1", "65536", "x"]),
    "ABANDON_AFTER_HOURS": (False, ["0", "-1", "nan"]),
    "WORKER_MAX_DELIVERIES": (True, ["1", "0", "x", "2.5"]),
    "RELAY_BATCH_SIZE": (True, ["0", "x", "2.5"]),
    "RELAY_POLL_SECONDS": (False, ["0", "-1", "x"]),
    "PIPELINE_NICE": (True, ["-1", "20", "x", "2.5"]),
    "WORKER_METRICS_PORT": (True, ["-1", "65536", "x", "9101.5"]),
    "RELAY_METRICS_PORT": (True, ["-1", "70000", "port"]),
    "MIN_LATENCY_MS": (False, ["-1", "fast", "nan"]),
    "MAX_LATENCY_MS": (False, ["-1", "slow", "inf"]),
    "FAILURE_RATE": (False, ["1.5", "-0.1", "often", "nan"]),
    "RESPONSE_LOSS_RATE": (False, ["1.01", "-0.1", "x"]),
    "KEY_FORGET_RATE": (False, ["2", "-0.1", "x", "nan"]),
    "KEY_LOOKUP_FAILURE_RATE": (False, ["1.5", "-1", "x"]),
    "RESPONSE_CUTOFF_SECONDS": (False, ["0", "-1", "x", "inf"]),
    "DB_TRANSACTION_MS": (False, ["-1", "x", "nan"]),
    "DB_POOL_SIZE": (True, ["0", "1.5", "x", "10001"]),
    "AUTH_EXPIRY_HOURS": (False, ["0", "-1", "nan", "x"]),
    "MOCKBANK_EXTRA_ACCOUNTS": (True, ["-1", "1.5", "x", "1000001"]),
    "MOCKBANK_NICE": (True, ["-1", "20", "x", "0.5"]),
}
MODELS = {
    name: model for model in (WorkerSettings, RelaySettings, WebhookSettings, BankConfig) for name in _names(model)
}
BAD_NUMBERS = [(name, value) for name, (_, values) in NUMBER_RULES.items() for value in values]


def test_every_number_variable_has_bad_values_listed():
    numbers = {name for name in MODELS if name not in ("WORKER_RETRY_LADDER", "LOG_LEVEL")}
    assert numbers == set(NUMBER_RULES)


@pytest.mark.parametrize(("name", "value"), BAD_NUMBERS, ids=[f"{n}={v}" for n, v in BAD_NUMBERS])
def test_bad_number_raises_config_error_naming_the_variable_and_value(name, value):
    with pytest.raises(ConfigError) as info:
        MODELS[name].parse({name: value})
    message = str(info.value)
    assert message.startswith(name) and repr(value) in message


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("WORKER_PREFETCH", "x", "WORKER_PREFETCH must be an integer, got 'x'"),
        ("WORKER_PREFETCH", "0", "WORKER_PREFETCH must be >= 1, got '0'"),
        ("WORKER_DB_POOL_SIZE", "1", "WORKER_DB_POOL_SIZE must be >= 2, got '1'"),
        ("BANK_TIMEOUT_SECONDS", "0", "BANK_TIMEOUT_SECONDS must be > 0, got '0'"),
        ("BANK_TIMEOUT_SECONDS", "soon", "BANK_TIMEOUT_SECONDS must be a number, got 'soon'"),
        ("BREAKER_FAILURE_RATIO", "2", "BREAKER_FAILURE_RATIO must be <= 1, got '2'"),
        ("AUTH_EXPIRY_HOURS", "nan", "AUTH_EXPIRY_HOURS must be a finite number, got 'nan'"),
    ],
)
def test_number_messages(name, value, expected):
    with pytest.raises(ConfigError, match=f"^{expected}$"):
        MODELS[name].parse({name: value})


@pytest.mark.parametrize("value", ["5,1", "1,1", "0,5", "", "a,b", "1;5", "-1", "1,,x"])
def test_bad_retry_ladder(value):
    if not value:  # empty counts as unset
        assert WorkerSettings.parse({"WORKER_RETRY_LADDER": value}).retry_ladder == WORKER_DEFAULTS["retry_ladder"]
        return
    for model in (WorkerSettings, RelaySettings):
        with pytest.raises(ConfigError, match="WORKER_RETRY_LADDER"):
            model.parse({"WORKER_RETRY_LADDER": value})


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        WorkerSettings.parse({"WORKER_PREFETCH": "0", "WORKER_RETRY_LADDER": "3,2"})
    assert "WORKER_PREFETCH" in str(info.value) and "WORKER_RETRY_LADDER" in str(info.value)


def test_mockbank_defaults_and_latency_order():
    bank = BankConfig.parse({})
    assert bank.chaos.as_dict() == {
        "min_latency_ms": 100.0,
        "max_latency_ms": 2000.0,
        "failure_rate": 0.05,
        "response_loss_rate": 0.0,
        "key_forget_rate": 0.0,
        "key_lookup_failure_rate": 0.0,
        "down": False,
    }
    assert (bank.auth_expiry_hours, bank.extra_accounts, bank.log_level) == (168.0, 0, "info")
    assert (bank.response_cutoff_seconds, bank.db_transaction_ms, bank.db_pool_size) == (15.0, 0.0, 25)
    assert BankConfig.parse({"LOG_LEVEL": "CRITICAL"}).log_level == "critical"
    with pytest.raises(ConfigError, match="MAX_LATENCY_MS.*MIN_LATENCY_MS"):
        BankConfig.parse({"MIN_LATENCY_MS": "500", "MAX_LATENCY_MS": "100"})
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        BankConfig.parse({"LOG_LEVEL": "chatty"})


@pytest.mark.parametrize("model", [WorkerSettings, RelaySettings, BankConfig])
def test_load_of_every_process_exits_2_naming_the_variable(clean_env, capsys, model):
    name = next(n for n in _names(model) if n in NUMBER_RULES)
    clean_env.setenv(name, "not-a-number")
    with pytest.raises(SystemExit) as info:
        model.load()
    assert info.value.code == 2 and info.value.__cause__ is None
    err = capsys.readouterr().err
    assert err.startswith("configuration error:") and name in err and "Traceback" not in err


def test_load_reads_the_environment_and_empty_is_unset(clean_env):
    clean_env.setenv("WORKER_PREFETCH", "17")
    clean_env.setenv("WORKER_CONCURRENCY", "")
    cfg = WorkerSettings.load()
    assert cfg.prefetch == 17 and cfg.concurrency == 1000


def test_housekeeping_values_reach_the_sweeper():
    assert Housekeeping.of(WorkerSettings.parse({})) == Housekeeping()
    assert Housekeeping() == Housekeeping(timedelta(hours=24), timedelta(hours=48), 500)
    cfg = WorkerSettings.parse(
        {"IDEMPOTENCY_KEY_RETENTION_HOURS": "24", "IDEMPOTENCY_PRUNE_BATCH_SIZE": "50", "ABANDON_AFTER_HOURS": "0.5"}
    )
    assert Housekeeping.of(cfg) == Housekeeping(timedelta(minutes=30), timedelta(hours=24), 50)
