"""What an installer works with: apt-get, updated once per bootstrap, and the environment."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devstack.settings import StackError
from devstack.system import as_root, say

# Another apt or dpkg run may hold the lock for a while (unattended upgrades): wait for it.
APT_LOCK_TIMEOUT_S = 900


@dataclass
class Apt:
    """apt-get, updated once per bootstrap before the first install."""

    updated: bool = False

    def install(self, *packages: str) -> None:
        if shutil.which("apt-get") is None:
            raise StackError(f"apt-get not found; install manually: {' '.join(packages)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        lock = f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}"
        if not self.updated:
            say("apt-get update")
            self._run(["apt-get", "-o", lock, "update", "-qq"], env)
            self.updated = True
        say(f"apt-get install {' '.join(packages)}")
        self._run(["apt-get", "-o", lock, "install", "-y", "-qq", *packages], env)

    @staticmethod
    def _run(command: list[str], env: Mapping[str, str]) -> None:
        completed = subprocess.run(
            as_root(command), env=env, capture_output=True, text=True, check=False
        )
        if completed.returncode != 0:
            raise StackError(f"{' '.join(command[:4])} failed", completed.stderr[-4000:])


@dataclass
class Bootstrap:
    kafka_libs_dir: Path
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    apt: Apt = field(default_factory=Apt)
