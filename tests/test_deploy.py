"""The files of deploy/: each parses, names only what mandrill has, and agrees with it.

Checked here: the sample TOML (every setting, loaded by the real loader and by a real
`mandrill run`), the Kubernetes manifests (fields, probes, grace periods; a real daemon
started from each one's container arguments, environment and ConfigMap), the systemd unit
(fields; `systemd-analyze verify` and `security`; its sandbox, applied without systemd,
around a real `mandrill run`), the container file (fields; its health check run against a
real daemon), the Prometheus rules and the Grafana dashboard (every metric they name is
exported, none names a scrape job; `promtool check rules` and `promtool test rules` on
tests/prometheus/). No image is built: no base image can be pulled on these machines. The
tools come from tests.support.tools: a missing one skips its test, or fails it under CI=true.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import anyio
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mandrill import config
from mandrill.google_cloud import PROJECT_VARIABLES
from mandrill.obs.collector import build_registry
from mandrill.obs.counters import Counters
from mandrill.obs.health import ServiceHealth
from mandrill.obs.lag import LagProbe
from mandrill.version import DISTRIBUTION, version
from tests.support import tools
from tests.support.constraints import HEADER, runtime_dependencies
from tests.support.daemon import run_to_end, start
from tests.support.metadata import FakeMetadataServer
from tests.support.net import free_port
from tests.support.systemd import NotifySocket, has

DEPLOY = Path(__file__).parent.parent / "deploy"
SAMPLE = DEPLOY / "mandrill.toml"
COMMENTED_KEY = re.compile(r"^# ([a-z_]+) = (.+)$", re.MULTILINE)


def grace_and_settle(values: dict[str, Any]) -> float:
    return float(values["grace"] + values["settle_timeout"])


# --- the distribution's name ----------------------------------------------------------------

#: "pip install mandrill" (or mandrill[extra], mandrill==1.0): the public index's mandrill,
#: an unrelated mail client. The project's distribution is mayhem-mandrill.
INSTALLS_MANDRILL = re.compile(r"pip3? install\b[^\n&|;]*?(?<![\w./-])mandrill(?![\w./-])")


def test_the_distribution_is_mayhem_mandrill_and_installs_the_mandrill_command():
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION == "mayhem-mandrill"
    installed = importlib.metadata.distribution(DISTRIBUTION)
    assert installed.metadata["Name"] == "mayhem-mandrill"
    scripts = {e.name: e.value for e in installed.entry_points.select(group="console_scripts")}
    assert scripts == {"mandrill": "mandrill.cli:main"}
    assert version() == installed.version


def test_installing_mandrill_is_recognized():
    assert INSTALLS_MANDRILL.search("RUN pip install --no-cache-dir mandrill \\")
    assert INSTALLS_MANDRILL.search("#   pip install mandrill[test] (into /opt/mandrill)")
    assert INSTALLS_MANDRILL.search("pip install mandrill==1.0.60")
    assert not INSTALLS_MANDRILL.search("/opt/mandrill/bin/pip install mayhem-mandrill")
    assert not INSTALLS_MANDRILL.search("pip install --find-links /wheels/mandrill x")
    assert not INSTALLS_MANDRILL.search("pip install -e . && mandrill run")


def test_no_deploy_file_installs_the_other_mandrill():
    files = [DEPLOY.parent / "pyproject.toml", DEPLOY.parent / "tox.ini"]
    files += [path for path in DEPLOY.rglob("*") if path.is_file()]
    said = {str(path): INSTALLS_MANDRILL.findall(path.read_text()) for path in files}
    assert {path: found for path, found in said.items() if found} == {}
    assert "pip install mayhem-mandrill" in (DEPLOY / "systemd" / "mandrill.service").read_text()


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


WORKLOADS = {"mandrill.yaml": "Deployment", "fleet.yaml": "StatefulSet"}


def pod_labels(docs: dict[str, dict[str, Any]], workload: str) -> dict[str, str]:
    labels: dict[str, str] = docs[workload]["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize(("name", "workload"), WORKLOADS.items())
def test_kubernetes_service_and_pod_monitor_reach_the_metrics_port(name, workload):
    docs = documents(name)
    labels = pod_labels(docs, workload)
    pod = docs[workload]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    service = docs["Service"]
    assert selects(service["spec"]["selector"], labels)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in ports
    assert port["port"] == ports[port["targetPort"]]
    if workload == "StatefulSet":
        assert docs[workload]["spec"]["serviceName"] == service["metadata"]["name"]

    monitor = docs["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(monitor["spec"]["selector"]["matchLabels"], labels)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in ports
    assert endpoint["path"] == pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports[endpoint["port"]])


@pytest.mark.parametrize(("name", "workload"), WORKLOADS.items())
def test_kubernetes_pods_get_no_api_token(name, workload):
    docs = documents(name)
    assert docs["ServiceAccount"]["automountServiceAccountToken"] is False
    assert docs[workload]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_kubernetes_selectors_take_their_own_pods_only():
    """Both files in one namespace: no selector of one takes the other's pods."""
    for name, workload in WORKLOADS.items():
        docs = documents(name)
        own = pod_labels(docs, workload)
        (other_name,) = set(WORKLOADS) - {name}
        other = pod_labels(documents(other_name), WORKLOADS[other_name])
        found = [docs[workload]["spec"]["selector"]["matchLabels"],
                 docs["Service"]["spec"]["selector"],
                 docs["PodMonitor"]["spec"]["selector"]["matchLabels"]]
        if "PodDisruptionBudget" in docs:
            found.append(docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])
        for selector in found:
            assert selects(selector, own), (name, selector)
            assert not selects(selector, other), (name, selector)


