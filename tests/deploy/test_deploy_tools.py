"""The installer of the deployment tools finds what is there and installs nothing then."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import devstack.deploy_tools as deploy_tools
from devstack.packages import Apt, Bootstrap
from devstack.settings import StackError


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


class RecordingApt(Apt):
    """Records the packages asked for instead of installing them."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, ...]] = []

    def install(self, *packages: str) -> None:
        self.asked.append(packages)


def recording(tmp_path: Path) -> tuple[Bootstrap, RecordingApt]:
    apt = RecordingApt()
    return Bootstrap(tmp_path / "kafka-libs", apt=apt), apt


@pytest.fixture
def no_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to build helm fails the test (apt is checked through RecordingApt)."""

    def refused(*arguments: object) -> None:
        pytest.fail(f"tried to install: {arguments}")

    monkeypatch.setattr(deploy_tools, "go_path", refused)


def test_the_projects_own_helm_comes_before_one_on_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_install: None
) -> None:
    own = executable(tmp_path / "project" / "helm")
    executable(tmp_path / "path" / "helm")
    monkeypatch.setattr(deploy_tools, "TOOLS_BIN", own.parent)
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    assert deploy_tools.helm_path() == own
    assert deploy_tools.install_helm() == own


def test_a_helm_that_cannot_run_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "project" / "helm"
    broken.parent.mkdir()
    broken.write_text("not a program")
    broken.chmod(0o644)
    monkeypatch.setattr(deploy_tools, "TOOLS_BIN", broken.parent)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    assert deploy_tools.helm_path() is None
    on_path = executable(tmp_path / "path" / "helm")
    monkeypatch.setenv("PATH", f"{tmp_path / 'nothing-here'}{os.pathsep}{on_path.parent}")
    assert deploy_tools.helm_path() == on_path


def test_present_prometheus_tools_are_a_no_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_install: None
) -> None:
    prometheus = executable(tmp_path / "bin" / "prometheus")
    promtool = executable(tmp_path / "bin" / "promtool")
    monkeypatch.setenv("PATH", str(prometheus.parent))
    bootstrap, apt = recording(tmp_path)
    assert deploy_tools.install_prometheus(bootstrap) == (prometheus, promtool)
    assert apt.asked == []


def test_promtool_alone_is_not_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executable(tmp_path / "bin" / "promtool")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(deploy_tools, "stop_system_prometheus", lambda: None)
    bootstrap, apt = recording(tmp_path)
    with pytest.raises(StackError, match="missing after installing"):
        deploy_tools.install_prometheus(bootstrap)
    assert apt.asked == [("--no-install-recommends", "prometheus")]


def test_the_projects_own_jaeger_is_found_and_none_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_install: None
) -> None:
    own = executable(tmp_path / "project" / "jaeger")
    monkeypatch.setattr(deploy_tools, "TOOLS_BIN", own.parent)
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    assert deploy_tools.jaeger_path() == own
    assert deploy_tools.install_jaeger() == own


def test_jaeger_is_built_in_a_module_of_its_own_under_the_tools_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir, module = tmp_path / "stack" / "bin", tmp_path / "stack" / "jaeger-build"
    monkeypatch.setattr(deploy_tools, "TOOLS_BIN", bin_dir)
    monkeypatch.setattr(deploy_tools, "JAEGER_BUILD_MODULE", module)
    monkeypatch.setattr(deploy_tools, "go_path", lambda: Path("go"))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    ran: list[tuple[list[str], Path]] = []

    def run(step: list[str], *, cwd: Path, env: dict[str, str], check: bool) -> None:
        ran.append((step, cwd))
        if step[1] == "build":
            executable(Path(step[3]))

    monkeypatch.setattr(subprocess, "run", run)
    assert deploy_tools.install_jaeger() == bin_dir / "jaeger"
    assert ran == [
        (["go", "mod", "init", "order-viewer.local/jaeger-build"], module),
        (["go", "get", "-tool", f"{deploy_tools.JAEGER_MODULE}@v1.75.0"], module),
        (["go", "build", "-o", str(bin_dir / "jaeger"), deploy_tools.JAEGER_MODULE], module),
    ]
