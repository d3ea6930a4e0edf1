"""What the Google adapters share: error bodies, and credentials checked at start (the CLI
as a real process, against a fake metadata server or none)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mandrill.errors import ConfigError
from mandrill.google_cloud import (
    PROJECT_VARIABLES,
    DefaultProject,
    credentials_source,
    find_default_project,
    google_error,
    retry_after,
)
from mandrill.sources.bridge import open_asyncio_bridge
from mandrill.sources.pubsub import open_pubsub_topic, setup_pubsub
from tests.fixtures.emulator import PubSubEmulator, PubSubNames
from tests.fixtures.metadata import hide_credentials, point_at_metadata_host
from tests.support.daemon import run_to_end
from tests.support.fakes import payloads
from tests.support.metadata import PROJECT_PATH, FakeMetadataServer, running_metadata_server
from tests.support.net import free_port

#: The start-up check gives up after 10 s; the process must be gone well before the
#: ~2 minutes a request's own retries would take.
EXIT_WITHIN = 30.0


def test_google_error_bodies_become_one_line() -> None:
    body = '{"error": {"code": 404, "message": "Topic\\n not found", "status": "NOT_FOUND"}}'
    assert google_error(body) == "NOT_FOUND: Topic not found"
    assert google_error(f"Not Found: {body}") == "NOT_FOUND: Topic not found"  # gcloud-aio's
    assert google_error(b'{"error": {"code": 503, "message": "Backend error"}}') == (
        "Backend error"
    )
    assert google_error(b"<html>\n oops </html>") == "<html> oops </html>"
    assert google_error(b"") == "no message"


def test_credentials_source_follows_gcloud_aio_auth_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = hide_credentials(monkeypatch, tmp_path)
    point_at_metadata_host(monkeypatch, "127.0.0.1:9")
    assert credentials_source() == "the metadata server 127.0.0.1:9"
    assert credentials_source(why=True).startswith(
        "the metadata server 127.0.0.1:9 (GOOGLE_APPLICATION_CREDENTIALS is unset, and there"
    )
    adc = config / "application_default_credentials.json"
    adc.write_text("{}")
    assert credentials_source() == f"the application default credentials {adc}"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/keys/k.json")
    assert credentials_source() == (
        "the credentials file /keys/k.json (GOOGLE_APPLICATION_CREDENTIALS)"
    )
    assert credentials_source("/other.json") == "the credentials file /other.json"


def _error_lines(err: str) -> list[str]:
    """The exit-2 error lines: plain, or (under --log-format json) their JSON's message."""
    found = []
    for line in err.splitlines():
        if line.startswith("mandrill: error:"):
            found.append(line)
        elif line.startswith("{") and '"exit_code": 2' in line:
            found.append(json.loads(line)["message"])
    return found


