"""deploy/: the Grafana dashboard queries only metrics some process exports, through the
provisioned datasource, and Prometheus scrapes each process on the port it serves."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway import config
from gateway.api.admin import AdminSettings
from gateway.api.app import create_app
from gateway.api.routes import STATE
from worker.consumer import Worker
from worker.relay import Relay
from worker.settings import RelaySettings, WorkerSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"

# The sample names a family exposes, by its type (prometheus_client strips _total from a
# counter's family name).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
}
_METRIC = re.compile(r"\b(?:gateway|process)_[a-z0-9_]+\b")


def exported(registry: CollectorRegistry) -> set[str]:
    return {family.name + suffix for family in registry.collect() for suffix in _SUFFIXES[family.type]}


@pytest.fixture(scope="module")
def exported_names() -> dict[str, set[str]]:
    """Every sample name each process can expose, from the objects the processes build."""
    settings = config.parse(
        {"CARD_ENCRYPTION_KEY": base64.b64encode(b"k" * 32).decode(), "GATEWAY_ENV": "development"}, uses_card_key=True
    )
    app = create_app(settings)
    return {
        "gateway-api": exported(app[STATE].registry),
        "gateway-relay": exported(Relay(settings.database_url, settings.amqp_url).metrics.registry),
        "gateway-worker": exported(Worker(settings).metrics.registry),
    }


def expressions(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in expressions(value)]
    if isinstance(node, list):
        return [e for value in node for e in expressions(value)]
    return []


def test_there_is_a_dashboard():
    assert [path.name for path in DASHBOARDS] == ["gateway.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_a_dashboard_queries_is_exported_by_some_process(path, exported_names):
    queries = expressions(json.loads(path.read_text()))
    assert len(queries) >= 20
    everything = set().union(*exported_names.values())
    used = {name for query in queries for name in _METRIC.findall(query)}
    assert used - everything == set(), f"queried but exported by no process: {sorted(used - everything)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_the_dashboard_shows_what_the_issue_asks_for(path):
    """Payments by status, submit-to-final, bank latency and errors by operation, in-flight calls,
    outbox backlog, dead letters, parked and flagged payments, breaker state."""
    queries = " ".join(expressions(json.loads(path.read_text())))
    for metric in (
        "gateway_payment_events_total",
        "gateway_submit_to_final_seconds_bucket",
        "gateway_bank_request_seconds_bucket",
        "gateway_bank_request_seconds_count",
        "gateway_bank_requests_in_flight",
        "gateway_outbox_unsent",
        "gateway_dead_letters",
        "gateway_operations_parked",
        "gateway_payments_flagged",
        "gateway_bank_circuit_open",
    ):
        assert metric in queries, metric


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_uses_the_provisioned_datasource(path):
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    dashboard = json.loads(path.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


def test_prometheus_scrapes_each_process_on_its_default_port():
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    ports = {
        "gateway-api": AdminSettings.model_fields["port"].default,
        "gateway-relay": RelaySettings.model_fields["metrics_port"].default,
        "gateway-worker": WorkerSettings.model_fields["metrics_port"].default,
    }
    assert set(jobs) == set(ports)
    for name, port in ports.items():
        (discovery,) = jobs[name]["dns_sd_configs"]
        assert discovery["port"] == port and discovery["type"] == "A"
        assert discovery["names"] == [name.removeprefix("gateway-")]  # the compose service
