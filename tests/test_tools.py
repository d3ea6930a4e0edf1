"""tests.support.tools: a missing tool skips its test, except under CI=true where it fails."""

from __future__ import annotations

import pytest

from tests.support import tools


@pytest.fixture
def path_with(tmp_path, monkeypatch):
    """PATH holding only executables with the given names."""

    def make(*names: str) -> None:
        for name in names:
            binary = tmp_path / name
            binary.write_text("#!/bin/sh\n")
            binary.chmod(0o755)
        monkeypatch.setenv("PATH", str(tmp_path))
        # The system's Python, as "python3" here: it imports any module (exit 0).
        monkeypatch.setattr(tools, "SYSTEM_PYTHON", tmp_path / "python3")

    return make


@pytest.fixture
def python_importing_nothing(tmp_path, monkeypatch):
    python = tmp_path / "python3"
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    monkeypatch.setattr(tools, "SYSTEM_PYTHON", python)


def test_require_gives_the_path(path_with, tmp_path, monkeypatch):
    path_with("promtool")
    monkeypatch.setenv("CI", "true")
    assert tools.require("promtool") == str(tmp_path / "promtool")


@pytest.mark.parametrize("ci", ["", "false"])
def test_a_missing_tool_skips_naming_its_package(path_with, monkeypatch, ci):
    path_with()
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=r"promtool missing \(Debian package prom"):
        tools.require("promtool")


def test_a_missing_tool_fails_under_ci(path_with, monkeypatch):
    path_with()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        tools.require("tini")


def test_every_tool_a_test_runs_is_listed():
    with pytest.raises(KeyError, match="TOOLS"):
        tools.require("firefox")
    assert len({tool.binary for tool in tools.TOOLS}) == len(tools.TOOLS)


def test_nothing_to_do_when_nothing_is_missing(path_with, capsys):
    path_with("python3", *(tool.binary for tool in tools.TOOLS if not tool.module))
    assert tools.main() == 0
    assert capsys.readouterr().out == ""


def test_check_names_the_missing_tools_and_their_packages(path_with, capsys):
    path_with("tini")
    assert tools.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "missing promtool (prometheus), systemd-analyze (systemd)" in out
    assert ("apt-get install --no-install-recommends chromium prometheus python3-seccomp"
            " systemd") in out


def test_a_module_is_found_by_the_system_python_importing_it(path_with, tmp_path):
    path_with("python3")
    assert tools.require("seccomp") == str(tmp_path / "python3")


def test_a_module_the_system_python_cannot_import_is_missing(
    path_with, python_importing_nothing, monkeypatch
):
    path_with()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"seccomp missing \(Debian package python3-s"):
        tools.require("seccomp")


def test_services_are_held_while_installing_and_the_policy_removed_after(tmp_path, monkeypatch):
    policy = tmp_path / "policy-rc.d"
    monkeypatch.setattr(tools, "POLICY_RC_D", policy)
    with tools.services_not_started():
        assert policy.read_text().endswith("exit 101\n")
        assert policy.stat().st_mode & 0o111
    assert not policy.exists()


def test_a_machines_own_policy_is_left_alone(tmp_path, monkeypatch):
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 0\n")
    monkeypatch.setattr(tools, "POLICY_RC_D", policy)
    with tools.services_not_started():
        pass
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"
