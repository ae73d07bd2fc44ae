"""`make container-check`: the image built and run on this machine with podman.

Not part of `make test`. Each step is safe to repeat:
1. the host: podman, runc, catatonit and debootstrap (apt), and
   /etc/containers/containers.conf choosing runc and no default ulimits
   (crun fails under this machine's cgroups);
2. the base image the Dockerfile names (python:3.11-slim-bookworm), where it
   is missing: no registry answers here, so it is built from Debian bookworm
   (debootstrap from the mirror apt uses) plus python3.11, laid out like the
   official image (python at /usr/local/bin), and imported under that name;
3. `podman build` of the Dockerfile as it is; `podman-compose config`
   parses compose.yaml;
4. a private database and RabbitMQ vhost; from the image, on the host
   network: `gatewayctl migrate`, then mockbank, gateway-api, gateway-relay
   and gateway-worker, each the program compose.yaml names with the
   environment compose.yaml gives it. Only the addresses (PostgreSQL,
   RabbitMQ, the bank, free ports) are this machine's, and the bank's
   FAILURE_RATE is 0 so that the demo's outcome does not depend on chance;
5. compose.yaml's healthchecks of mockbank and the API, run in their
   containers; the `make run` demo (scripts/devstack.py) against the
   containerised API, and its outcome read back through the API;
6. every process stopped with SIGTERM and expected to exit 0; containers,
   database and vhost removed, on failure too.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.config import DEV_API_KEYS
from harness.procs import free_port
from harness.services import (
    LOCAL_AMQP_URL,
    LOCAL_DATABASE_URL,
    create_database,
    create_vhost,
    delete_vhost,
    drop_database,
)
from scripts.devstack import API_ADMIN_PORT, DEV_KEY, demo

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IMAGE = "ficmart-gateway:dev"  # the name compose.yaml gives the image it builds
HOST_TOOLS = ("podman", "runc", "catatonit", "debootstrap")  # each the name of its apt package too
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
CONTAINERS_CONF_TEXT = """\
# Written by `make container-check`: crun and the default ulimits fail under
# this machine's cgroups; runc works.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
"""
# The base image this script can stand in for, and how.
STAND_IN = "python:3.11-slim-bookworm"
STAND_IN_PACKAGES = ("python3.11", "python3.11-venv", "ca-certificates")
# Egress here goes through a TLS-inspecting proxy whose CA only the host's
# bundle trusts; pip in the build (Debian's, which reads the system bundle)
# sees it through a read-only mount. Elsewhere the bundle is the usual one.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APP_SERVICES = ("mockbank", "migrate", "api", "relay", "worker", "webhooks")
# What scripts/devstack.py's demo leaves behind: one payment authorized,
# captured and refunded, one declined, both for this customer.
DEMO_CUSTOMER = "cus_demo"


class CheckFailed(Exception):
    """A step failed; the message says which and why."""


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, output captured; on failure raise CheckFailed with that output."""
    result = subprocess.run(list(argv), capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise CheckFailed(f"`{' '.join(argv)}` exited with {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


# ------------------------------------------------------------------- host ----
def ensure_host() -> None:
    missing = [tool for tool in HOST_TOOLS if not shutil.which(tool)]
    if missing:
        if os.geteuid() != 0:
            raise CheckFailed(f"missing {', '.join(missing)}: apt-get install {' '.join(missing)}")
        print(f"installing {', '.join(missing)} (apt)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", *missing], env=env)
    if not CONTAINERS_CONF.exists():
        print(f"writing {CONTAINERS_CONF}")
        CONTAINERS_CONF.write_text(CONTAINERS_CONF_TEXT)
        return
    conf = tomllib.loads(CONTAINERS_CONF.read_text())
    if conf.get("containers", {}).get("default_ulimits") != [] or conf.get("engine", {}).get("runtime") != "runc":
        print(f"note: {CONTAINERS_CONF} is left as it is; should podman fail, this machine needed:")
        print(CONTAINERS_CONF_TEXT)


# ------------------------------------------------------------- base image ----
def dockerfile_base_image() -> str:
    """The image the Dockerfile builds FROM: the default of its PYTHON_IMAGE argument."""
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    if match is None:
        raise CheckFailed("the Dockerfile has no `ARG PYTHON_IMAGE=...` line")
    return match.group(1)


def bookworm_sources() -> list[tuple[str, str]]:
    """(archive URI, suite) of every bookworm suite apt uses here (bookworm, -updates, -security)."""
    sources: list[tuple[str, str]] = []
    apt = Path("/etc/apt")
    for path in sorted(apt.glob("sources.list.d/*.sources")):  # deb822 stanzas
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith(("#", " ", "\t")):
                    fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and "main" in fields.get("components", []):
                sources += [(fields["uris"][0], s) for s in fields.get("suites", []) if s.startswith("bookworm")]
    for path in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))]:  # one-line entries
        if path.exists():
            entries = re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(bookworm\S*)\s.*\bmain\b", path.read_text(), re.M)
            sources += [(entry.group(1), entry.group(2)) for entry in entries]
    if not any(suite == "bookworm" for _, suite in sources):
        raise CheckFailed("apt here has no Debian bookworm source to debootstrap from")
    return sources


