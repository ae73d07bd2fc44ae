"""The API's submit statement by batch size: wall time per batch and per row, on the server
as it is (run it on an idle machine; compare runs back to back).

Under overload the API's batcher sends hundreds of requests in one statement; a plan whose
cost grows faster than the batch (a nested loop between the batch's own rows) makes every
accepted answer wait for it. `.venv/bin/python -m bench.batch_sizes [size ...]`
(default 16 64 256), each size `--rounds` times in a throwaway database, the median printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import asyncpg

from bench.ceilings import Template
from gateway import db, store
from harness import services


async def measure(admin_url: str, sizes: list[int], rounds: int) -> dict[int, float]:
    """Batch size -> median ms per batch."""
    template = Template()
    dsn = await services.create_database(admin_url)
    try:
        await db.migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            medians = {}
            for size in sizes:
                times = []
                for _ in range(rounds + 1):  # the first plans and warms: not counted
                    batch = [template.submission() for _ in range(size)]
                    started = time.perf_counter()
                    rows = await store.submit_authorizations(conn, submissions=batch)
                    times.append((time.perf_counter() - started) * 1000)
                    assert all(row["inserted"] for row in rows), "a batch was not recorded"
                ordered = sorted(times[1:])
                medians[size] = ordered[len(ordered) // 2]
            return medians
        finally:
            await conn.close()
    finally:
        await services.drop_database(admin_url, dsn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="*", type=int, default=[16, 64, 256])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        admin_url, _ = services.server_urls(stack)
        medians = asyncio.run(measure(admin_url, args.sizes, args.rounds))
    for size, ms in medians.items():
        print(f"batch of {size:4d}: {ms:6.1f} ms per batch, {1000 * ms / size:5.0f} us per row (median)")


if __name__ == "__main__":
    main()
