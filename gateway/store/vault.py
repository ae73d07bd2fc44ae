"""The card vault's key rotation: cards resealed under the newest key, and cards counted per key.

gateway/ops/cardkeys.py (`gatewayctl rekey-cards`) reseals in batches. SQL in
gateway/sql/vault.sql.
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from gateway.store.loader import SQL_DIR, Connection, Executor, all_rows, load

_sql = load(SQL_DIR / "vault.sql")


async def lock_cards_to_reseal(db: Connection, *, key_id: str, after: str, limit: int) -> list[asyncpg.Record]:
    """payment_id, key_id and sealed of up to `limit` cards not under `key_id`, payment ids
    after `after`, locked (SKIP LOCKED)."""
    return await all_rows(_sql.lock_cards_to_reseal, db, key_id=key_id, after=after, limit=limit)


async def reseal_cards(db: Connection, *, key_id: str, sealed: Mapping[str, bytes]) -> None:
    """The cards (payment id -> sealed) stored again, under `key_id`."""
    await _sql.reseal_cards(db, key_id=key_id, payment_ids=list(sealed), sealed=list(sealed.values()))


async def cards_by_key(db: Executor) -> dict[str, int]:
    """Key id -> how many cards are sealed under it."""
    return {r["key_id"]: r["cards"] for r in await all_rows(_sql.cards_by_key, db)}
