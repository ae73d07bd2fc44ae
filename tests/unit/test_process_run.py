"""gateway.process: the garbage collector tuned for a server. process.run sets it before serve()
starts, and process.started() freezes what start-up made (each case in a child process, so that
this one keeps Python's defaults)."""

from __future__ import annotations

import subprocess
import sys

from gateway.process import GC_YOUNG_THRESHOLD

PROBE = """
import gc
from gateway import process

async def serve(stop):
    print(gc.get_threshold()[0], gc.get_freeze_count() > 0, gc.isenabled())
    process.started()
    print(gc.get_freeze_count() > 0)

process.run(serve)
"""


def test_serve_runs_with_fewer_young_collections_and_start_up_objects_frozen_once_started() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(GC_YOUNG_THRESHOLD), "False", "True", "True"]
