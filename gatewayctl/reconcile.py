"""gatewayctl reconcile: compare receipts with the bank (gateway/ops/reconcile.py), print the
findings and exit 1 when there are any."""

from __future__ import annotations

import argparse

from gateway import config
from gateway.ops import reconcile
from gatewayctl.kit import (
    EXIT_ATTENTION,
    EXIT_OK,
    FORMATTER,
    connect,
    emit_json,
    json_flag,
    para,
    positive,
    table,
)
from worker.bank import BankClient

BANK_TIMEOUT = 20.0


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "reconcile",
        parents=[json_flag()],
        formatter_class=FORMATTER,
        help="compare receipts with the bank",
        description=para(
            "Compare the newest settled payments that have bank ids with the bank's GET endpoints "
            "(authorization: exists, amount, expires_at; capture: exists, amount, authorization; refund: "
            "exists, amount, capture) at a bounded rate, retrying transient bank errors. Payments with a "
            "pending or parked operation are skipped. Findings (missing_at_bank, amount_mismatch, "
            "link_mismatch, receipt_incomplete, expiry_mismatch, unverified) are printed and stored in "
            "reconciliation_findings. Exit code 0 when there are none, 1 when there are findings.",
            "Voids cannot be checked: the bank has no GET for them.",
        ),
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="take the bank's hold expiry (and expire the payment if the hold has lapsed); flag "
        "money disagreements with attention_required. Money is never changed.",
    )
    p.add_argument(
        "--rate",
        type=positive(float),
        default=reconcile.DEFAULT_RATE,
        metavar="N",
        help=f"bank requests per second, retries included (default {reconcile.DEFAULT_RATE:g})",
    )
    p.add_argument(
        "--limit",
        type=positive(int),
        default=reconcile.DEFAULT_LIMIT,
        metavar="N",
        help=f"payments to check, newest first (default {reconcile.DEFAULT_LIMIT})",
    )
    p.set_defaults(
        handler=lambda args, settings: run(
            settings, repair=args.repair, rate=args.rate, limit=args.limit, as_json=args.json
        )
    )


def _action(f: reconcile.Finding, repair: bool) -> str:
    if f.repaired:
        return "repaired" + (f" ({f.note})" if f.note else "")
    if f.flagged:
        return "attention_required set"
    if f.money:
        return "needs a human" + ("" if repair else " (--repair flags it)")
    if f.kind == reconcile.EXPIRY_MISMATCH:
        return "--repair takes the bank's value"
    return "checked again next run"


async def run(settings: config.Settings, *, repair: bool, rate: float, limit: int, as_json: bool) -> int:
    pool = await connect(settings)
    try:
        async with BankClient(settings.bank_url, timeout=BANK_TIMEOUT) as bank:
            report = await reconcile.run_reconciliation(pool, bank, rate_per_second=rate, limit=limit, repair=repair)
    finally:
        await pool.close()
    if as_json:
        emit_json(report.to_json())
        return EXIT_OK if report.ok else EXIT_ATTENTION
    print(
        f"reconciliation {report.run_id} ({'repair' if report.repair else 'report only'}): "
        f"{report.checked} payment(s) checked, {report.bank_calls} bank request(s) in {report.seconds:.1f} s"
        + (f", {report.moved} moved during the check (next run)" if report.moved else "")
    )
    if report.ok:
        print("no disagreements")
        return EXIT_OK
    print()
    print(
        table(
            ["PAYMENT", "KIND", "OBJECT", "ID", "OURS", "BANK", "ACTION"],
            (
                [
                    f.payment_id,
                    f.kind,
                    f.detail.get("object"),
                    f.detail.get("id") or f.detail.get("field"),
                    f.detail.get("ours"),
                    f.detail.get("bank", f.detail.get("code") or f.detail.get("outcome")),
                    _action(f, report.repair),
                ]
                for f in report.findings
            ),
        )
    )
    print()
    print(table(["KIND", "COUNT"], report.counts().items()))
    repaired = sum(f.repaired for f in report.findings)
    flagged = sum(f.flagged for f in report.findings)
    print(
        f"\n{len(report.findings)} finding(s): {repaired} repaired, {flagged} flagged for attention; "
        f"stored under run {report.run_id}" + ("" if report.repair else "; nothing else changed (no --repair)")
    )
    return EXIT_ATTENTION
