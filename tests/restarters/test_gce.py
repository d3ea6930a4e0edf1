"""GceRestarter against a small fake Compute API (an aiohttp app on the bridge's loop)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from aiohttp import web

from mandrill.errors import RestartFailed
from mandrill.google_cloud import PROJECT_VARIABLES
from mandrill.message import Message
from mandrill.restarters import GceRestarter
from mandrill.restarters.gce import GceSettingError, request_id
from mandrill.retry import RetryPolicy
from mandrill.sources.bridge import AsyncioBridge, open_asyncio_bridge
from tests.fixtures.metadata import hide_credentials, point_at_metadata_host
from tests.support.daemon import run_to_end
from tests.support.metadata import ACCESS_TOKEN, PROJECT_PATH
from tests.support.net import free_port

TOKEN = "test-token"


@dataclass
class Request:
    path: str
    query: dict[str, str]
    authorization: str
    content_length: str | None


@dataclass
class FakeCompute:
    """Records requests; resets are applied once per requestId, like Compute Engine."""

    waits_until_done: int = 2
    #: Answer 503 to this many reset requests, after applying the reset.
    lose_reset_answers: int = 0
    operation_error: dict[str, Any] | None = None
    #: Hold every wait request until the client goes away.
    hold_waits: bool = False
    requests: list[Request] = field(default_factory=list)
    resets_applied: list[str] = field(default_factory=list)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    token_requests: int = 0
    #: The access token requests must carry.
    access_token: str = TOKEN

    def app(self) -> web.Application:
        app = web.Application()
        prefix = "/compute/v1/projects/{project}/zones/{zone}"
        app.router.add_post(prefix + "/instances/{instance}/reset", self.reset)
        app.router.add_post(prefix + "/operations/{operation}/wait", self.wait)
        app.router.add_post("/token", self.token)
        return app

    def _record(self, request: web.Request) -> web.Response | None:
        self.requests.append(
            Request(
                request.path,
                dict(request.query),
                request.headers.get("Authorization", ""),
                request.headers.get("Content-Length"),
            )
        )
        if request.headers.get("Authorization") != f"Bearer {self.access_token}":
            return error(401, "Request had invalid authentication credentials.")
        return None

    async def reset(self, request: web.Request) -> web.Response:
        if (refused := self._record(request)) is not None:
            return refused
        if request.match_info["instance"] == "missing":
            return error(404, "The resource 'instances/missing' was not found")
        rid = request.query["requestId"]
        if rid not in self.operations:
            self.resets_applied.append(request.match_info["instance"])
            name = f"operation-{len(self.operations) + 1}"
            self.operations[rid] = {"name": name, "status": "PENDING", "waits": 0}
        if self.lose_reset_answers:
            self.lose_reset_answers -= 1
            return error(503, "Backend error")
        return web.json_response(public(self.operations[rid]))

    async def wait(self, request: web.Request) -> web.Response:
        if (refused := self._record(request)) is not None:
            return refused
        if self.hold_waits:
            await asyncio.Event().wait()
        name = request.match_info["operation"]
        operation = next(op for op in self.operations.values() if op["name"] == name)
        operation["waits"] += 1
        if operation["waits"] >= self.waits_until_done:
            operation["status"] = "DONE"
            if self.operation_error is not None:
                operation["error"] = self.operation_error
        else:
            operation["status"] = "RUNNING"
        return web.json_response(public(operation))

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        self.token_requests += 1
        return web.json_response({"access_token": TOKEN, "expires_in": 3600})


def public(operation: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in operation.items() if key != "waits"}


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message}}, status=status)


class StaticToken:
    def __init__(self, value: str = TOKEN) -> None:
        self.value = value

    async def get(self) -> str:
        return self.value


async def _start(app: web.Application) -> tuple[web.AppRunner, int]:
    # A short shutdown_timeout: held requests are cancelled at cleanup, not waited for.
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def bridge(backend_name: str) -> AsyncIterator[AsyncioBridge]:
    async with open_asyncio_bridge(backend_name) as bridge:
        yield bridge


@pytest.fixture
def compute() -> FakeCompute:
    return FakeCompute()


@pytest.fixture
async def api_root(bridge: AsyncioBridge, compute: FakeCompute) -> AsyncIterator[str]:
    runner, port = await bridge.call(_start, compute.app())
    try:
        yield f"http://127.0.0.1:{port}/compute/v1"
    finally:
        await bridge.call(runner.cleanup)


def message(instance: str = "web-1", message_id: str = "m-1", **attributes: str) -> Message:
    return Message(
        message_id,
        instance,
        f"{instance.lower()}.example.net",
        datetime(2026, 1, 1, tzinfo=UTC).timestamp(),
        None,
        attributes,
    )


def quick_retries(attempts: int = 4) -> RetryPolicy:
    return RetryPolicy(initial=0.001, cap=0.001, attempts=attempts)


def restarter(bridge: AsyncioBridge, api_root: str, **options: Any) -> GceRestarter:
    defaults: dict[str, Any] = {
        "project": "my-project",
        "zone": "europe-west1-b",
        "api_root": api_root,
        "token": StaticToken(),
        "poll_interval": 0,
        "retry": quick_retries(),
    }
    return GceRestarter(bridge, **(defaults | options))


async def test_resets_and_waits_until_done(bridge, api_root, compute):
    async with restarter(bridge, api_root) as gce:
        assert await gce.restart(message()) == "operation operation-1"
    zone = "/compute/v1/projects/my-project/zones/europe-west1-b"
    assert [r.path for r in compute.requests] == [
        f"{zone}/instances/web-1/reset",
        f"{zone}/operations/operation-1/wait",
        f"{zone}/operations/operation-1/wait",
    ]
    assert compute.requests[0].query == {"requestId": request_id("m-1")}
    assert {r.authorization for r in compute.requests} == {f"Bearer {TOKEN}"}
    assert {r.content_length for r in compute.requests} == {"0"}
    assert compute.resets_applied == ["web-1"]


async def test_a_retried_reset_is_applied_once(bridge, api_root, compute):
    compute.lose_reset_answers = 2
    async with restarter(bridge, api_root) as gce:
        await gce.restart(message())
        # A redelivery of the same message after it succeeded: Compute Engine recognises it.
        await gce.restart(message())
    resets = [r for r in compute.requests if r.path.endswith("/reset")]
    assert len(resets) == 4
    assert {r.query["requestId"] for r in resets} == {request_id("m-1")}
    assert compute.resets_applied == ["web-1"]


def test_request_ids_are_stable_uuids_per_message():
    assert request_id("m-1") == request_id("m-1") != request_id("m-2")
    # Pinned: a different id for the same message would reset its host again.
    assert request_id("m-1") == "6514165d-8501-581e-9a66-620c5ef87853"


async def test_an_operation_error_fails_the_restart(bridge, api_root, compute):
    compute.operation_error = {
        "errors": [{"code": "RESOURCE_NOT_READY", "message": "The instance is being stopped"}]
    }
    async with restarter(bridge, api_root) as gce:
        with pytest.raises(RestartFailed, match=r"operation-1 failed: The instance is being st"):
            await gce.restart(message())


async def test_a_client_error_fails_at_once(bridge, api_root, compute):
    async with restarter(bridge, api_root) as gce:
        with pytest.raises(RestartFailed, match=r"^HTTP 404: The resource 'instances/missing'"):
            await gce.restart(message("missing"))
    assert len(compute.requests) == 1


async def test_a_bad_token_is_refused(bridge, api_root, compute):
    async with restarter(bridge, api_root, token=StaticToken("wrong")) as gce:
        with pytest.raises(RestartFailed, match=r"^HTTP 401: Request had invalid auth"):
            await gce.restart(message())
    assert compute.requests[0].authorization == "Bearer wrong"


async def test_server_errors_are_retried_then_given_up(bridge, api_root, compute):
    compute.lose_reset_answers = 10
    async with restarter(bridge, api_root, retry=quick_retries(3)) as gce:
        with pytest.raises(RestartFailed, match=r"^HTTP 503: Backend error \(gave up after 3"):
            await gce.restart(message())
    assert len(compute.requests) == 3


async def test_connection_errors_are_retried_then_given_up(bridge):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with restarter(bridge, f"http://127.0.0.1:{port}/v1", retry=quick_retries(2)) as gce:
        with pytest.raises(RestartFailed, match=r"gave up after 2 attempts"):
            await gce.restart(message())


async def test_cancellation_during_a_wait_propagates(bridge, api_root, compute):
    compute.hold_waits = True
    async with restarter(bridge, api_root) as gce:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(gce.restart, message())
                # Polled: the fake records requests on the asyncio side of the bridge.
                while len(compute.requests) < 2:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
    assert compute.requests[-1].path.endswith("/operations/operation-1/wait")


async def test_attributes_override_project_and_zone(bridge, api_root, compute):
    async with restarter(bridge, api_root, zone=None) as gce:
        await gce.restart(message(project="other-project", zone="us-east1-c"))
    assert compute.requests[0].path == (
        "/compute/v1/projects/other-project/zones/us-east1-c/instances/web-1/reset"
    )


@pytest.mark.parametrize(
    ("options", "attributes", "error"),
    [
        ({"zone": None}, {}, "^no zone: "),
        ({}, {"zone": "../../x"}, "^refusing zone"),
        ({}, {"zone": "a/b"}, "^refusing zone"),
        ({}, {"project": "p/../../x"}, "^refusing project"),
        ({}, {"project": "x?y=1"}, "^refusing project"),
    ],
)
async def test_missing_or_hostile_targets_send_nothing(
    bridge, api_root, compute, options, attributes, error
):
    async with restarter(bridge, api_root, **options) as gce:
        with pytest.raises(RestartFailed, match=error):
            await gce.restart(message(**attributes))
    assert compute.requests == []


async def test_with_a_real_gcloud_token_from_a_service_file(bridge, api_root, compute, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    service_file = tmp_path / "service.json"
    service_file.write_text(
        json.dumps(
            {
                "type": "service_account",
                "client_email": "mandrill@my-project.iam.gserviceaccount.com",
                "private_key": pem,
                "token_uri": api_root.removesuffix("/compute/v1") + "/token",
            }
        )
    )
    async with restarter(bridge, api_root, token=None, service_file=str(service_file)) as gce:
        await gce.restart(message())
        await gce.restart(message("web-2", "m-2"))
    assert compute.token_requests == 1
    assert {r.authorization for r in compute.requests} == {f"Bearer {TOKEN}"}
    assert compute.resets_applied == ["web-1", "web-2"]


async def test_a_failed_token_request_is_retried(bridge, api_root, compute, metadata_server):
    # Credentials from the metadata server, as on a GCE instance; its first answer is a 503,
    # which gcloud-aio-auth retries (with tenacity, whose sleep follows sniffio).
    metadata_server.fail_next(1)
    compute.access_token = ACCESS_TOKEN
    async with restarter(bridge, api_root, token=None) as gce:
        assert await gce.restart(message()) == "operation operation-1"
    assert [r.status for r in metadata_server.token_requests] == [503, 200]
    assert compute.resets_applied == ["web-1"]


@pytest.mark.parametrize(
    ("options", "setting", "error"),
    [
        ({"api_root": "ftp://x"}, "api_root", "not an http"),
        ({"project": ""}, "project", "^no project$"),
        ({"project": "My_Project"}, "project", "^refusing project 'My_Project': not a GCE"),
        ({"zone": "europe west"}, "zone", "^refusing zone 'europe west': not a GCE zone"),
    ],
)
def test_bad_settings_are_refused_at_construction(options, setting, error):
    with pytest.raises(GceSettingError, match=error) as caught:
        GceRestarter(None, **({"project": "my-project"} | options))  # type: ignore[arg-type]
    assert caught.value.setting == setting


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--gce-project", "Bad_Project"], "--gce-project: refusing project 'Bad_Project'"),
        (["--gce-project", "my-project", "--gce-zone", "a/b"], "--gce-zone: refusing zone 'a/b'"),
        ([], "--gce-project: no default project: set --gce-project, or GOOGLE_CLOUD_PROJECT,"
             " or run on Google Cloud, where the metadata server names it"),
    ],
)
async def test_the_cli_checks_project_and_zone_at_start(
    args, error, backend_name, monkeypatch, tmp_path
):
    hide_credentials(monkeypatch, tmp_path)
    for variable in PROJECT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    # No metadata server either: nothing listens there.
    point_at_metadata_host(monkeypatch, f"127.0.0.1:{free_port()}")
    code, _, err = await run_to_end([
        "run", "--restarter", "gce", *args, "--backend", backend_name,
        "--ledger", str(tmp_path / "l.db"),
    ])
    assert code == 2, err
    (line,) = [line for line in err.splitlines() if line.startswith("mandrill: error:")]
    assert error in line


@pytest.mark.slow
async def test_the_daemon_restarts_live_with_metadata_credentials_after_a_failed_token_request(
    api_root, compute, metadata_server, backend_name, tmp_path
):
    # The repro: `mandrill run --restarter gce --live` with the metadata server
    # answering 503 once. The start-up check meets the 503, logs it, and retries.
    metadata_server.fail_next(1)
    compute.access_token = ACCESS_TOKEN
    code, _, err = await run_to_end([
        "run", "--restarter", "gce", "--gce-project", "my-project",
        "--gce-zone", "europe-west1-b", "--gce-api-root", api_root, "--live",
        "--backend", backend_name, "--count", "1", "--rate", "0",
        "--ledger", str(tmp_path / "l.db"), "--log-format", "json",
    ])
    assert code == 0, err
    assert "getting an access token from the metadata server" in err
    assert len(compute.resets_applied) == 1
    assert [r.status for r in metadata_server.token_requests][:2] == [503, 200]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "environment", "project", "said"),
    [
        ([], {}, "metadata-test-project", "the metadata server"),
        ([], {"GOOGLE_CLOUD_PROJECT": "env-project"}, "env-project", "GOOGLE_CLOUD_PROJECT"),
        (["--gce-project", "flag-project"], {"GOOGLE_CLOUD_PROJECT": "env-project"},
         "flag-project", None),
    ],
    ids=["metadata", "environment", "flag"],
)
async def test_the_daemons_default_project_comes_from_the_environment_then_the_metadata_server(
    args, environment, project, said, api_root, compute, metadata_server, backend_name,
    monkeypatch, tmp_path
):
    # The GKE case first: Workload Identity, no key file, no GOOGLE_CLOUD_PROJECT.
    for variable in PROJECT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    compute.access_token = ACCESS_TOKEN
    code, _, err = await run_to_end([
        "run", "--restarter", "gce", *args, "--gce-zone", "europe-west1-b",
        "--gce-api-root", api_root, "--live", "--backend", backend_name, "--count", "1",
        "--rate", "0", "--ledger", str(tmp_path / "l.db"), "--log-format", "json",
    ], env=environment)
    assert code == 0, err
    assert compute.requests[0].path.startswith(f"/compute/v1/projects/{project}/zones/")
    lines = [json.loads(line) for line in err.splitlines()]
    chosen = [line for line in lines if "not given: project" in line["message"]]
    asked = [r for r in metadata_server.requests if r.path == PROJECT_PATH]
    if said is None:
        assert (chosen, asked) == ([], [])
        return
    (line,) = chosen
    assert line["level"] == "info"
    assert line["message"].startswith(f"--gce-project not given: project {project}, from {said}")
    assert len(asked) == (1 if said == "the metadata server" else 0)
