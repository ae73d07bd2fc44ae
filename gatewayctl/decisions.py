"""gatewayctl settle, resolve, payments set-reference and abandon: the decisions a human
takes after checking the bank. Each is a phase of gateway/ops/decisions.py; this module parses,
prints and picks the exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from gateway import config, domain
from gateway.ops import decisions
from gateway.ops.rules import OpsRules
from gatewayctl.kit import (
    ENVIRONMENT,
    EXIT_ATTENTION,
    EXIT_OK,
    EXIT_USAGE,
    FORMATTER,
    connect,
    emit_json,
    error_text,
    json_flag,
    para,
    reference,
)

Decide = Callable[[asyncpg.Pool], Awaitable[decisions.OpsDecision]]


@dataclass(frozen=True)
class Who:
    """--by and --reason: who decides, and why (kept in the payment's history)."""

    by: str
    reason: str

    @classmethod
    def of(cls, args: argparse.Namespace) -> Who:
        return cls(args.by, args.reason)


def add_commands(commands: argparse._SubParsersAction) -> None:
    who = argparse.ArgumentParser(add_help=False)
    who.add_argument(
        "--reason", required=True, metavar="TEXT", help="why (kept, redacted and cut, in the payment's history)"
    )
    who.add_argument("--by", required=True, metavar="NAME", help="who decides (1-64 letters, digits, . _ @ -)")

    p = commands.add_parser(
        "settle",
        parents=[json_flag(), who],
        formatter_class=FORMATTER,
        help="record a parked operation's outcome, checked at the bank by hand",
        description=para(
            "For a parked operation whose outcome you checked at the bank (e.g. `bank_outcome_uncertain`: the "
            "bank says already done and will not name what it did). Records it as the worker would: the "
            "payment's status (succeeded: authorized, captured, voided, refunded, expired; failed: declined "
            "for an authorization, back to the status it had otherwise), the card deleted, the completion "
            "event, and a history row `ops:NAME:settle:REASON`.",
            "--bank-id records the bank's id of what was done (auth_, cap_, void_ or ref_ and a lowercase "
            "UUID, as the operation's kind needs). Without it the reference is unknown and the payment keeps "
            "attention_required until `gatewayctl resolve --set` fills it. An authorization settled by hand "
            "has no hold expiry until reconciliation takes the bank's.",
            "Refused (exit 1) when the operation is unknown, already final, or not parked (a worker is "
            "still on it). Its letters stay in the queue; `dlq replay` drops them as already final.",
        ),
    )
    p.add_argument("operation_id", metavar="OPERATION_ID", help="op_...")
    p.add_argument("--outcome", required=True, choices=("succeeded", "failed"), help="what the bank did")
    p.add_argument("--bank-id", metavar="ID", help="the bank's id of what it did (with --outcome succeeded)")
    p.set_defaults(
        handler=lambda args, settings: settle(
            settings,
            Who.of(args),
            args.operation_id,
            succeeded=args.outcome == "succeeded",
            bank_id=args.bank_id,
            as_json=args.json,
        )
    )

    p = commands.add_parser(
        "resolve",
        parents=[json_flag(), who],
        formatter_class=FORMATTER,
        help="clear attention_required on a payment with nothing in flight",
        description=para(
            "For a payment flagged by reconciliation, or settled with an unknown bank reference, once you "
            "have looked: clears attention_required and writes a history row `ops:NAME:resolve:REASON`; the "
            "status does not move. --set fills a missing bank reference (authorization_id, capture_id, "
            "void_id, refund_id; its prefix and a lowercase UUID) only where the receipt has none and the "
            "status has one.",
            "Refused (exit 1) when the payment is unknown, has an operation in flight (settle or abandon "
            "it), already has that reference, or is neither flagged nor given one.",
        ),
    )
    p.add_argument("payment_id", metavar="PAYMENT_ID", help="pay_...")
    p.add_argument("--set", action="append", metavar="FIELD=ID", help="a missing bank reference (repeatable)")
    p.set_defaults(
        handler=lambda args, settings: resolve(
            settings, Who.of(args), args.payment_id, args.set or [], as_json=args.json
        )
    )

    group = commands.add_parser(
        "payments",
        formatter_class=FORMATTER,
        help="one payment's bank references: set-reference",
        description=para(
            "What an operator records on one payment after checking the bank by hand.",
        ),
        epilog=para(*ENVIRONMENT),
    )
    payment_commands = group.add_subparsers(dest="payments_command", metavar="PAYMENTS_COMMAND", required=True)
    p = payment_commands.add_parser(
        "set-reference",
        parents=[json_flag(), who],
        formatter_class=FORMATTER,
        help="record a bank reference the bank never gave us (found at the bank)",
        description=para(
            "When the bank did a step but forgot our idempotency key, it never named what it did: the "
            "receipt shows the step's reference as null (last_error `bank_reference_unknown`, "
            "attention_required), and FicMart's next step that is sent with it (a refund needs the "
            "capture_id; a capture or void the authorization_id) is refused with 409 "
            "`bank_reference_unknown`. Find the reference at the bank (the payment's card, amount and "
            "time; `gatewayctl dlq show` has the operation's bank key), then record it here: FicMart's "
            "request is accepted from then on.",
            "The reference must be the bank's shape (auth_, cap_, void_ or ref_ and a lowercase UUID), fit "
            "the payment's status, and be missing from the receipt: a known reference is never "
            "overwritten. The status and attention_required do not move (`gatewayctl resolve` clears the "
            "flag once everything about the payment, its findings too, has been checked). History row "
            "`ops:NAME:set-reference:FIELD=ID REASON`.",
            "Refused (exit 1) when the payment is unknown, has an operation in flight, already has that "
            "reference or its status has none.",
        ),
    )
    p.add_argument("payment_id", metavar="PAYMENT_ID", help="pay_...")
    which = p.add_mutually_exclusive_group(required=True)
    for name in domain.BANK_REFERENCES:
        which.add_argument(
            f"--{name.replace('_', '-')}",
            dest="reference",
            type=reference(name),
            metavar="ID",
            help=f"the {name} ({domain.BANK_REFERENCES[name][0]}...)",
        )
    p.set_defaults(
        handler=lambda args, settings: set_reference(
            settings, Who.of(args), args.payment_id, args.reference, as_json=args.json
        )
    )

    p = commands.add_parser(
        "abandon",
        parents=[json_flag(), who],
        formatter_class=FORMATTER,
        help="give up on a payment whose operation is parked too long",
        description=para(
            "For a payment whose operation has been parked for ABANDON_AFTER_HOURS (24) or more. Nothing "
            "guesses money: the operation fails with last_error `abandoned` and the reason, the card is "
            "purged, and the payment: authorize -> declined (a hold the bank may have placed lapses by itself; "
            "a reconciliation finding `abandoned_authorization` records it); capture or void -> voiding, with "
            "a new void of the hold (voided once the bank confirms); refund -> captured, last_error "
            "`abandoned`; release -> stays expired. History row `ops:NAME:abandon:REASON`; events as usual.",
            "Refused (exit 1) when nothing is parked, or it was parked less than ABANDON_AFTER_HOURS ago: "
            "replay it, or settle it by hand after checking the bank.",
        ),
    )
    p.add_argument("payment_id", metavar="PAYMENT_ID", help="pay_...")
    p.set_defaults(
        handler=lambda args, settings: abandon(
            settings,
            Who.of(args),
            args.payment_id,
            timedelta(hours=OpsRules.load().abandon_after_hours),
            as_json=args.json,
        )
    )


def _references(pairs: list[str]) -> dict[str, str]:
    """--set FIELD=ID pairs, each checked for its shape (prefix + lowercase UUID)."""
    found: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        problem = "expected FIELD=ID" if not sep else domain.reference_problem(name, value)
        if problem:
            raise ValueError(f"--set {pair}: {problem}")
        if name in found:
            raise ValueError(f"--set {name} given twice")
        found[name] = value
    return found


async def _decide(settings: config.Settings, act: str, who: Who, decide: Decide, *, as_json: bool) -> int:
    """Run one ops phase (`act`, the history's name for it); OpsRefused is a human's matter
    (exit 1), ValueError bad usage (2)."""
    try:
        decisions.ops_cause(who.by, act, who.reason)  # bad names and empty reasons, before connecting
    except ValueError as exc:
        print(f"gatewayctl {act}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    pool = await connect(settings)
    try:
        decision = await decide(pool)
    except decisions.OpsRefused as exc:
        print(f"gatewayctl {act}: refused: {exc}", file=sys.stderr)
        return EXIT_ATTENTION
    except ValueError as exc:
        print(f"gatewayctl {act}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        await pool.close()
    if as_json:
        emit_json(
            {
                "payment": decision.payment,
                "operation_id": decision.operation_id,
                "kind": decision.kind,
                "follow_up": decision.follow_up,
            }
        )
        return EXIT_OK
    payment = decision.payment
    print(_summary(act, decision))
    bank = payment["bank"]
    flag = ", attention_required" if payment["attention_required"] else ""
    print(f"  payment       {payment['id']}: {payment['status']}{flag}")
    for name in domain.BANK_REFERENCES:
        if bank[name]:
            print(f"  {name:<14}{bank[name]}")
    if payment["last_error"]:
        print(f"  last error    {error_text(payment['last_error'])}")
    print(f"  history       {decision.cause}")
    return EXIT_OK


def _summary(command: str, decision: decisions.OpsDecision) -> str:
    kind = decision.kind
    if command == "settle" and kind is not None:
        text = f"settled {kind.value} operation {decision.operation_id} by hand"
        if decision.payment["attention_required"]:
            text += (
                f"; the bank's {domain.REFERENCE_OF[kind]} is unknown, so the payment stays flagged: once "
                f"you have it, `gatewayctl resolve PAYMENT_ID --set {domain.REFERENCE_OF[kind]}=ID`"
            )
        return text
    if command == "abandon" and kind is not None:
        text = f"abandoned the parked {kind.value} operation {decision.operation_id}; the card is purged"
        if decision.follow_up:
            text += f"; the hold is being voided (operation {decision.follow_up}): voided once the bank confirms"
        return text
    if command == "set-reference":
        text = "recorded the bank reference: FicMart's requests sent with it are accepted again"
        if decision.payment["attention_required"]:
            text += "; the payment stays flagged until `gatewayctl resolve` (once its findings are checked too)"
        return text
    return "resolved: attention_required cleared"


async def settle(
    settings: config.Settings, who: Who, operation_id: str, *, succeeded: bool, bank_id: str | None, as_json: bool
) -> int:
    if bank_id is not None and not succeeded:
        print("gatewayctl settle: --bank-id only goes with --outcome succeeded", file=sys.stderr)
        return EXIT_USAGE
    return await _decide(
        settings,
        "settle",
        who,
        lambda pool: decisions.settle_by_hand(
            pool, operation_id, succeeded=succeeded, reason=who.reason, by=who.by, bank_id=bank_id
        ),
        as_json=as_json,
    )


async def resolve(settings: config.Settings, who: Who, payment_id: str, pairs: list[str], *, as_json: bool) -> int:
    try:
        references = _references(pairs)
    except ValueError as exc:
        print(f"gatewayctl resolve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return await _decide(
        settings,
        "resolve",
        who,
        lambda pool: decisions.resolve(pool, payment_id, reason=who.reason, by=who.by, references=references),
        as_json=as_json,
    )


async def set_reference(
    settings: config.Settings, who: Who, payment_id: str, named: tuple[str, str], *, as_json: bool
) -> int:
    name, value = named
    return await _decide(
        settings,
        "set-reference",
        who,
        lambda pool: decisions.set_reference(pool, payment_id, name, value, reason=who.reason, by=who.by),
        as_json=as_json,
    )


async def abandon(
    settings: config.Settings, who: Who, payment_id: str, parked_at_least: timedelta, *, as_json: bool
) -> int:
    return await _decide(
        settings,
        "abandon",
        who,
        lambda pool: decisions.abandon(pool, payment_id, reason=who.reason, by=who.by, parked_at_least=parked_at_least),
        as_json=as_json,
    )
