"""Rotating the card key: every card in the vault moved to the newest key.

    report = await reseal_all(pool, vault)      # gatewayctl rekey-cards

A rotation (README, "Rotating the card key"): put the new key first in
CARD_ENCRYPTION_KEYS, keep the old ones after it and restart the processes;
from then on new cards are sealed under the new key and the old cards still
open. reseal_all then seals every card still under an older key under the new
one, a small batch per transaction (the rows locked FOR UPDATE SKIP LOCKED,
so a worker recording an outcome waits at most one batch, and a card a worker
holds is left for the next run). Once it reports no card left under an older
key, that key can be dropped from the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from gateway import store
from gateway.cards import CardVault, SealedCard, VaultError

DEFAULT_BATCH = 100


@dataclass
class Resealed:
    key_id: str  # the newest key: every card resealed is under it
    resealed: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (payment id, key id): cannot be opened
    left: dict[str, int] = field(default_factory=dict)  # older key id -> cards still sealed under it


async def reseal_all(pool: asyncpg.Pool, vault: CardVault, *, batch: int = DEFAULT_BATCH) -> Resealed:
    """Seal every card not under the vault's newest key under it; what is left says what the
    run could not move (unreadable cards, cards locked by a worker meanwhile)."""
    report = Resealed(vault.newest_key_id)
    after = ""
    while True:
        async with pool.acquire() as conn, conn.transaction():
            rows = await store.lock_cards_to_reseal(conn, key_id=vault.newest_key_id, after=after, limit=batch)
            if not rows:
                break
            resealed = {}
            for row in rows:
                payment_id = row["payment_id"]
                try:
                    sealed = vault.reseal(payment_id, SealedCard(row["key_id"], bytes(row["sealed"])))
                except VaultError:
                    report.unreadable.append((payment_id, row["key_id"]))
                    continue
                resealed[payment_id] = sealed.blob
            await store.reseal_cards(conn, key_id=vault.newest_key_id, sealed=resealed)
        report.resealed += len(resealed)
        after = rows[-1]["payment_id"]
    counts = await store.cards_by_key(pool)
    report.left = {key_id: n for key_id, n in counts.items() if key_id != vault.newest_key_id}
    return report