#: Kubernetes versions whose API schemas the manifests are checked against: the oldest the
#: checker ships and the newest.
SCHEMA_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
#: Resources of the Prometheus Operator's CRDs, which have no schema there (checked above).
OPERATOR_KINDS = {"PodMonitor"}


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("name", WORKLOADS)
def test_kubernetes_manifests_match_the_api_schemas(name, version):
    """Strict: a field in the wrong place or misspelt fails, not only a wrong type."""
    with (DEPLOY / "kubernetes" / name).open() as file:
        resources = list(yaml.safe_load_all(file))
    for resource in resources:
        if resource["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(resource, version, strict=True)
    assert {r["kind"] for r in resources} >= {"ServiceAccount", "Service", "PodMonitor"}


def test_the_fleet_spreads_over_nodes_and_drains_one_daemon_at_a_time():
    docs = documents("fleet.yaml")
    fleet = docs["StatefulSet"]["spec"]
    labels = pod_labels(docs, "StatefulSet")

    budget = docs["PodDisruptionBudget"]
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["selector"]["matchLabels"] == fleet["selector"]["matchLabels"]
    assert selects(budget["spec"]["selector"]["matchLabels"], labels)
    # A drain may always take one daemon, never all but none.
    assert budget["spec"]["maxUnavailable"] == 1 < fleet["replicas"]

    spread = {c["topologyKey"]: c for c in fleet["template"]["spec"]["topologySpreadConstraints"]}
    node = spread["kubernetes.io/hostname"]
    assert node["maxSkew"] == 1
    assert node["whenUnsatisfiable"] == "DoNotSchedule"
    for constraint in spread.values():
        assert selects(constraint["labelSelector"]["matchLabels"], labels)
        assert constraint["labelSelector"]["matchLabels"] == fleet["selector"]["matchLabels"]
def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def as_run_locally(
    docs: dict[str, dict[str, Any]], workload: str, tmp_path: Path, ledger_secret: str
) -> tuple[list[str], dict[str, str], Path]:
    """The pod's command line, environment and config file, with only what must point
    here changed: the ConfigMap's file and the volumes' paths under ``tmp_path``, the
    secret's ledger URL, and the metrics address (a free port on 127.0.0.1, not 9464 on
    every interface). Returns (arguments, environment, config file)."""
    (container,) = docs[workload]["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {path: tmp_path / name for name, path in mounts.items() if name != "config"}
    for local in volumes.values():
        local.mkdir()
    mounted = re.compile('"(' + "|".join(map(re.escape, volumes)) + ')/')
    text = mounted.sub(lambda found: f'"{volumes[found.group(1)]}/',
                       docs["ConfigMap"]["data"]["mandrill.toml"])
    config_file = tmp_path / "mandrill.toml"
    config_file.write_text(text)
    args = list(container["args"])
    args[args.index("--config") + 1] = str(config_file)
    env = {"MANDRILL_METRICS_ADDR": f"127.0.0.1:{free_port()}", "XDG_STATE_HOME": str(tmp_path)}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            assert entry["valueFrom"]["secretKeyRef"]["name"] == "mandrill-ledger", entry
            env[entry["name"]] = ledger_secret
    return args, env, config_file


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.postgres
@pytest.mark.parametrize(("name", "workload"), [("mandrill.yaml", "Deployment"),
                                                ("fleet.yaml", "StatefulSet")])
async def test_a_daemon_starts_from_each_kubernetes_manifest_and_becomes_ready(
    name, workload, tmp_path, backend_name, monkeypatch, pubsub_emulator,
    metadata_server: FakeMetadataServer, postgres_url,
):
    """As on GKE with Workload Identity: no key file, no GOOGLE_CLOUD_PROJECT; the metadata
    server (the fake, through GCE_METADATA_HOST) and Pub/Sub (the emulator, through
    PUBSUB_EMULATOR_HOST) are the only Google services there are."""
    for variable in PROJECT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    args, env, config_file = as_run_locally(documents(name), workload, tmp_path, postgres_url)
    # What an operator runs once before applying the manifest, from the same file.
    code, out, err = await run_to_end(["setup", "--config", str(config_file),
                                       "--backend", backend_name])
    assert code == 0, err
    assert "subscription projects/my-project/subscriptions/mandrill" in out

    daemon = await start([*args, "--backend", backend_name], env=env)
    try:
        await daemon.wait_for_message("ready: consuming")
        status, reason = await anyio.to_thread.run_sync(
            http_get, f"http://{env['MANDRILL_METRICS_ADDR']}/readyz"
        )
        assert (status, reason) == (200, "ready\n")
        daemon.signal(signal.SIGTERM)
        assert await daemon.finish(30) == 0
    finally:
        if daemon.process.returncode is None:
            daemon.process.kill()
            await daemon.process.wait()
    messages = daemon.messages()
    assert (
        f"--gce-project not given: project {metadata_server.project},"
        f" from the metadata server {metadata_server.host}"
    ) in messages
    assert any(m.startswith("DRY RUN") for m in messages)
    ledger = env.get("MANDRILL_LEDGER") or str(tmp_path / "state" / "mandrill.db")
    assert any(f"ledger {ledger}, restarter gce" in m for m in messages), messages
    assert [line for line in daemon.lines if line.get("level") in ("error", "critical")] == []


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


def test_systemd_analyze_verifies_the_unit(tmp_path):
    unit = unit_for_here(tmp_path)
    result = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if str(unit) in line] == []


#: The unit's exposure in `systemd-analyze security`, at most (2.5: "OK").
EXPOSURE_LIMIT = 2.5


def systemd_analyze() -> str:
    """systemd-analyze (Debian package ``systemd``): see tests.support.tools."""
    return tools.require("systemd-analyze")


def unit_for_here(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this environment's mandrill (verify and security
    check that it exists)."""
    mandrill = Path(sys.executable).parent / "mandrill"
    unit = tmp_path / "mandrill.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/mandrill", str(mandrill)))
    return unit


def test_systemd_unit_is_hardened_to_an_exposure_of_at_most_2_5(tmp_path):
    unit = unit_for_here(tmp_path)
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true",
         f"--threshold={int(EXPOSURE_LIMIT * 10)}", str(unit)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert exposure is not None, result.stdout + result.stderr
    assert float(exposure.group(1)) <= EXPOSURE_LIMIT, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_unit_notifies_and_is_watched():
    entries = unit_entries()
    assert entries["Type"] == ["notify"]
    assert entries["NotifyAccess"] == ["main"]
    assert config.duration(entries["WatchdogSec"][0]) >= 10  # pings every 5 s at least
    assert "AF_UNIX" in entries["RestrictAddressFamilies"][0].split()  # sd_notify's socket


def allowed_syscalls() -> set[str]:
    """What the unit's SystemCallFilter= lines allow, expanded with systemd-analyze's own
    tables of groups (an allow-list, then ~ lines taking groups away)."""
    tables = subprocess.run([systemd_analyze(), "syscall-filter"], capture_output=True,
                            text=True, check=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    for block in tables.split("\n\n"):
        lines = [line.strip() for line in block.splitlines()
                 if line.strip() and not line.strip().startswith("#")]
        if lines and lines[0].startswith("@"):
            groups[lines[0]] = lines[1:]

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        return set().union(*(expand(item) for item in groups[name]))

    allowed: set[str] = set()
    for value in unit_entries()["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= set().union(*(expand(item) for item in value[1:].split()))
        else:
            allowed |= set().union(*(expand(item) for item in value.split()))
    return allowed


@pytest.mark.slow
async def test_mandrill_and_its_restart_commands_run_under_the_units_sandbox(
    tmp_path, backend_name
):
    """The unit's system-call filter and MemoryDenyWriteExecute, applied without systemd
    (tests/support/sandbox.py): the daemon starts, tells systemd's socket it is ready, its
    restart commands run, it stops."""
    entries = unit_entries()
    assert entries["MemoryDenyWriteExecute"] == ["yes"]
    assert entries["SystemCallErrorNumber"] == ["EPERM"]
    allowed = allowed_syscalls()
    assert "setuid" not in allowed
    assert "execve" in allowed
    system_python = tools.require("seccomp")  # the system's python3, which imports it
    syscalls = tmp_path / "allowed"
    syscalls.write_text("\n".join(sorted(allowed)))
    restarted = tmp_path / "restarted"
    command = f"sh -c 'echo {{hostname}} >> {restarted}'"
    argv = [
        system_python, str(Path(__file__).parent / "support" / "sandbox.py"),
        str(syscalls), "--", sys.executable, "-m", "mandrill",
        "run", "--backend", backend_name, "--count", "5", "--rate", "0",
        "--restarter", "command", "--restart-command", command, "--live",
        "--min-restart-interval", "0s", "--ledger", str(tmp_path / "l.db"),
        "--log-format", "json",
    ]
    systemd = NotifySocket(f"@mandrill-test-{uuid.uuid4().hex}")
    try:
        with anyio.fail_after(60):
            result = await anyio.run_process(
                argv, check=False, env={**os.environ, **systemd.environment(2_000_000)}
            )
        told = systemd.pending()
    finally:
        systemd.close()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert len(restarted.read_text().splitlines()) == 5
    assert [has("READY=1")(text) for text in told].count(True) == 1
    assert has("STOPPING=1")(told[-1])


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
    # mandrill under an init that reaps orphans (tests/test_image_init.py), installed here.
    assert json.loads(values["ENTRYPOINT"]) == ["tini", "--", "mandrill"]
    runs = " ".join(rest for word, rest in final if word == "RUN")
    assert "install -y --no-install-recommends tini" in runs
    root = DEPLOY.parent
    for word, rest in found:
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (root / source).exists(), source


CONSTRAINTS = DEPLOY / "constraints.txt"
DIGEST_PINNED = re.compile(r"[\w./:-]+@sha256:[0-9a-f]{64}")


def stages() -> list[list[tuple[str, str]]]:
    """The Containerfile's stages, each from its FROM (ARGs before the first resolved)."""
    found = instructions()
    first = next(i for i, (word, _) in enumerate(found) if word == "FROM")
    args = dict(rest.partition("=")[::2] for word, rest in found[:first] if word == "ARG")
    result: list[list[tuple[str, str]]] = []
    for word, rest in found[first:]:
        if word == "FROM":
            rest = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest)
            result.append([])
        result[-1].append((word, rest))
    return result


