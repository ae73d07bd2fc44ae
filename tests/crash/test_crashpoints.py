"""The kill switch itself (gateway/crashpoints.py): parsing, and a real SIGKILL at the right pass."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from gateway import crashpoints
from gateway.crashpoints import CrashPointError, parse

_PROBE = """
import sys
from gateway.crashpoints import crash_point
for i in range(1, 11):
    print(i, flush=True)
    crash_point("worker.after_bank")
    crash_point("worker.after_record")
"""


def _probe(value: str | None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if value is not None:
        env["GATEWAY_CRASH_POINTS"] = value
    return subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_unset_or_empty_is_off():
    assert parse(None) is None and parse("") is None and parse(" , ") is None


def test_both_forms_parse():
    assert parse("worker.after_bank:0.05, relay.after_publish:@20") == {
        "worker.after_bank": ("p", 0.05),
        "relay.after_publish": ("nth", 20),
    }


@pytest.mark.parametrize(
    "raw",
    [
        "nope:0.1",
        "api.after_commit",
        "api.after_commit:",
        "api.after_commit:0",
        "api.after_commit:1.5",
        "api.after_commit:@0",
        "api.after_commit:@x",
        "api.after_commit:abc",
    ],
)
def test_bad_values_are_refused(raw):
    with pytest.raises(CrashPointError, match="GATEWAY_CRASH_POINTS"):
        parse(raw)


def test_this_test_process_runs_with_the_switch_off():
    assert crashpoints._POINTS is None
    crashpoints.crash_point("worker.after_bank")  # returns; nothing else happens


def test_nth_pass_kills_the_process_there_with_a_line_on_stderr():
    result = _probe("worker.after_record:@3")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["1", "2", "3"]
    assert result.stderr.startswith("gateway crash point: worker.after_record pid=")


def test_probability_one_kills_at_the_first_pass():
    result = _probe("worker.after_bank:1")
    assert result.returncode == -signal.SIGKILL and result.stdout.split() == ["1"]


def test_unset_runs_to_the_end_and_a_bad_value_exits_2():
    assert _probe(None).returncode == 0 and _probe(None).stdout.split()[-1] == "10"
    bad = _probe("worker.after_everything:0.5")
    assert bad.returncode == 2 and "GATEWAY_CRASH_POINTS" in bad.stderr and "Traceback" not in bad.stderr