def ensure_base_image(name: str) -> None:
    if subprocess.run(["podman", "image", "exists", name]).returncode == 0:
        print(f"{name}: present")
        return
    if name != STAND_IN:
        raise CheckFailed(f"the Dockerfile builds FROM {name}, which is not here; this script can only make {STAND_IN}")
    sources = bookworm_sources()
    mirror = next(uri for uri, suite in sources if suite == "bookworm")
    print(f"{name}: not here and no registry to pull from; building it from Debian bookworm ({mirror})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="ficmart-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], env=env)
        (rootfs / "etc/apt/sources.list").write_text("".join(f"deb {uri} {suite} main\n" for uri, suite in sources))
        install = " ".join(STAND_IN_PACKAGES)
        run(
            ["chroot", str(rootfs), "sh", "-c",
             f"apt-get update -q && apt-get install -y -q --no-install-recommends {install}"
             " && apt-get clean && rm -rf /var/lib/apt/lists/*"],
            env=env,
        )  # fmt: skip
        # The official image's layout: `python` and `python3` in /usr/local/bin.
        for link in ("python3", "python"):
            (rootfs / "usr/local/bin" / link).symlink_to("/usr/bin/python3.11")
        (rootfs / "etc/resolv.conf").unlink(missing_ok=True)  # the runtime provides its own
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(
            ["podman", "import",
             "--change", "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", "ENV LANG=C.UTF-8",
             "--change", 'CMD ["python3"]',
             "-", f"docker.io/library/{name}"],
            stdin=tar.stdout,
        )  # fmt: skip
        if tar.wait() != 0:
            raise CheckFailed(f"tar of {rootfs} exited with {tar.returncode}")
    print(f"{name}: built and imported")


# ------------------------------------------------------ image and compose ----
def build_image() -> None:
    argv = ["podman", "build", "--network=host", "--pull=never", "-t", IMAGE, "-f", "Dockerfile"]
    if HOST_CA_BUNDLE.exists():
        argv += ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    run([*argv, "."], cwd=ROOT)
    size = run(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE]).stdout.strip()
    print(f"{IMAGE}: built ({int(size) // 2**20} MiB)")


def compose_services() -> dict[str, dict[str, Any]]:
    """compose.yaml as podman-compose reads it (variables filled in); checks its shape.

    compose.yaml has no defaults for the secrets: the check gives them as a developer's .env
    would, in development mode (the demo uses the documented key) with a card key of its own."""
    secrets = {
        "GATEWAY_ENV": "development",
        "GATEWAY_API_KEYS": DEV_API_KEYS,
        "CARD_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
    }
    config = run(
        [str(BIN / "podman-compose"), "-f", "compose.yaml", "config"], cwd=ROOT, env={**os.environ, **secrets}
    ).stdout
    services: dict[str, dict[str, Any]] = yaml.safe_load(config)["services"]
    expected = {"postgres", "rabbitmq", *APP_SERVICES}
    if set(services) != expected:
        raise CheckFailed(f"compose.yaml has services {sorted(services)}, expected {sorted(expected)}")
    for name in APP_SERVICES:
        if services[name].get("image") != IMAGE:
            raise CheckFailed(f"compose.yaml: service {name} runs {services[name].get('image')}, not {IMAGE}")
    build = services["migrate"].get("build", {})
    if Path(build.get("context", "")).resolve() != ROOT or build.get("dockerfile") != "Dockerfile":
        raise CheckFailed(f"compose.yaml: migrate does not build ./Dockerfile ({build})")
    print(f"compose.yaml: valid, services {', '.join(services)}")
    return services