def test_every_base_image_is_pinned_by_digest():
    names: set[str] = set()
    for stage in stages():
        words = [w for w in stage[0][1].split() if not w.startswith("--")]
        if words[0] not in names:  # not an earlier stage of this file
            assert DIGEST_PINNED.fullmatch(words[0]), words[0]
        if len(words) == 3 and words[1].upper() == "AS":
            names.add(words[2])
    assert len(stages()) == 2


def test_no_wheel_reaches_the_image():
    """The final stage takes the build stage's venv and nothing else, and runs no pip: no
    layer of the image holds a wheel (a deleted file stays in the layer that added it)."""
    build, final = stages()
    copied = [rest for word, rest in final if word == "COPY"]
    assert copied == ["--from=build /opt/mandrill /opt/mandrill"]
    assert not [rest for word, rest in final if word in ("RUN", "ADD") and "pip" in rest]
    env = dict(re.findall(r"(\w+)=(\S+)", dict(final)["ENV"]))
    assert env["PATH"].startswith("/opt/mandrill/bin:")
    (install,) = [rest for word, rest in build if word == "RUN"]
    assert "python -m venv /opt/mandrill" in install
    assert "--no-cache-dir" in install


def test_the_image_installs_with_the_constraints():
    build, _ = stages()
    assert ("COPY", "deploy/constraints.txt ./") in build
    (install,) = [rest for word, rest in build if word == "RUN"]
    assert "/opt/mandrill/bin/pip install --no-cache-dir --constraint constraints.txt ." in install


