"""gateway.config: defaults, validation of every variable, exit code 2 on a bad value."""

from __future__ import annotations

import base64
import os

import pytest

from gateway import config
from gateway.config import ConfigError, Settings

VARIABLES = ("DATABASE_URL", "AMQP_URL", "BANK_URL", "GATEWAY_API_KEYS", "CARD_ENCRYPTION_KEY", "LOG_LEVEL")
GOOD_KEY = base64.b64encode(b"k" * 32).decode()


@pytest.fixture
def clean_env(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ---------------------------------------------------------------- defaults
def test_defaults_are_the_documented_ones():
    # gateway-api.md, "Processes and configuration".
    s = config.parse({})
    assert isinstance(s, Settings)
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/gateway"
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.bank_url == "http://127.0.0.1:8787"
    assert s.log_level == "info"
    assert s.card_key is None
    assert s.api_keys == {"sk_test_ficmart_dev": "ficmart"}
    assert config.DEFAULTS["GATEWAY_API_KEYS"] == config.DEV_API_KEYS


def test_empty_values_fall_back_to_defaults():
    assert config.parse({name: "" for name in VARIABLES if name != "CARD_ENCRYPTION_KEY"}) == config.parse({})


def test_unrelated_variables_are_ignored():
    assert config.parse({"PATH": "/bin", "HOME": "/root", "FAILURE_RATE": "1"}) == config.parse({})


def test_settings_are_frozen():
    s = config.parse({})
    with pytest.raises(AttributeError):
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
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
@pytest.mark.parametrize("need_card_key", [False, True], ids=["no-card-key", "card-key"])
def test_bad_value_raises_config_error_naming_the_variable(name, value, need_card_key):
    env = {name: value}
    if need_card_key and name != "CARD_ENCRYPTION_KEY":
        env["CARD_ENCRYPTION_KEY"] = GOOD_KEY
    with pytest.raises(ConfigError) as info:
        config.parse(env, need_card_key=need_card_key)
    assert name in str(info.value)


# Values a URL parser accepts but no client can use: the process must stop
# at start with a ConfigError naming the variable, not fail later (or with
# a bare ValueError that load() does not turn into exit code 2).
BAD_URL_VALUES = [
    ("DATABASE_URL", "postgresql://[::1/gateway"),  # unbalanced IPv6 bracket
    ("DATABASE_URL", "postgresql://u@127.0.0.1:notaport/gateway"),
    ("DATABASE_URL", "postgresql://u@127.0.0.1:99999/gateway"),
    ("AMQP_URL", "amqp://guest:guest@[::1:5672/"),
    ("AMQP_URL", "amqp://guest:guest@127.0.0.1:port/"),
    ("AMQP_URL", "amqp://guest:guest@127.0.0.1:65536/"),
    ("BANK_URL", "http://[::1"),
    ("BANK_URL", "http://127.0.0.1:notaport"),
    ("BANK_URL", "http://127.0.0.1:99999"),
]


@pytest.mark.parametrize(("name", "value"), BAD_URL_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_URL_VALUES])
def test_unusable_url_raises_config_error_naming_the_variable(name, value):
    with pytest.raises(ConfigError) as info:
        config.parse({name: value})
    assert name in str(info.value)


def test_bad_url_message_shows_the_value():
    with pytest.raises(ConfigError, match="BANK_URL.*ftp://x"):
        config.parse({"BANK_URL": "ftp://x"})


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


# --------------------------------------------------- CARD_ENCRYPTION_KEY
def test_card_key_decoded():
    raw = os.urandom(32)
    assert config.parse({"CARD_ENCRYPTION_KEY": base64.b64encode(raw).decode()}).card_key == raw


def test_card_key_optional_unless_needed():
    assert config.parse({}, need_card_key=False).card_key is None
    assert config.parse({"CARD_ENCRYPTION_KEY": ""}, need_card_key=False).card_key is None


@pytest.mark.parametrize("env", [{}, {"CARD_ENCRYPTION_KEY": ""}], ids=["unset", "empty"])
def test_card_key_required(env):
    with pytest.raises(ConfigError, match="CARD_ENCRYPTION_KEY"):
        config.parse(env, need_card_key=True)


def test_card_key_checked_even_when_not_needed():
    with pytest.raises(ConfigError, match="CARD_ENCRYPTION_KEY"):
        config.parse({"CARD_ENCRYPTION_KEY": "nope"}, need_card_key=False)


def test_card_key_length_in_message():
    with pytest.raises(ConfigError, match="32 bytes.*16"):
        config.parse({"CARD_ENCRYPTION_KEY": base64.b64encode(b"x" * 16).decode()})


def test_card_key_error_does_not_echo_the_value():
    value = base64.b64encode(b"secret-key-material-31-bytes!!!").decode()
    with pytest.raises(ConfigError) as info:
        config.parse({"CARD_ENCRYPTION_KEY": value})
    assert value not in str(info.value)


# ------------------------------------------------------------------ load()
def test_load_reads_os_environ(clean_env):
    clean_env.setenv("BANK_URL", "http://bank.internal:9000/")
    clean_env.setenv("LOG_LEVEL", "DEBUG")
    clean_env.setenv("GATEWAY_API_KEYS", "shop:shop_key_1")
    clean_env.setenv("CARD_ENCRYPTION_KEY", GOOD_KEY)
    s = config.load(need_card_key=True)
    assert s.bank_url == "http://bank.internal:9000"
    assert s.log_level == "debug"
    assert s.api_keys == {"shop_key_1": "shop"}
    assert s.card_key == b"k" * 32


def test_load_defaults(clean_env):
    assert config.load() == config.parse({})


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_load_exits_2_with_message_on_stderr(clean_env, capsys, name, value):
    clean_env.setenv(name, value.replace("\x00", "\x01"))  # the OS environment cannot hold NUL
    with pytest.raises(SystemExit) as info:
        config.load()
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert name in err
    assert err.startswith("configuration error:")
    assert "Traceback" not in err


@pytest.mark.parametrize(("name", "value"), BAD_URL_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_URL_VALUES])
def test_load_exits_2_on_unusable_url(clean_env, capsys, name, value):
    clean_env.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        config.load()
    assert info.value.code == 2
    assert name in capsys.readouterr().err


def test_load_exits_2_when_card_key_required_and_missing(clean_env, capsys):
    with pytest.raises(SystemExit) as info:
        config.load(need_card_key=True)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "CARD_ENCRYPTION_KEY" in err and "required" in err


def test_load_exit_has_no_chained_exception(clean_env):
    clean_env.setenv("LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as info:
        config.load()
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ is True