# ------------------------------------------------------------ the system ----
class Containers:
    """The containers of one check, named after it, removed by remove_all().

    Each runs the program compose.yaml names for its service, with the
    environment compose.yaml gives it, laid under this machine's values.
    """

    def __init__(self, check_id: str, services: dict[str, dict[str, Any]], env_dir: Path) -> None:
        self.check_id = check_id
        self.services = services
        self.env_dir = env_dir
        self.names: list[str] = []

    def _argv(self, service: str, port: int | None, local: Mapping[str, str]) -> list[str]:
        spec = self.services[service]
        env = {key: "" if value is None else str(value) for key, value in spec.get("environment", {}).items()}
        # An env file keeps the card key off command lines; compose's empty
        # values ("empty means the default") stay empty, as compose passes them.
        env_file = self.env_dir / f"{service}.env"
        env_file.write_text("".join(f"{key}={value}\n" for key, value in (env | dict(local)).items()))
        command = list(spec["command"])
        if port is not None:  # host network: the loopback, on a free port
            command = [command[0], "--host", "127.0.0.1", "--port", str(port)]
        name = self.name(service)
        self.names.append(name)
        return ["--name", name, "--network=host", "--init", f"--env-file={env_file}", IMAGE, *command]

    def name(self, service: str) -> str:
        return f"ficmart-check-{self.check_id}-{service}"

    def run_once(self, service: str, env: Mapping[str, str]) -> None:
        run(["podman", "run", *self._argv(service, None, env)])

    def start(self, service: str, env: Mapping[str, str], port: int | None = None) -> str:
        argv = self._argv(service, port, env)
        run(["podman", "run", "--detach", *argv])
        return argv[1]

    def healthcheck(self, service: str, port: int, compose_port: int | None = None) -> None:
        """compose.yaml's healthcheck of the service, run in its container, aimed at the port it was
        given instead of `compose_port` (by default the service's --port)."""
        spec = self.services[service]
        kind, *test = spec["healthcheck"]["test"]
        if kind != "CMD":
            raise CheckFailed(f"compose.yaml: {service}'s healthcheck is {kind}, expected CMD")
        if compose_port is None:
            compose_port = int(spec["command"][spec["command"].index("--port") + 1])
        run(["podman", "exec", self.name(service), *(arg.replace(f":{compose_port}/", f":{port}/") for arg in test)])

    def running(self, name: str) -> bool:
        state = subprocess.run(
            ["podman", "inspect", "--format", "{{.State.Running}}", name], capture_output=True, text=True
        )
        return state.stdout.strip() == "true"

    def stop(self, name: str) -> int:
        """SIGTERM (through the init process), then the exit code."""
        run(["podman", "stop", "--time", "45", name])
        return int(run(["podman", "inspect", "--format", "{{.State.ExitCode}}", name]).stdout.strip())

    def print_logs(self) -> None:
        for name in self.names:
            # All of it, cut here: podman 4.3's --tail can return nothing for a short log.
            logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
            tail = (logs.stdout + logs.stderr).splitlines()[-25:]
            print(f"--- {name} (last lines) ---", *tail, sep="\n")

    def remove_all(self) -> None:
        if self.names:
            subprocess.run(["podman", "rm", "--force", "--ignore", *self.names], capture_output=True)


