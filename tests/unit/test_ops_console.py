"""The ops console's pure parts: GATEWAY_OPS_KEYS, login, form tokens, the origin check,
rendering (escaping and redaction), and the one place the gateway may import the worker."""

from __future__ import annotations

import ast
import base64
import secrets
from datetime import timedelta
from pathlib import Path

import pytest

from gateway import config
from gateway.api.ops import auth, render
from gateway.timefmt import now
from harness.procs import run_script

ALICE = "ops_key_alice_0123456789"
BOB = "ops_key_bob_9876543210xyz"
CARD = "4000056655665556"
GATEWAY = Path(__file__).resolve().parents[2] / "gateway"


# ---- GATEWAY_OPS_KEYS -------------------------------------------------------------------------


def test_ops_keys_are_name_key_pairs_and_off_by_default():
    assert config.parse({}).ops_keys == {}
    assert config.parse({"GATEWAY_OPS_KEYS": ""}).ops_keys == {}
    parsed = config.parse({"GATEWAY_OPS_KEYS": f" alice:{ALICE} , bob:{BOB} "})
    assert parsed.ops_keys == {ALICE: "alice", BOB: "bob"}


@pytest.mark.parametrize(
    "value",
    [
        "alice",  # no key
        "alice:short_key",  # under 16 characters
        f"al ice:{ALICE}",  # a name that cannot go into a history cause
        f"alice:{ALICE}:x\x07",  # not printable
        f"a:{ALICE},b:{ALICE}",  # the same key twice
        "x:sk_test_ficmart_dev_longer",  # FicMart's key: it must never open /ops
    ],
)
def test_bad_ops_keys_stop_the_process_without_echoing_a_key(value):
    env = {"GATEWAY_OPS_KEYS": value, "GATEWAY_API_KEYS": "ficmart:sk_test_ficmart_dev_longer"}
    with pytest.raises(config.ConfigError) as error:
        config.parse(env)
    assert "GATEWAY_OPS_KEYS" in str(error.value)
    assert ALICE not in str(error.value) and "sk_test_ficmart_dev_longer" not in str(error.value)


PRODUCTION = {"GATEWAY_API_KEYS": "ficmart:live_key_1", "CARD_ENCRYPTION_KEY": base64.b64encode(b"\x07" * 32).decode()}


@pytest.mark.parametrize(
    "weak",
    [ALICE, "correct horse battery staple", "a1" * 40, "qwertyuiop" * 3, secrets.token_urlsafe(12)],
    ids=["typed", "passphrase", "repeated", "pattern", "short-random"],
)
def test_production_refuses_weak_ops_keys_naming_the_operator_not_the_key(weak):
    env = {**PRODUCTION, "GATEWAY_OPS_KEYS": f"alice:{weak},bob:{ops_key()}"}
    with pytest.raises(config.ConfigError, match="GATEWAY_OPS_KEYS: the key of alice is too weak") as error:
        config.parse(env, uses_card_key=True)
    assert weak not in str(error.value) and "bob" not in str(error.value)
    assert config.parse({**env, "GATEWAY_ENV": "development"}, uses_card_key=True).ops_keys[weak] == "alice"


def ops_key(name: str = "bob") -> str:
    """A key from `gatewayctl ops-key` (the installed console script), as NAME:KEY."""
    result = run_script("gatewayctl", "ops-key", name, env={"DATABASE_URL": None})
    assert result.returncode == 0, result.stderr
    pair_name, _, key = result.stdout.strip().partition(":")
    assert pair_name == name
    return key


def test_gatewayctl_ops_key_makes_keys_production_takes():
    keys = {ops_key("carol") for _ in range(3)}
    assert len(keys) == 3 and all(key.startswith("ops_") for key in keys)
    env = {**PRODUCTION, "GATEWAY_OPS_KEYS": ",".join(f"op{i}:{key}" for i, key in enumerate(keys))}
    assert len(config.parse(env, uses_card_key=True).ops_keys) == 3
    # 256 random bits score 190-260: far from the refusal, whatever the draw
    assert all(config.ops_key_bits(key) > 180 for key in keys)


def test_gatewayctl_ops_key_refuses_a_name_histories_cannot_hold():
    result = run_script("gatewayctl", "ops-key", "al ice")
    assert result.returncode == 2 and "ops name" in result.stderr and result.stdout == ""


# ---- login --------------------------------------------------------------------------------------


def _basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_basic_login_takes_the_operators_name_and_key():
    operators = auth.operators_by_digest({ALICE: "alice", BOB: "bob"})

    def login(header: str) -> auth.Operator | None:
        credentials = auth.basic_credentials(header)
        return auth.authenticate(credentials, operators) if credentials is not None else None

    assert login(_basic(f"alice:{ALICE}")) == auth.Operator("alice", ALICE)
    assert login(_basic(f"bob:{BOB}")) == auth.Operator("bob", BOB)
    assert auth.basic_credentials(_basic(f"alice:{ALICE}:more")) == ("alice", f"{ALICE}:more")
    for header in (
        _basic(f"anyone:{ALICE}"),  # another name with alice's key
        _basic(f":{ALICE}"),
        _basic(f"bob:{ALICE}"),
        _basic(f"Alice:{ALICE}"),
        _basic(f"alice:{ALICE}:more"),
        _basic(f"alice:{BOB}"),
        "",
        f"Bearer {ALICE}",
        _basic(ALICE),
        _basic("alice:"),
        "Basic !!!",
        "Basic",
    ):
        assert login(header) is None, header