def pins() -> dict[str, str]:
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            assert re.fullmatch(r"[\w.+!-]+", pinned), line  # one exact version
            found[canonicalize_name(name)] = pinned
    return found


def test_the_constraints_pin_every_runtime_dependency():
    """Exactly what installing the project brings (from the installed metadata), each pin
    within pyproject.toml's range. A new dependency: regenerate the file (its header)."""
    pinned = pins()
    assert set(pinned) == set(runtime_dependencies())
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    for raw in project["dependencies"]:
        requirement = Requirement(raw)
        name = canonicalize_name(requirement.name)
        assert requirement.specifier.contains(pinned[name], prereleases=True), raw
    assert "psycopg-binary" in pinned  # an extra's dependencies count too (psycopg[binary])
    assert CONSTRAINTS.read_text().startswith(HEADER)


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


#: A label matcher on the scrape job: job="…", job=~"…", job!="…".
JOB_MATCHER = re.compile(r"\{[^}]*\bjob\s*(?:=|!=|=~|!~)")
RULE_TESTS = Path(__file__).parent / "prometheus" / "mandrill-rules.test.yml"


def test_job_matchers_are_recognized():
    assert JOB_MATCHER.search('up{job="mandrill"} == 0')
    assert JOB_MATCHER.search('rate(x{instance="a", job =~ "m.*"}[5m])')
    assert not JOB_MATCHER.search("up == 0 and on (job, instance) present_over_time(x[1d])")


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_no_query_depends_on_the_scrape_jobs_name(source):
    expressions = rule_expressions() if source == "rules" else dashboard_expressions()
    assert [expr for expr in expressions if JOB_MATCHER.search(expr)] == []


def test_an_absent_rule_catches_daemons_that_vanished():
    rules = yaml.safe_load(RULES.read_text())
    by_alert = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert by_alert["MandrillAbsent"]["expr"] == "absent(mandrill_ready)"
    assert by_alert["MandrillAbsent"]["labels"]["severity"] == "page"
    # Its unit tests (run by promtool below) exist, and name only alerts that exist.
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"]}
    assert {"MandrillAbsent", "MandrillDown"} <= tested <= set(by_alert)


def test_promtool_passes_the_rules_unit_tests():
    promtool = tools.require("promtool")
    result = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_rules_and_the_dashboards_queries(tmp_path):
    promtool = tools.require("promtool")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # The dashboard's queries, as recording rules: promtool parses each one.
    recording = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": expr.replace("$instance", ".*")}
        for i, expr in enumerate(dashboard_expressions())
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(recording))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
