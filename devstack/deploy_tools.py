"""Install the tools the deployment tests need: helm (built from its Go module) and Debian's
prometheus package (prometheus and promtool). Each step does nothing when its tool is there.

Run as `python -m devstack.deploy_tools` before the tests: the tests never install anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS_BIN = ROOT / ".stack" / "bin"
HELM_MODULE = "helm.sh/helm/v3/cmd/helm"
HELM_VERSION = "v3.22.0"
PROMETHEUS_PACKAGE = "prometheus"
INSTALL_COMMAND = "python -m devstack.deploy_tools"
# Go's usual install place, which a non-login shell often lacks on its PATH.
GO_CANDIDATES = ("/usr/local/go/bin/go",)
# apt waits this long for another process's dpkg lock instead of failing at once; `apt-get
# update` does not wait for the lists lock, so a failed call is tried again a few times.
DPKG_LOCK_TIMEOUT_S = 900
APT_ATTEMPTS = 5
APT_RETRY_PAUSE_S = 20


def say(message: str) -> None:
    print(f"[deploy-tools] {message}", flush=True)


def helm_path() -> Path | None:
    """The project's own helm, else one on PATH."""
    own = TOOLS_BIN / "helm"
    if own.is_file() and os.access(own, os.X_OK):
        return own
    found = shutil.which("helm")
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
        raise SystemExit("go is needed to build helm: install Go 1.21 or later")
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
        raise SystemExit(f"go install finished but {installed} is missing")
    return installed


def apt_get(*arguments: str) -> None:
    command = ["apt-get", "-o", f"DPkg::Lock::Timeout={DPKG_LOCK_TIMEOUT_S}", *arguments]
    if os.geteuid() != 0:
        command = ["sudo", *command]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in range(1, APT_ATTEMPTS + 1):
        if subprocess.run(command, env=env, check=False).returncode == 0:
            return
        if attempt < APT_ATTEMPTS:
            say(f"apt-get {arguments[0]} failed, trying again in {APT_RETRY_PAUSE_S} s")
            time.sleep(APT_RETRY_PAUSE_S)
    raise SystemExit(f"apt-get {' '.join(arguments)} failed {APT_ATTEMPTS} times")


def stop_system_prometheus() -> None:
    """Debian's package starts a system Prometheus on port 9090 at boot and after install; the
    tests run their own on free ports and want no stray server scraping or holding ports."""
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "disable", "--now", PROMETHEUS_PACKAGE], check=False)
        return
    if shutil.which("update-rc.d"):
        subprocess.run(["update-rc.d", PROMETHEUS_PACKAGE, "disable"], check=False)
    if shutil.which("service"):
        subprocess.run(
            ["service", PROMETHEUS_PACKAGE, "stop"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def install_prometheus() -> tuple[Path, Path]:
    prometheus, promtool = prometheus_path(), promtool_path()
    if prometheus is not None and promtool is not None:
        return prometheus, promtool
    say("installing Debian's prometheus package (prometheus and promtool)")
    apt_get("update", "-qq")
    apt_get("install", "-y", "-qq", "--no-install-recommends", PROMETHEUS_PACKAGE)
    stop_system_prometheus()
    prometheus, promtool = prometheus_path(), promtool_path()
    if prometheus is None or promtool is None:
        raise SystemExit("prometheus or promtool missing after installing the package")
    return prometheus, promtool


def main() -> int:
    helm = install_helm()
    prometheus, promtool = install_prometheus()
    for tool in (helm, prometheus, promtool):
        say(f"ready: {tool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