# ---- form tokens --------------------------------------------------------------------------------


def test_a_form_token_allows_one_action_on_one_target_for_one_operator():
    alice, bob = auth.Operator("alice", ALICE), auth.Operator("bob", BOB)
    token = auth.form_token(alice, "replay", "op_1")
    assert auth.token_problem(alice, "replay", "op_1", token) is None
    assert auth.token_problem(alice, "replay:force", "op_1", token) == "the form token is not valid for this action"
    assert auth.token_problem(alice, "replay", "op_2", token) == "the form token is not valid for this action"
    assert auth.token_problem(bob, "replay", "op_1", token) == "the form token is not valid for this action"
    # the same key under another name is the same key: the token is the key holder's
    assert auth.token_problem(auth.Operator("alias", ALICE), "replay", "op_1", token) is None
    for broken in ("", ".", "abc", "123", "x.y", token.split(".")[1], "12." + token.split(".")[1]):
        assert auth.token_problem(alice, "replay", "op_1", broken) is not None, broken


def test_a_form_token_time_is_ascii_digits_only():
    """str.isdigit() also says yes to '²' (int() then raised: a 500) and to other scripts' digits
    (int() reads '١٨٠٠٠٠٠٠٠٠' as 1800000000: a second spelling of one token)."""
    alice = auth.Operator("alice", ALICE)
    issued = 1_800_000_000
    mac = auth.form_token(alice, "replay", "op_1", at=issued).split(".")[1]
    arabic = str(issued).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    for token in (f"²{issued}.{mac}", f"{arabic}.{mac}", f"{issued}\u0663.{mac}"):
        assert auth.token_problem(alice, "replay", "op_1", token, at=issued) == "the form token is missing or malformed"


def test_a_form_token_expires_and_cannot_come_from_the_future():
    alice = auth.Operator("alice", ALICE)
    issued = 1_800_000_000
    token = auth.form_token(alice, "replay", "op_1", at=issued)
    assert auth.token_problem(alice, "replay", "op_1", token, at=issued + auth.TOKEN_SECONDS) is None
    assert "expired" in (auth.token_problem(alice, "replay", "op_1", token, at=issued + auth.TOKEN_SECONDS + 1) or "")
    assert auth.token_problem(alice, "replay", "op_1", token, at=issued - 30) is None  # another host's clock
    assert auth.token_problem(alice, "replay", "op_1", token, at=issued - 3600) is not None


# ---- same origin --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "referer", "host", "allowed"),
    [
        ("http://127.0.0.1:8080", None, "127.0.0.1:8080", True),
        ("https://ops.example", None, "ops.example", True),  # TLS ends at a proxy: the scheme is not compared
        ("http://OPS.example", None, "ops.example", True),
        (None, "http://127.0.0.1:8080/ops/dead-letters", "127.0.0.1:8080", True),
        ("http://127.0.0.1:8081", None, "127.0.0.1:8080", False),
        ("https://evil.example", "http://127.0.0.1:8080/ops/", "127.0.0.1:8080", False),  # Origin decides
        ("null", None, "127.0.0.1:8080", False),
        (None, "https://evil.example/127.0.0.1:8080", "127.0.0.1:8080", False),
        (None, None, "127.0.0.1:8080", False),
        ("", None, "127.0.0.1:8080", False),
        ("http://127.0.0.1:8080", None, None, False),
        ("http://[::1", None, "127.0.0.1:8080", False),  # unparseable
    ],
)
def test_origin_check(origin, referer, host, allowed):
    assert (auth.origin_problem(origin, referer, host) is None) is allowed


# ---- rendering ----------------------------------------------------------------------------------


def test_outside_text_is_redacted_and_cut():
    assert render.outside(f"card {CARD} cvv 123") == "card [redacted] [redacted]"
    assert render.outside(f"{CARD}".encode()) == "[redacted]"
    assert render.outside({"n": CARD}) == '{"n":"[redacted]"}'
    assert render.outside(None) == ""
    assert render.outside("x" * 600, 100).startswith("x" * 100 + "...[500 more")
    assert CARD not in render.pretty(f'{{"number": "{CARD}"}}'.encode())
    assert render.pretty(b"not json <b>") == "not json <b>"  # escaped by the template, not here
    stored_error = f'{{"code": "bank_error", "message": "card {CARD}"}}'
    assert render.error_text(stored_error) == "bank_error: card [redacted]"


def test_small_formats():
    assert render.ago(now() - timedelta(seconds=42)) == "42 s"
    assert render.ago(now() - timedelta(hours=3, minutes=2, seconds=5)) == "3 h 2 min"
    assert render.ago(now() - timedelta(days=2)) == "2 d"
    assert render.ago(now() + timedelta(seconds=5)) == "0 s"
    assert render.money(500012) == "5,000.12 USD" and render.money(5, "USD") == "0.05 USD"
    assert render.segment("op_1/../x?y") == "op_1%2F..%2Fx%3Fy"


def test_templates_escape_everything():
    page = render.page("notice.html", operator=None, path="/ops/", title="<b>t</b>", message="<script>x</script>")
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page and "&lt;b&gt;t" in page


# ---- layering -----------------------------------------------------------------------------------


def test_the_gateway_package_imports_nothing_from_the_worker():
    importers = []
    for path in GATEWAY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "worker" or name.startswith("worker.") for name in names):
                importers.append(path.relative_to(GATEWAY.parent).as_posix())
    assert importers == []
