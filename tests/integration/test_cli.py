"""gatewayctl as a real process (the console script of the venv) against PostgreSQL and RabbitMQ.

The module has its own database and vhost: `dlq list` and `replay --all` see
everything parked, so no other module's operations may be in the way.
Dead letters are put in place the way the worker does it (settlement.park, then
a message on payments.dead with the consumer's headers); the last test lets
the real worker park an authorization against a bank that is down, and
replays it once the bank is back.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid

import aio_pika
import orjson
import pytest

from gateway import config, db, domain, topology
from gateway.cards import SINGLE_KEY_ID, CardKey, CardVault
from gateway.domain import Action, BankOutcome, Verdict
from gateway.ops import rules
from gateway.payments import settlement
from gatewayctl import main as gatewayctl
from harness import services
from harness.mockbank_client import MockBankClient
from harness.procs import ScriptProcess, free_port, script_path
from tests.support import factories, phases
from tests.support.parked import QUORUM, ParkedWork
from worker import settings as wsettings
from worker.consumer import Worker
from worker.relay import Relay

pytestmark = pytest.mark.timeout(120)

ERROR = {"code": "bank_connection", "message": "the bank could not be reached", "retryable": True}


class Env(ParkedWork):
    def __init__(self, database_url: str, amqp_url: str, pool, broker, vault: CardVault):
        super().__init__(pool, broker, vault, ERROR)
        self.database_url, self.amqp_url = database_url, amqp_url

    def cli_env(self, **extra) -> dict[str, str | None]:
        env = {
            "DATABASE_URL": self.database_url,
            "AMQP_URL": self.amqp_url,
            "LOG_LEVEL": None,
            "WORKER_RETRY_LADDER": None,
            "WORKER_AUTHORIZE_KEY_MAX_AGE_HOURS": None,
            "ABANDON_AFTER_HOURS": None,
        }
        env.update(extra)
        return env

    async def cli(self, *args: str, env: dict | None = None, expect: int | None = 0):
        """Run gatewayctl; returns (exit code, stdout, stderr)."""
        full = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key, value in self.cli_env(**(env or {})).items():
            if value is None:
                full.pop(key, None)
            else:
                full[key] = value
        proc = await asyncio.create_subprocess_exec(
            script_path("gatewayctl"),
            *args,
            env=full,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        out, err = out.decode(), err.decode()
        if expect is not None:
            assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
        return proc.returncode, out, err

    async def cli_json(self, *args: str, expect: int | None = 0, env: dict | None = None):
        _, out, _ = await self.cli(*args, "--json", expect=expect, env=env)
        return orjson.loads(out)

    async def payment(self, pid: str) -> dict:
        return dict(await self.pool.fetchrow("SELECT * FROM payments WHERE id = $1", pid))

    # ---- the broker ---------------------------------------------------------------------------

    async def count(self, queue_name: str) -> int:
        channel = await self.broker.channel()
        queue = await channel.declare_queue(queue_name, durable=True, arguments=QUORUM)
        n = queue.declaration_result.message_count
        await channel.close()
        return n


@pytest.fixture(scope="module")
async def cli_env(server_urls, card_key):
    admin_url, amqp_root = server_urls
    async with services.private_database(admin_url) as database_url:
        with services.private_vhost(amqp_root) as amqp_url:
            pool = await db.create_pool(database_url, min_size=1, max_size=10)
            broker = await aio_pika.connect_robust(amqp_url)
            channel = await broker.channel()
            await topology.declare(channel, rules.parse_ladder(rules.DEFAULT_RETRY_LADDER))
            await channel.close()
            try:
                yield Env(
                    database_url,
                    amqp_url,
                    pool,
                    broker,
                    CardVault([CardKey(SINGLE_KEY_ID, base64.b64decode(card_key))]),
                )
            finally:
                await broker.close()
                await pool.close()


@pytest.fixture
async def env(cli_env):
    await cli_env.pool.execute(
        "TRUNCATE payments, payment_history, operations, card_vault, outbox, idempotency_keys, reconciliation_findings"
    )
    for name in (topology.DEAD_QUEUE, topology.WORK_QUEUE):
        await cli_env.drain(name)
    yield cli_env


# ---- configuration and migrate ------------------------------------------------------------------


async def test_help_everywhere(cli_env, capsys):
    _, out, _ = await cli_env.cli("--help")  # the installed console script
    assert out.startswith("usage: gatewayctl") and "Exit codes" in out
    for args in (
        ["migrate"],
        ["dlq"],
        ["dlq", "list"],
        ["dlq", "show"],
        ["dlq", "replay"],
        ["dlq", "drop"],
        ["settle"],
        ["resolve"],
        ["payments"],
        ["payments", "set-reference"],
        ["abandon"],
        ["reconcile"],
    ):
        with pytest.raises(SystemExit) as exit_:
            gatewayctl.main([*args, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: gatewayctl {' '.join(args)}"), args
    with pytest.raises(SystemExit) as exit_:
        gatewayctl.main(["dlq"])
    assert exit_.value.code == 2 and "DLQ_COMMAND" in capsys.readouterr().err


async def test_bad_configuration_exits_2_with_a_clear_message(cli_env):
    _, _, err = await cli_env.cli("migrate", env={"DATABASE_URL": "mysql://db/x"}, expect=2)
    assert "DATABASE_URL" in err and "Traceback" not in err
    _, _, err = await cli_env.cli("dlq", "list", env={"WORKER_AUTHORIZE_KEY_MAX_AGE_HOURS": "soon"}, expect=2)
    assert "WORKER_AUTHORIZE_KEY_MAX_AGE_HOURS" in err and "Traceback" not in err
    _, _, err = await cli_env.cli("reconcile", "--rate", "0", expect=2)
    assert "--rate" in err
    _, _, err = await cli_env.cli("dlq", "replay", expect=2)
    assert "OPERATION_ID or --all" in err


async def test_unreachable_database_exits_3(cli_env):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    _, _, err = await cli_env.cli("migrate", env={"DATABASE_URL": url}, expect=3)
    assert "cannot connect to PostgreSQL" in err and "Traceback" not in err


async def test_migrate_creates_then_is_safe_twice(server_urls, cli_env):
    admin_url = server_urls[0]
    url = await services.create_database(admin_url)
    try:
        code, out, _ = await cli_env.cli("migrate", env={"DATABASE_URL": url})
        assert "created" in out and "payments" in out and "reconciliation_findings" in out
        first = await cli_env.cli_json("migrate", env={"DATABASE_URL": url})
        assert first["created"] == {} and first["present"]["table"] >= 7
        _, out, _ = await cli_env.cli("migrate", env={"DATABASE_URL": url})
        assert "already up to date" in out
    finally:
        await services.drop_database(admin_url, url)


# ---- dlq list / show ------------------------------------------------------------------------------


async def test_list_shows_each_operation_and_leaves_the_queue_as_it_was(env):
    parked = [await env.parked("capture") for _ in range(3)]
    await env.dead_letter(parked[1][1], parked[1][0], "capture")  # the consumer may dead-letter twice
    await env.dead_letter("", "", "", headers={"last_error": "bad"}, body=b"not json")  # an unreadable command
    db_only_pid, db_only_op = await env.parked("capture", dead_letters=0)

    first = await env.cli_json("dlq", "list")
    second = await env.cli_json("dlq", "list")

    def without_age(doc):
        return [{k: v for k, v in e.items() if k != "age"} for e in doc["operations"]]

    assert without_age(first) == without_age(second) and first["messages"] == second["messages"] == 5
    ops = first["operations"]
    assert [e["operation_id"] for e in ops] == [op for _, op in parked] + [None, db_only_op]
    for entry, (pid, _op) in zip(ops[: len(parked)], parked, strict=True):
        assert entry["payment_id"] == pid and entry["kind"] == "capture" and entry["attempts"] == 1
        assert entry["state"] == "parked" and entry["last_error"] == ERROR and entry["age"].endswith("s")
    assert [e["messages"] for e in ops] == [1, 2, 1, 1, 0]
    assert ops[3]["state"].startswith("unreadable") and ops[4]["state"] == "parked, no message in the queue"

    # Human output, then the queue itself: same messages, same order, nothing acked.
    _, out, _ = await env.cli("dlq", "list")
    assert "OPERATION" in out and parked[0][1] in out and "bank_connection" in out and db_only_op in out
    left = await env.drain(topology.DEAD_QUEUE)
    assert [(m.headers or {}).get("operation_id") for m in left] == [
        parked[0][1],
        parked[1][1],
        parked[2][1],
        parked[1][1],
        None,
    ]
    assert left[-1].body == b"not json"


async def test_show_has_operation_receipt_history_and_dead_letters(env):
    pid, op = await env.parked("capture")
    doc = await env.cli_json("dlq", "show", op)
    assert doc["operation"]["id"] == op and doc["operation"]["parked"] and doc["state"] == "parked"
    assert doc["payment"]["id"] == pid and doc["payment"]["status"] == "capturing"
    assert doc["payment"]["attention_required"] and doc["payment"]["merchant"] == "ficmart"
    assert [h["status"] for h in doc["history"]] == ["pending", "authorized", "capturing"]
    assert [o["kind"] for o in doc["operations"]] == ["authorize", "capture"]
    assert len(doc["dead_letters"]) == 1 and doc["dead_letters"][0]["headers"]["operation_id"] == op
    assert "unparks" in doc["replay"]
    _, out, _ = await env.cli("dlq", "show", op)
    assert "capturing, attention_required" in out and "api:capture" in out and "1 message(s)" in out
    await env.cli("dlq", "show", "op_nope", expect=1)
    assert await env.count(topology.DEAD_QUEUE) == 1


# ---- dlq replay --------------------------------------------------------------------------------------


async def test_replay_unparks_and_sends_the_command_with_retries_reset(env):
    pid, op = await env.parked("capture", dead_letters=2)
    await env.pool.execute("UPDATE operations SET rungs = 3 WHERE id = $1", op)  # the ladder taken
    _, out, _ = await env.cli("dlq", "replay", op)
    assert "was parked" in out and "2 dead letter(s) removed" in out
    assert await env.count(topology.DEAD_QUEUE) == 0
    row = await env.operation(op)
    assert not row["parked"] and row["status"] == "pending"
    assert row["rungs"] == 0 and not row["forced_replay"]  # the ladder from its foot, on the row
    assert not (await env.payment(pid))["attention_required"]
    (cmd,) = await env.drain(topology.WORK_QUEUE)
    assert orjson.loads(cmd.body) == {"operation_id": op}
    assert not {"x-retries", "x-force"} & set(cmd.headers or {})
    assert cmd.delivery_mode == aio_pika.DeliveryMode.PERSISTENT and cmd.routing_key == "capture"


async def test_replay_lowers_only_the_flag_its_park_raised(env):
    """The payment was flagged before its capture was parked (a possible second hold): the
    replay must not erase that doubt, which only a human can clear."""
    pid, op = await env.authorize()
    claim = await phases.claim(env.pool, op, "test", 30)
    assert isinstance(claim, settlement.Claim)
    approval = BankOutcome(
        "ok", 200, body={"authorization_id": f"auth_{uuid.uuid4()}", "expires_at": "2030-01-01T00:00:00Z"}
    )
    doubt = domain.Doubt(domain.POSSIBLE_DUPLICATE_HOLD, "maybe a second hold", domain.POSSIBLE_DUPLICATE_HOLD)
    assert await phases.record_outcome(env.pool, claim, Verdict.SUCCEEDED, approval, 1, doubt)
    await phases.request_action(env.pool, factories.request(f"/v1/payments/{pid}/capture"), pid, Action.CAPTURE, None)
    capture = await env.pending_op(pid)
    assert isinstance(await phases.claim(env.pool, capture, "test-worker", 30), settlement.Claim)
    assert await settlement.park(env.pool, capture, ERROR) is not None
    await env.dead_letter(capture, pid, "capture")
    _, out, _ = await env.cli("dlq", "replay", capture)
    assert "was parked" in out and not (await env.operation(capture))["parked"]
    assert (await env.payment(pid))["attention_required"]


async def test_replay_of_a_finished_operation_drops_the_message_and_does_nothing(env):
    pid, op = await env.parked("capture")
    # Finished meanwhile, e.g. an earlier replay whose worker succeeded while a duplicate dead letter stayed.
    assert await settlement.unpark(env.pool, op, forced=False)
    await env.settle(op, {"capture_id": f"cap_{uuid.uuid4()}"})
    doc = await env.cli_json("dlq", "replay", op)
    (result,) = doc["results"]
    assert result["result"] == "already_final" and result["dead_letters_dropped"] == 1
    _, out, _ = await env.cli("dlq", "replay", op)  # again, with nothing left: still a no-op
    assert "already final" in out and "nothing to do" in out
    assert await env.count(topology.DEAD_QUEUE) == 0 and await env.count(topology.WORK_QUEUE) == 0
    assert (await env.payment(pid))["status"] == "captured"


async def test_replay_when_the_message_is_gone_re_enqueues_from_the_database(env):
    pid, op = await env.parked("capture", dead_letters=0)
    _, out, _ = await env.cli("dlq", "replay", op)
    assert "re-enqueued from the database" in out
    (cmd,) = await env.drain(topology.WORK_QUEUE)
    assert orjson.loads(cmd.body) == {"operation_id": op}
    assert not (await env.operation(op))["parked"]


async def test_old_authorization_is_refused_without_force(env):
    pid, op = await env.parked("authorize", first_attempt_hours_ago=23.5)
    young_pid, young_op = await env.parked("authorize", first_attempt_hours_ago=1)
    listing = await env.cli_json("dlq", "list")
    assert [e["needs_force"] for e in listing["operations"]] == [True, False]

    code, out, _ = await env.cli("dlq", "replay", op, expect=1)
    assert "refused" in out and "24 h" in out and "second hold" in out and "--force" in out
    assert (await env.operation(op))["parked"] and (await env.payment(pid))["attention_required"]
    assert await env.count(topology.WORK_QUEUE) == 0

    doc = await env.cli_json("dlq", "replay", "--all", expect=1)  # the young one goes, the old one stays
    assert {r["operation_id"]: r["result"] for r in doc["results"]} == {op: "refused", young_op: "replayed"}
    (left,) = await env.drain(topology.DEAD_QUEUE)
    assert left.headers["operation_id"] == op
    await env.dead_letter(op, pid, "authorize")  # put it back for the forced replay

    _, out, _ = await env.cli("dlq", "replay", op, "--force")
    assert "forced" in out
    cmds = {orjson.loads(m.body)["operation_id"]: m for m in await env.drain(topology.WORK_QUEUE)}
    assert set(cmds) == {op, young_op} and not any("x-force" in (m.headers or {}) for m in cmds.values())
    assert (await env.operation(op))["forced_replay"] and not (await env.operation(young_op))["forced_replay"]
    assert not (await env.operation(op))["parked"] and await env.count(topology.DEAD_QUEUE) == 0


async def test_replay_all_handles_each_case(env):
    parked = [await env.parked("capture") for _ in range(2)]
    done_pid, done_op = await env.parked("capture")
    assert await settlement.unpark(env.pool, done_op, forced=False)
    await env.settle(done_op, {"capture_id": f"cap_{uuid.uuid4()}"})
    db_only = await env.parked("capture", dead_letters=0)
    await env.dead_letter("", "", "", headers={}, body=b"{}")
    doc = await env.cli_json("dlq", "replay", "--all", expect=1)  # the unreadable message is not done
    results = {r["operation_id"]: r["result"] for r in doc["results"]}
    assert results == {
        parked[0][1]: "replayed",
        parked[1][1]: "replayed",
        done_op: "already_final",
        db_only[1]: "replayed",
        None: "unreadable",
    }
    sent = [orjson.loads(m.body)["operation_id"] for m in await env.drain(topology.WORK_QUEUE)]
    assert sent == [parked[0][1], parked[1][1], db_only[1]]
    (left,) = await env.drain(topology.DEAD_QUEUE)
    assert left.body == b"{}"
    _, out, _ = await env.cli("dlq", "replay", "--all")
    assert "nothing to replay" in out


# ---- letters without a readable operation id ------------------------------------------------------

CARD = "4111111111111111"


async def test_unreadable_letters_are_listed_shown_and_dropped_by_handle(env):
    pid, op = await env.parked("capture")
    # Letters naming no readable operation: a message id that is no plain token (named by a hash
    # of body and headers), an operation id with a NUL byte, and a body that is no command.
    channel = await env.broker.channel(publisher_confirms=True)
    for body, headers, message_id in (
        (f'{{"card": "{CARD}", "x": 1'.encode(), {"last_error": f"echo {CARD}"}, "a message id with spaces"),
        (b'{"operation_id": "op_\x00"}', {"operation_id": "op_\x00nul"}, "cmd_nul"),
        (b"[]", {}, "cmd_unreadable1"),
    ):
        await channel.default_exchange.publish(
            aio_pika.Message(body, message_id=message_id, headers=headers), routing_key=topology.DEAD_QUEUE
        )
    await channel.close()

    first = await env.cli_json("dlq", "list")
    second = await env.cli_json("dlq", "list")  # each read requeues: the broker counts deliveries
    unreadable = [e for e in first["operations"] if e["operation_id"] is None]
    assert [e["handles"] for e in unreadable] == [
        e["handles"] for e in second["operations"] if e["operation_id"] is None
    ]
    handles = [e["handles"][0] for e in unreadable]
    assert handles[0].startswith("sha-") and handles[1:] == ["cmd_nul", "cmd_unreadable1"]
    assert all(e["state"].startswith("unreadable") for e in unreadable)
    _, out, _ = await env.cli("dlq", "list")
    assert all(h in out for h in handles) and "gatewayctl dlq drop HANDLE" in out

    shown = await env.cli_json("dlq", "show", handles[0])
    (letter,) = shown["letters"]
    assert CARD not in orjson.dumps(letter).decode() and "[redacted]" in letter["body"]
    assert letter["headers"]["last_error"] == "echo [redacted]" and letter["operation_id"] is None
    _, out, _ = await env.cli("dlq", "show", handles[0])
    assert f"letter {handles[0]}" in out and CARD not in out and f"gatewayctl dlq drop {handles[0]}" in out

    doc = await env.cli_json("dlq", "replay", "--all", expect=1)
    reported = {tuple(r["handles"]): r for r in doc["results"] if r["result"] == "unreadable"}
    assert set(reported) == {(h,) for h in handles}
    assert f"gatewayctl dlq drop {handles[1]}" in reported[(handles[1],)]["message"]
    assert [r["operation_id"] for r in doc["results"] if r["result"] == "replayed"] == [op]

    _, out, err = await env.cli("dlq", "drop", "cmd_unreadable1", "sha-0000000000000000", expect=1)
    assert "dropping letter cmd_unreadable1" in out and "1 letter(s) dropped" in out
    assert "no letter sha-0000000000000000" in err
    _, out, _ = await env.cli("dlq", "drop", "--unreadable")
    assert "2 letter(s) dropped" in out and CARD not in out
    assert await env.count(topology.DEAD_QUEUE) == 0
    _, out, _ = await env.cli("dlq", "replay", "--all")  # a way out: nothing left that needs a human
    assert "nothing to replay" in out
    await env.cli("dlq", "drop", expect=2)


async def test_drop_of_an_unknown_operations_letters_by_the_handle_replay_names(env):
    await env.dead_letter("op_" + "f" * 32, "pay_gone", "capture")
    doc = await env.cli_json("dlq", "replay", "--all", expect=1)
    (result,) = doc["results"]
    assert result["result"] == "unknown" and f"gatewayctl dlq drop {result['handles'][0]}" in result["message"]
    dropped = await env.cli_json("dlq", "drop", *result["handles"])
    assert [d["operation_id"] for d in dropped["dropped"]] == ["op_" + "f" * 32] and dropped["not_found"] == []
    await env.cli("dlq", "replay", "--all")


# ---- settle, resolve, abandon ------------------------------------------------------------------------


async def test_settle_by_hand_then_resolve_the_unknown_reference(env):
    pid, op = await env.parked("capture")
    _, _, err = await env.cli("settle", op, "--outcome", "succeeded", "--by", "alice", expect=2)
    assert "--reason" in err
    _, _, err = await env.cli(
        "settle", op, "--outcome", "failed", "--reason", "r", "--by", "alice", "--bank-id", "cap_x", expect=2
    )
    assert "--bank-id only goes with --outcome succeeded" in err
    _, _, err = await env.cli(
        "settle", op, "--outcome", "succeeded", "--reason", "r", "--by", "alice", "--bank-id", "cap_x", expect=2
    )
    assert "lowercase UUID" in err and (await env.operation(op))["parked"]
    _, _, err = await env.cli("settle", op, "--outcome", "succeeded", "--reason", "r", "--by", "a b", expect=2)
    assert "operator's name" in err

    _, out, _ = await env.cli("settle", op, "--outcome", "succeeded", "--reason", "bank shows it", "--by", "alice")
    assert f"settled capture operation {op} by hand" in out and "capture_id is unknown" in out
    assert "captured, attention_required" in out and "ops:alice:settle:bank shows it" in out
    row = await env.payment(pid)
    assert (row["status"], row["attention_required"], row["capture_id"]) == ("captured", True, None)

    _, _, err = await env.cli("settle", op, "--outcome", "failed", "--reason", "r", "--by", "alice", expect=1)
    assert "refused" in err and "already final (succeeded)" in err
    _, _, err = await env.cli("resolve", pid, "--reason", "r", "--by", "bob", "--set", "capture_id", expect=2)
    assert "expected FIELD=ID" in err
    cap = f"cap_{uuid.uuid4()}"
    doc = await env.cli_json("resolve", pid, "--reason", "bank statement", "--by", "bob", "--set", f"capture_id={cap}")
    assert doc["payment"]["bank"]["capture_id"] == cap and not doc["payment"]["attention_required"]
    _, _, err = await env.cli("resolve", pid, "--reason", "again", "--by", "bob", expect=1)
    assert "nothing to resolve" in err
    doc = await env.cli_json("dlq", "show", op)  # the full history, with who and why
    assert [h["cause"] for h in doc["history"]][-2:] == [
        "ops:alice:settle:bank shows it",
        "ops:bob:resolve:bank statement",
    ]


async def test_set_reference_records_the_capture_id_found_at_the_bank_and_never_overwrites(env):
    pid, op = await env.parked("capture")
    await env.cli("settle", op, "--outcome", "succeeded", "--reason", "bank shows it", "--by", "alice")
    set_reference = ("payments", "set-reference", pid, "--by", "carol", "--reason", "ticket 7")
    _, _, err = await env.cli(*set_reference, "--capture-id", "cap_x", expect=2)
    assert "'cap_' followed by a lowercase UUID" in err
    _, _, err = await env.cli(
        *set_reference, "--capture-id", f"cap_{uuid.uuid4()}", "--void-id", f"void_{uuid.uuid4()}", expect=2
    )
    assert "not allowed with argument" in err
    _, _, err = await env.cli(*set_reference, "--authorization-id", f"auth_{uuid.uuid4()}", expect=1)
    assert "already has authorization_id" in err and "never overwritten" in err
    _, _, err = await env.cli(*set_reference, "--refund-id", f"ref_{uuid.uuid4()}", expect=1)
    assert "a captured payment has no refund_id" in err

    cap = f"cap_{uuid.uuid4()}"
    _, out, _ = await env.cli(*set_reference, "--capture-id", cap)
    assert "recorded the bank reference" in out and "stays flagged" in out
    assert f"ops:carol:set-reference:capture_id={cap} ticket 7" in out
    row = await env.payment(pid)
    assert (row["status"], row["capture_id"], row["attention_required"]) == ("captured", cap, True)
    _, _, err = await env.cli(*set_reference, "--capture-id", f"cap_{uuid.uuid4()}", expect=1)
    assert f"already has capture_id {cap}" in err
    assert (await env.payment(pid))["capture_id"] == cap


async def test_abandon_waits_for_the_configured_time_then_voids_the_hold(env):
    pid, op = await env.parked("capture")
    _, _, err = await env.cli("abandon", pid, "--reason", "bank stuck", "--by", "carol", expect=1)
    assert "refused" in err and "once parked for 24 h" in err and "gatewayctl settle" in err
    await env.pool.execute("UPDATE operations SET updated_at = now() - interval '25 hours' WHERE id = $1", op)
    _, out, _ = await env.cli("abandon", pid, "--reason", "bank stuck", "--by", "carol")
    assert f"abandoned the parked capture operation {op}" in out and "the hold is being voided" in out
    row = await env.payment(pid)
    assert (row["status"], row["last_error"]["code"], row["attention_required"]) == ("voiding", "abandoned", False)
    void_op = await env.pending_op(pid)
    assert (await env.operation(void_op))["kind"] == "void"
    _, _, err = await env.cli("abandon", pid, "--reason", "again", "--by", "carol", expect=1)
    assert "not parked" in err

    auth_pid, _ = await env.parked("authorize")
    _, _, err = await env.cli(
        "abandon", auth_pid, "--reason", "r", "--by", "carol", env={"ABANDON_AFTER_HOURS": "soon"}, expect=2
    )
    assert "ABANDON_AFTER_HOURS" in err and "Traceback" not in err
    doc = await env.cli_json(
        "abandon", auth_pid, "--reason", "no answer", "--by", "carol", env={"ABANDON_AFTER_HOURS": "0.0001"}
    )
    assert doc["payment"]["status"] == "declined" and doc["kind"] == "authorize" and doc["follow_up"] is None


# ---- the real worker parks, ops replays ------------------------------------------------------------


async def test_worker_parks_after_the_ladder_and_replay_finishes_it(env, card_key):
    port = free_port()
    bank_url = f"http://127.0.0.1:{port}"
    cfg = wsettings.WorkerSettings(
        bank_timeout=2,
        prefetch=50,
        concurrency=10,
        db_pool_size=4,
        retry_ladder=(1,),
        quick_retries=1,
        quick_retry_base=0.01,
        lease_margin=1,
        confirm_delay=0.1,
    )
    settings = config.parse(
        {
            "DATABASE_URL": env.database_url,
            "AMQP_URL": env.amqp_url,
            "BANK_URL": bank_url,
            "CARD_ENCRYPTION_KEY": card_key,
            "GATEWAY_ENV": "development",
        },
        uses_card_key=True,
    )
    async with (
        ScriptProcess(
            "mockbank",
            "--port",
            str(port),
            env={"MIN_LATENCY_MS": "0", "MAX_LATENCY_MS": "0", "FAILURE_RATE": "0", "LOG_LEVEL": "warning"},
        ) as bank,
        MockBankClient(bank_url) as mock,
    ):
        await bank.wait_http(f"{bank_url}/health")
        await mock.arm_fault(action="error", path="/api/v1/authorizations", status=500, times=1000)
        relay = Relay(env.database_url, env.amqp_url, wsettings.RelaySettings(poll_seconds=0.1), ladder=(1,))
        await relay.start()
        stop = asyncio.Event()
        relay_task = asyncio.create_task(relay.run(stop))
        worker = Worker(settings, cfg, run_sweeper=False)
        await worker.start()
        try:
            pid, op = await env.authorize(amount=4200)
            await wait_for(lambda: env.operation(op), lambda o: o["parked"])
            listing = await env.cli_json("dlq", "list")
            (entry,) = listing["operations"]
            assert entry["operation_id"] == op and entry["state"] == "parked" and entry["messages"] == 1
            assert entry["last_error"]["code"] == "internal_error" and entry["attempts"] >= 1

            await mock.clear_faults()
            await env.cli("dlq", "replay", op)
            row = await wait_for(lambda: env.payment(pid), lambda p: p["status"] == "authorized")
            assert not row["attention_required"] and row["authorization_id"].startswith("auth_")
            assert await env.count(topology.DEAD_QUEUE) == 0
        finally:
            await worker.stop()
            stop.set()
            await relay_task
            await relay.close()


async def wait_for(read, until, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached the expected state: {value}")
        await asyncio.sleep(0.05)
