"""The RabbitMQ cluster and the PostgreSQL formation of scripts/ha/ha.sh, for the drills.

`ha` brings them up once per session (installing the Debian packages if missing) unless they
already run (GATEWAY_HA_DIR set by `scripts/ha/ha.sh env`), and takes down what it brought up.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.ha.engines import Engines

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ha" / "ha.sh"


@pytest.fixture(scope="session")
def ha():
    started = "GATEWAY_HA_DIR" not in os.environ
    if started:
        subprocess.run(["bash", str(SCRIPT), "up"], check=True, timeout=600, stdout=subprocess.DEVNULL)
    env = subprocess.run(["bash", str(SCRIPT), "env"], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in env.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        values[name] = value.split("  #")[0].strip().strip("'")
    old = os.environ.get("RABBITMQ_NODENAME")
    os.environ["RABBITMQ_NODENAME"] = values["RABBITMQ_NODENAME"]  # rabbitmqctl: the tests' vhosts
    try:
        yield Engines(values["DATABASE_URL"], values["AMQP_URL"], Path(values["GATEWAY_HA_DIR"]), SCRIPT)
    finally:
        if old is None:
            os.environ.pop("RABBITMQ_NODENAME", None)
        else:
            os.environ["RABBITMQ_NODENAME"] = old
        if started:
            subprocess.run(["bash", str(SCRIPT), "down"], check=False, timeout=300, stdout=subprocess.DEVNULL)
