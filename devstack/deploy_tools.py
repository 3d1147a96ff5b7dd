"""The tools the deployment and tracing tests need: helm and Jaeger (built from their Go modules
into the project's `.stack/bin`) and Debian's prometheus package (prometheus and promtool).
`python -m devstack install --deploy-tools` installs them with the rest of the bootstrap; each
step does nothing when its tool is there, and the tests only look them up."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from devstack.packages import Bootstrap
from devstack.settings import PROJECT_ROOT, StackError
from devstack.system import as_root, say

TOOLS_BIN = PROJECT_ROOT / ".stack" / "bin"
HELM_MODULE = "helm.sh/helm/v3/cmd/helm"
HELM_VERSION = "v3.22.0"
JAEGER_MODULE = "github.com/jaegertracing/jaeger/cmd/jaeger"
JAEGER_VERSION = "v1.75.0"  # Jaeger v2, built on the OpenTelemetry collector
# Jaeger's go.mod has replace directives, so `go install module@version` refuses it: it is built
# as a tool of a module of our own, made in the git-ignored tools folder, not in the sources.
JAEGER_BUILD_MODULE = PROJECT_ROOT / ".stack" / "jaeger-build"
PROMETHEUS_PACKAGE = "prometheus"
INSTALL_COMMAND = "python -m devstack install --deploy-tools"
# Go's usual install place, which a non-login shell often lacks on its PATH.
GO_CANDIDATES = ("/usr/local/go/bin/go",)


def helm_path() -> Path | None:
    """The project's own helm, else one on PATH."""
    return _own_or_on_path("helm")


def jaeger_path() -> Path | None:
    """The project's own jaeger, else one on PATH."""
    return _own_or_on_path("jaeger")


def _own_or_on_path(program: str) -> Path | None:
    own = TOOLS_BIN / program
    if own.is_file() and os.access(own, os.X_OK):
        return own
    found = shutil.which(program)
    return Path(found) if found else None


def promtool_path() -> Path | None:
    found = shutil.which("promtool")
    return Path(found) if found else None


def prometheus_path() -> Path | None:
    found = shutil.which("prometheus")
    return Path(found) if found else None


def go_path() -> Path:
    found = shutil.which("go") or next(
        (candidate for candidate in GO_CANDIDATES if os.access(candidate, os.X_OK)), None
    )
    if found is None:
        # Go 1.21 and later fetch the newer toolchain helm's go.mod asks for by themselves.
        raise StackError("go is needed to build helm: install Go 1.21 or later")
    return Path(found)


def install_helm() -> Path:
    existing = helm_path()
    if existing is not None:
        return existing
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    say(f"building helm {HELM_VERSION} with go install into {TOOLS_BIN}")
    subprocess.run(
        [str(go_path()), "install", f"{HELM_MODULE}@{HELM_VERSION}"],
        env={**os.environ, "GOBIN": str(TOOLS_BIN), "CGO_ENABLED": "0"},
        check=True,
    )
    installed = TOOLS_BIN / "helm"
    if not installed.is_file():
        raise StackError(f"go install finished but {installed} is missing")
    return installed


def install_jaeger() -> Path:
    existing = jaeger_path()
    if existing is not None:
        return existing
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    JAEGER_BUILD_MODULE.mkdir(parents=True, exist_ok=True)
    say(f"building jaeger {JAEGER_VERSION} with go build into {TOOLS_BIN}")
    go = str(go_path())
    steps = [
        [go, "get", "-tool", f"{JAEGER_MODULE}@{JAEGER_VERSION}"],
        [go, "build", "-o", str(TOOLS_BIN / "jaeger"), JAEGER_MODULE],
    ]
    if not (JAEGER_BUILD_MODULE / "go.mod").is_file():
        steps.insert(0, [go, "mod", "init", "order-viewer.local/jaeger-build"])
    for step in steps:
        subprocess.run(
            step, cwd=JAEGER_BUILD_MODULE, env={**os.environ, "CGO_ENABLED": "0"}, check=True
        )
    installed = TOOLS_BIN / "jaeger"
    if not installed.is_file():
        raise StackError(f"go build finished but {installed} is missing")
    return installed


def stop_system_prometheus() -> None:
    """Debian's package starts a system Prometheus on port 9090 at boot and after install; the
    tests run their own on free ports and want no stray server scraping or holding ports."""
    # As root, like the package's install: a plain user's stop would fail and change nothing.
    if Path("/run/systemd/system").is_dir():
        subprocess.run(as_root(["systemctl", "disable", "--now", PROMETHEUS_PACKAGE]), check=False)
        return
    if shutil.which("update-rc.d"):
        subprocess.run(as_root(["update-rc.d", PROMETHEUS_PACKAGE, "disable"]), check=False)
    if shutil.which("service"):
        subprocess.run(
            as_root(["service", PROMETHEUS_PACKAGE, "stop"]),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def install_prometheus(bootstrap: Bootstrap) -> tuple[Path, Path]:
    prometheus, promtool = prometheus_path(), promtool_path()
    if prometheus is not None and promtool is not None:
        return prometheus, promtool
    say("installing Debian's prometheus package (prometheus and promtool)")
    bootstrap.apt.install("--no-install-recommends", PROMETHEUS_PACKAGE)
    stop_system_prometheus()
    prometheus, promtool = prometheus_path(), promtool_path()
    if prometheus is None or promtool is None:
        raise StackError("prometheus or promtool missing after installing the package")
    return prometheus, promtool


def install_deploy_tools(bootstrap: Bootstrap) -> None:
    install_helm()
    install_jaeger()
    install_prometheus(bootstrap)
