"""The files of deploy/: each parses, names only what mandrill has, and agrees with it.

Checked here: the sample TOML (every setting, loaded by the real loader and by a real
`mandrill run`), the Kubernetes manifests (fields, probes, grace periods, their TOML), the
systemd unit (fields; `systemd-analyze verify` where installed), the container file
(fields; its health check run against a real daemon), the Prometheus rules and the
Grafana dashboard (every metric they name is exported; `promtool check rules` where
installed). No image is built: no base image can be pulled on these machines.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mandrill import config
from mandrill.obs.collector import build_registry
from mandrill.obs.counters import Counters
from mandrill.obs.health import ServiceHealth
from mandrill.obs.lag import LagProbe
from tests.support.daemon import run_to_end, start
from tests.support.net import free_port

DEPLOY = Path(__file__).parent.parent / "deploy"
SAMPLE = DEPLOY / "mandrill.toml"
COMMENTED_KEY = re.compile(r"^# ([a-z_]+) = (.+)$", re.MULTILINE)


def grace_and_settle(values: dict[str, Any]) -> float:
    return float(values["grace"] + values["settle_timeout"])


# --- the sample configuration -----------------------------------------------------------


def test_the_sample_names_every_setting_once():
    text = SAMPLE.read_text()
    active = set(tomllib.loads(text)["mandrill"])
    commented = [name for name, _ in COMMENTED_KEY.findall(text)]
    assert len(commented) == len(set(commented))
    assert not active & set(commented)
    assert active | set(commented) == set(config.BY_NAME)


@pytest.mark.parametrize("command", ["run", "publish", "setup", "history", "replay"])
def test_the_sample_loads_for_every_command_and_holds_the_defaults(command):
    values = config.load(command, {}, {}, str(SAMPLE))
    defaults = config.load(command, {}, {})
    assert values == defaults


def test_the_sample_examples_are_valid_values(tmp_path, monkeypatch):
    """Uncommented, the examples load too: what the file suggests is accepted."""
    monkeypatch.setenv("NOTIFY_TOKEN", "secret")  # the header example's variable
    uncommented = COMMENTED_KEY.sub(r"\1 = \2", SAMPLE.read_text())
    path = tmp_path / "all.toml"
    path.write_text(uncommented)
    values = config.load("run", {}, {}, str(path))
    assert values["exclude"] == ("db-*", "*.prod.example.net")
    assert values["max_restarts"] == 10


@pytest.mark.slow
async def test_mandrill_runs_with_the_sample(tmp_path, backend_name):
    code, _, err = await run_to_end([
        "run", "--config", str(SAMPLE), "--backend", backend_name, "--count", "5",
        "--rate", "0", "--restart-latency", "0s", "--ledger", str(tmp_path / "l.db"),
        "--log-format", "json",
    ])
    assert code == 0, err


# --- Kubernetes ---------------------------------------------------------------------------


def documents(name: str) -> dict[str, dict[str, Any]]:
    with (DEPLOY / "kubernetes" / name).open() as file:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(file)}


def config_map_values(docs: dict[str, dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "mandrill.toml"
    path.write_text(docs["ConfigMap"]["data"]["mandrill.toml"])
    return config.load("run", {}, {}, str(path))


@pytest.mark.parametrize(("name", "workload"), [("mandrill.yaml", "Deployment"),
                                                ("fleet.yaml", "StatefulSet")])
def test_kubernetes_manifests(tmp_path, name, workload):
    docs = documents(name)
    values = config_map_values(docs, tmp_path)
    assert values["source"] == "pubsub"
    pod = docs[workload]["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    account = docs["ServiceAccount"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
        ".iam.gserviceaccount.com"
    )
    assert pod["terminationGracePeriodSeconds"] > grace_and_settle(values)
    assert pod["securityContext"]["runAsNonRoot"] is True

    # Probes on the port the daemon serves, on every interface.
    host, port = values["metrics_addr"].rsplit(":", 1)
    assert host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(port)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"

    # The config file the daemon reads is the ConfigMap's.
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["config"] == str(config_path.parent)
    assert volumes["config"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]

    # The ledger (SQLite) or the outcome journal (fleet) is on a persistent volume.
    kept = values["outcome_journal"] if workload == "StatefulSet" else values["ledger"]
    state = next(name for name, path in mounts.items() if kept.startswith(path + "/"))
    if workload == "Deployment":
        claim = volumes[state]["persistentVolumeClaim"]["claimName"]
        assert docs["PersistentVolumeClaim"]["metadata"]["name"] == claim
        assert docs[workload]["spec"]["strategy"]["type"] == "Recreate"
    else:
        templates = docs[workload]["spec"]["volumeClaimTemplates"]
        assert state in {t["metadata"]["name"] for t in templates}
        env = {e["name"]: e for e in container["env"]}
        assert "secretKeyRef" in env["MANDRILL_LEDGER"]["valueFrom"]


# --- systemd --------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "mandrill.service"


def unit_entries() -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key, []).append(value)
    return entries


def test_systemd_unit_fields():
    entries = unit_entries()
    defaults = config.load("run", {}, {})
    assert entries["KillSignal"] == ["SIGTERM"]
    assert config.duration(entries["TimeoutStopSec"][0]) > grace_and_settle(defaults)
    assert entries["StateDirectory"] == ["mandrill"]
    environment = " ".join(entries["Environment"])
    assert "MANDRILL_LEDGER=%S/mandrill/mandrill.db" in environment
    assert "XDG_STATE_HOME=%S" in environment
    assert entries["ExecStart"][0].endswith("mandrill run --config /etc/mandrill/mandrill.toml")
    assert entries["RestartPreventExitStatus"] == ["2"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    """With ExecStart pointed at this environment's mandrill (verify checks it exists)."""
    mandrill = Path(sys.executable).parent / "mandrill"
    unit = tmp_path / "mandrill.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/mandrill", str(mandrill)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if str(unit) in line] == []