async def wait_ready(
    session: aiohttp.ClientSession, containers: Containers, names: Sequence[str], url: str, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in names:
            if not containers.running(name):
                raise CheckFailed(f"container {name} exited")
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    raise CheckFailed(f"{url} was not ready within {timeout:g} s")


def wait_consumer(containers: Containers, worker: str, vhost: str, timeout: float = 60) -> None:
    """Until the worker consumes from its vhost (it has no HTTP endpoint to ask)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not containers.running(worker):
            raise CheckFailed(f"container {worker} exited")
        listing = run(["rabbitmqctl", "-q", "list_consumers", "-p", vhost, "--no-table-headers", "queue_name"])
        consumers = listing.stdout.split()
        if consumers:
            print(f"worker consuming from {', '.join(sorted(set(consumers)))}")
            return
        time.sleep(1)
    raise CheckFailed(f"no consumer in vhost {vhost} within {timeout:g} s")


async def check_outcome(session: aiohttp.ClientSession, api: str) -> None:
    headers = {"Authorization": f"Bearer {DEV_KEY}"}
    async with session.get(f"{api}/v1/payments?customer_id={DEMO_CUSTOMER}&limit=10", headers=headers) as resp:
        if resp.status != 200:
            raise CheckFailed(f"listing the demo's payments: HTTP {resp.status} {await resp.text()}")
        payments = (await resp.json())["data"]
    statuses = sorted(payment["status"] for payment in payments)
    if statuses != ["declined", "refunded"]:
        raise CheckFailed(f"the demo's payments ended {statuses}, expected ['declined', 'refunded']")
    refunded = next(payment for payment in payments if payment["status"] == "refunded")
    steps = [entry["status"] for entry in refunded["history"]]
    if [s for s in steps if s in ("authorized", "captured", "refunded")] != ["authorized", "captured", "refunded"]:
        raise CheckFailed(f"the refunded payment's history is {steps}")
    if any(payment["attention_required"] for payment in payments):
        raise CheckFailed("a demo payment needs attention")
    print(f"outcome: {' -> '.join(steps)}; and one declined")


@contextmanager
def private_vhost() -> Iterator[tuple[str, str]]:
    """(URL, name) of a new vhost; unlike the tests, the check cannot fall back to a shared one."""
    url, vhost = create_vhost(os.environ.get("AMQP_URL", LOCAL_AMQP_URL))
    if vhost is None:
        raise CheckFailed("no private RabbitMQ vhost: rabbitmqctl is needed, next to a local RabbitMQ")
    try:
        yield url, vhost
    finally:
        delete_vhost(vhost)


async def run_system(services: dict[str, dict[str, Any]]) -> None:
    check_id = uuid.uuid4().hex[:8]
    admin_url = os.environ.get("DATABASE_URL", LOCAL_DATABASE_URL)
    bank_port, api_port, admin_port = free_port(), free_port(), free_port()
    bank, api = f"http://127.0.0.1:{bank_port}", f"http://127.0.0.1:{api_port}"
    database_url = await create_database(admin_url)
    try:
        with private_vhost() as (amqp_url, vhost), tempfile.TemporaryDirectory(prefix="ficmart-check-") as tmp:
            print(f"database {database_url.rsplit('/', 1)[1]}, vhost {vhost}, mockbank {bank}, API {api}")
            containers = Containers(check_id, services, Path(tmp))
            gateway = {"DATABASE_URL": database_url, "AMQP_URL": amqp_url, "BANK_URL": bank}
            try:
                step(
                    "gatewayctl migrate, then mockbank, gateway-relay, gateway-worker, gateway-api and gateway-webhooks"
                )
                containers.run_once("migrate", gateway)
                started = [
                    containers.start("mockbank", {"FAILURE_RATE": "0"}, port=bank_port),
                    # Host network: their metrics ports too must be free ones.
                    containers.start("relay", {**gateway, "RELAY_METRICS_PORT": str(free_port())}),
                    containers.start("worker", {**gateway, "WORKER_METRICS_PORT": str(free_port())}),
                    containers.start("api", {**gateway, "API_ADMIN_PORT": str(admin_port)}, port=api_port),
                    containers.start("webhooks", {**gateway, "WEBHOOK_METRICS_PORT": str(free_port())}),
                ]
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as session:
                    await wait_ready(session, containers, started, f"{bank}/health")
                    await wait_ready(session, containers, started, f"http://127.0.0.1:{admin_port}/readyz")
                    wait_consumer(containers, started[2], vhost)
                    containers.healthcheck("mockbank", bank_port)
                    containers.healthcheck("api", admin_port, compose_port=API_ADMIN_PORT)
                    print("compose.yaml's healthchecks of mockbank and api pass")
                    step(f"the demo (scripts/devstack.py) against {api}")
                    await demo(session, api)
                    step("outcome, read back through the API")
                    await check_outcome(session, api)
                step("SIGTERM to every process")
                codes = {name: containers.stop(name) for name in reversed(started)}
                print(", ".join(f"{name.rsplit('-', 1)[1]} exited {code}" for name, code in codes.items()))
                if any(codes.values()):
                    raise CheckFailed(f"a process did not exit 0 on SIGTERM: {codes}")
            except BaseException:
                containers.print_logs()
                raise
            finally:
                containers.remove_all()
    finally:
        await drop_database(admin_url, database_url)


async def main() -> int:
    began = time.monotonic()
    try:
        step("host: podman, runc, catatonit, debootstrap, containers.conf")
        ensure_host()
        base = dockerfile_base_image()
        step(f"base image {base}")
        ensure_base_image(base)
        step(f"podman build -t {IMAGE} (the Dockerfile as it is)")
        build_image()
        step("podman-compose config")
        services = compose_services()
        await run_system(services)
    except CheckFailed as failure:
        print(f"\ncontainer-check FAILED after {time.monotonic() - began:.0f} s: {failure}", file=sys.stderr)
        return 1
    print(f"\ncontainer-check passed in {time.monotonic() - began:.0f} s; containers, database and vhost removed")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