@pytest.mark.slow
async def test_no_credentials_fail_within_seconds_with_one_line(
    backend_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    hide_credentials(monkeypatch, tmp_path)
    closed = f"127.0.0.1:{free_port()}"
    point_at_metadata_host(monkeypatch, closed)
    started = time.monotonic()
    code, _, err = await run_to_end(
        ["run", "--source", "pubsub", "--project", "p", "--backend", backend_name,
         "--ledger", str(tmp_path / "l.db"), "--log-format", "json"],
        seconds=EXIT_WITHIN,
    )
    took = time.monotonic() - started
    assert code == 2, err
    (line,) = _error_lines(err)
    assert f"no Google Cloud access token from the metadata server {closed}" in line
    assert "GOOGLE_APPLICATION_CREDENTIALS is unset" in line
    assert str(tmp_path / "gcloud-config" / "application_default_credentials.json") in line
    assert "gcloud auth application-default login" in line
    assert "Traceback" not in err
    # Each failure was logged as it happened, before the process gave up.
    assert "getting an access token from the metadata server" in err
    assert took < 20, took


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--source", "pubsub", "--project", "p"], id="pubsub"),
        pytest.param(
            ["--restarter", "gce", "--gce-project", "my-project", "--gce-zone", "europe-west1-b"],
            id="gce-dry-run",
        ),
    ],
)
async def test_a_missing_credentials_file_is_one_line_naming_it(
    args: list[str], backend_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    hide_credentials(monkeypatch, tmp_path)
    missing = tmp_path / "keys" / "mandrill.json"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    code, _, err = await run_to_end(
        ["run", *args, "--backend", backend_name, "--ledger", str(tmp_path / "l.db")],
        seconds=EXIT_WITHIN,
    )
    assert code == 2, err
    (line,) = _error_lines(err)
    assert f"cannot read the credentials file {missing} (GOOGLE_APPLICATION_CREDENTIALS)" in line
    assert "No such file or directory" in line
    assert "Traceback" not in err
    assert "internal error" not in err


@pytest.mark.emulator
@pytest.mark.slow
async def test_with_an_api_root_the_cli_checks_credentials_and_logs_a_retried_failure(
    backend_name: str,
    pubsub_emulator: PubSubEmulator,
    pubsub_names: PubSubNames,
    metadata_server: FakeMetadataServer,
) -> None:
    metadata_server.fail_next(1)
    n = pubsub_names
    code, out, err = await run_to_end(
        ["setup", "--project", n.project, "--topic", n.topic, "--subscription", n.subscription,
         "--backend", backend_name, "--pubsub-api-root", pubsub_emulator.url],
        seconds=EXIT_WITHIN,
    )
    assert code == 0, err
    assert "created subscription" in out
    assert f"getting an access token from the metadata server {metadata_server.host}" in err
    assert "HTTP 503" in err
    # The check's two requests, then the clients' own token.
    assert [r.status for r in metadata_server.token_requests] == [503, 200, 200]


# -- the default project ----------------------------------------------------------------------


@pytest.fixture
def no_project_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in PROJECT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def silent_host() -> Iterator[str]:
    """A ``host:port`` that accepts connections and never answers (a firewall that drops)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def find(backend_name: str, metadata_seconds: float = 3.0) -> DefaultProject:
    async with open_asyncio_bridge(backend_name) as bridge:
        return await find_default_project(
            bridge, "--gce-project", metadata_seconds=metadata_seconds
        )


def project_requests(server: FakeMetadataServer) -> list[str | None]:
    return [r.flavor for r in server.requests if r.path == PROJECT_PATH]


@pytest.mark.usefixtures("no_project_variables")
async def test_the_default_project_comes_from_the_metadata_server(
    backend_name: str, metadata_server: FakeMetadataServer
) -> None:
    found = await find(backend_name)
    assert found == DefaultProject(
        "metadata-test-project", f"the metadata server {metadata_server.host}"
    )
    assert project_requests(metadata_server) == ["Google"]


@pytest.mark.parametrize("variable", PROJECT_VARIABLES)
@pytest.mark.usefixtures("no_project_variables")
async def test_a_project_variable_comes_before_the_metadata_server(
    variable: str,
    backend_name: str,
    metadata_server: FakeMetadataServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(variable, "env-project")
    assert await find(backend_name) == DefaultProject("env-project", variable)
    assert project_requests(metadata_server) == []


@pytest.mark.usefixtures("no_project_variables")
async def test_a_key_files_project_comes_before_the_metadata_server(
    backend_name: str,
    metadata_server: FakeMetadataServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"type": "service_account", "project_id": "key-project"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    found = await find(backend_name)
    assert found == DefaultProject("key-project", f"the credentials file {key}")
    assert project_requests(metadata_server) == []


@pytest.mark.usefixtures("no_project_variables")
async def test_no_default_project_is_one_line_naming_every_way(
    backend_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hide_credentials(monkeypatch, tmp_path)
    closed = f"127.0.0.1:{free_port()}"
    point_at_metadata_host(monkeypatch, closed)
    with pytest.raises(ConfigError) as caught:
        await find(backend_name)
    message = str(caught.value)
    assert message.startswith(
        "--gce-project: no default project: set --gce-project, or GOOGLE_CLOUD_PROJECT, or run"
        " on Google Cloud, where the metadata server names it"
    )
    assert f"(the metadata server {closed}: ClientConnectorError" in message
    assert "\n" not in message


@pytest.mark.usefixtures("no_project_variables")
async def test_a_metadata_server_that_does_not_answer_is_given_up_on_in_time(
    backend_name: str, silent_host: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hide_credentials(monkeypatch, tmp_path)
    point_at_metadata_host(monkeypatch, silent_host)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"no answer within 0\.3 s\)$"):
        await find(backend_name, metadata_seconds=0.3)
    assert time.monotonic() - started < 3


@pytest.mark.usefixtures("no_project_variables")
async def test_a_metadata_answer_that_is_no_project_id_is_refused(
    backend_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hide_credentials(monkeypatch, tmp_path)
    with running_metadata_server(FakeMetadataServer(project="<html>oops</html>")) as fake:
        point_at_metadata_host(monkeypatch, fake.host)
        with pytest.raises(ConfigError, match=(
            r"^--gce-project: the metadata server .*: refusing project '<html>oops</html>'"
        )):
            await find(backend_name)


@pytest.mark.emulator
@pytest.mark.slow
@pytest.mark.parametrize("given", ["environment", "metadata"])
@pytest.mark.usefixtures("no_project_variables")
async def test_the_daemons_pubsub_project_may_come_from_the_environment_or_the_metadata_server(
    given: str,
    backend_name: str,
    pubsub_names: PubSubNames,
    metadata_server: FakeMetadataServer,
) -> None:
    n = pubsub_names
    project = n.project if given == "environment" else metadata_server.project
    env = {"GOOGLE_CLOUD_PROJECT": project} if given == "environment" else {}
    await setup_pubsub(
        project=project, topic=n.topic, subscription=n.subscription, backend=backend_name
    )
    async with open_pubsub_topic(project=project, topic=n.topic, backend=backend_name) as t:
        await t.publish(payloads("web-1"))
    code, _, err = await run_to_end(
        ["run", "--source", "pubsub", "--subscription", n.subscription, "--count", "1",
         "--backend", backend_name, "--ledger", ":memory:", "--log-format", "json"],
        env=env, seconds=EXIT_WITHIN,
    )
    assert code == 0, err
    said = "GOOGLE_CLOUD_PROJECT" if given == "environment" else "the metadata server"
    (line,) = [json.loads(line) for line in err.splitlines() if "not given" in line]
    assert line["message"] == f"--project not given: project {project}, from {said}" + (
        f" {metadata_server.host}" if given == "metadata" else ""
    )
    assert len(project_requests(metadata_server)) == (given == "metadata")

def _answer(status: int, headers: dict[str, str] | None) -> Exception:
    import aiohttp
    from multidict import CIMultiDict, CIMultiDictProxy

    return aiohttp.ClientResponseError(
        None, (), status=status, message="Too Many Requests: {}",  # type: ignore[arg-type]
        headers=CIMultiDictProxy(CIMultiDict(headers)) if headers is not None else None,
    )


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"Retry-After": "20"}, 20.0),
        ({"retry-after": " 0 "}, 0.0),
        # An HTTP date, from the clock's now (1_000_000_000 is 2001-09-09T01:46:40Z).
        ({"Retry-After": "Sun, 09 Sep 2001 01:47:10 GMT"}, 30.0),
        ({"Retry-After": "Sun, 09 Sep 2001 01:40:00 GMT"}, 0.0),  # already past
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": "Sun, 09 Sep 2001 01:47:10"}, None),  # no zone: no HTTP date
        ({}, None),
        (None, None),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(headers, wait) -> None:
    assert retry_after(_answer(429, headers), now=lambda: 1_000_000_000.0) == wait


def test_only_an_answer_has_a_retry_after() -> None:
    assert retry_after(ConnectionResetError()) is None