# --- the container file ---------------------------------------------------------------------

CONTAINERFILE = DEPLOY / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_containerfile_fields():
    found = instructions()
    final = found[max(i for i, (word, _) in enumerate(found) if word == "FROM"):]
    values = {word: rest for word, rest in final}
    assert values["USER"].split(":")[0] not in ("0", "root")
    assert values["VOLUME"] == '["/var/lib/mandrill"]'
    env = dict(re.findall(r"(\w+)=(\S+)", values["ENV"]))
    assert env["MANDRILL_LEDGER"].startswith("/var/lib/mandrill/")
    assert env["XDG_STATE_HOME"] == "/var/lib/mandrill"
    assert values["STOPSIGNAL"] == "SIGTERM"
    assert "/healthz" in values["HEALTHCHECK"]
    assert f":{env['MANDRILL_METRICS_ADDR'].rsplit(':', 1)[1]}/healthz" in values["HEALTHCHECK"]
    assert json.loads(values["ENTRYPOINT"]) == ["mandrill"]
    root = DEPLOY.parent
    for word, rest in found:
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (root / source).exists(), source


@pytest.mark.slow
async def test_the_containers_health_check_asks_a_real_daemon(tmp_path, backend_name):
    healthcheck = dict(instructions())["HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    assert command[0] == "python"
    port = free_port()
    command = [sys.executable, *(arg.replace(":9464/", f":{port}/") for arg in command[1:])]
    daemon = await start([
        "run", "--backend", backend_name, "--metrics-addr", f"127.0.0.1:{port}",
        "--ledger", str(tmp_path / "l.db"), "--rate", "10",
    ])
    await daemon.wait_for_message("metrics on")
    assert (await anyio.run_process(command, check=False)).returncode == 0
    daemon.signal(signal.SIGTERM)
    assert await daemon.finish(30) == 0
    assert (await anyio.run_process(command, check=False)).returncode != 0


# --- Prometheus rules and the Grafana dashboard ---------------------------------------------

RULES = DEPLOY / "prometheus" / "mandrill-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "mandrill-dashboard.json"
#: Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (the identifiers that are no function,
    keyword, label or template variable)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr):
        if expr[match.end():].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def exported() -> dict[str, str]:
    """Every sample name a daemon's /metrics shows, with its family's name."""
    registry = build_registry(Counters(), in_flight=lambda: 0, in_flight_limit=256,
                              probe=LagProbe(), health=ServiceHealth(),
                              breaker_open=lambda: False)
    text = generate_latest(registry).decode()
    return {sample.name: family.name for family in text_string_to_metric_families(text)
            for sample in family.samples}


def rule_expressions() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        found += [target["expr"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            first = re.match(r"label_values\((\w+),", variable["query"]["query"])
            assert first is not None
            found.append(first.group(1))
    return found


def test_metric_names_are_found_in_promql():
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x=~"$i", y="b c"}[5m])))'
        " > 0.5 * on(instance) b_total or up == 0"
    ) == {"a_bucket", "b_total", "up"}


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_deploy_files_name_only_exported_metrics(source):
    expressions = rule_expressions() if source == "rules" else dashboard_expressions()
    named = set().union(*map(metric_names, expressions))
    assert named
    assert named - set(exported()) - PROMETHEUS_OWN == set()


def test_the_dashboard_shows_every_mandrill_metric():
    named = set().union(*map(metric_names, dashboard_expressions()))
    families = {family for sample, family in exported().items() if sample in named}
    mandrill = {family for family in exported().values() if family.startswith("mandrill_")}
    assert mandrill - families == set()


def test_alerts_cover_what_an_operator_must_know():
    named = set().union(*map(metric_names, rule_expressions()))
    for metric in ("mandrill_ready", "mandrill_messages_dead_lettered_total",
                   "mandrill_restarts_total", "mandrill_ledger_unavailable_total",
                   "mandrill_messages_in_flight", "mandrill_message_latency_seconds_bucket",
                   "mandrill_event_loop_stalls_total"):
        assert metric in named


def test_the_dashboard_panels_do_not_overlap():
    dashboard = json.loads(DASHBOARD.read_text())
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24
        area = {(x, y) for x in range(box["x"], box["x"] + box["w"])
                for y in range(box["y"], box["y"] + box["h"])}
        assert not cells & area, panel["title"]
        cells |= area
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) missing")
def test_promtool_accepts_the_rules_and_the_dashboards_queries(tmp_path):
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # The dashboard's queries, as recording rules: promtool parses each one.
    recording = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": expr.replace("$instance", ".*")}
        for i, expr in enumerate(dashboard_expressions())
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(recording))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
