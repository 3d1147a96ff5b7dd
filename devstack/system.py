"""The few operating-system chores of the stack: running commands (as root, or as the postgres
user), locks, pids, ports and log tails."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from devstack.settings import StackError


def say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def is_root() -> bool:
    return os.geteuid() == 0


def as_root(command: Sequence[str]) -> list[str]:
    """`command` as root: itself when we are root, else through sudo."""
    if is_root():
        return list(command)
    if shutil.which("sudo") is None:
        raise StackError(f"need root (or sudo) to run: {' '.join(command)}")
    return ["sudo", *command]


def postgres_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "user 'postgres' does not exist (is PostgreSQL installed? run `make install`)"
        ) from None


def as_pg_owner(command: Sequence[str]) -> list[str]:
    """PostgreSQL refuses to run as root, so as root the cluster belongs to `postgres`."""
    if is_root():
        return ["runuser", "-u", "postgres", "--", *command]
    return list(command)


def run_quietly(command: Sequence[str], log: Path, cwd: Path | None = None) -> bool:
    """Run `command` with its output appended to `log`; whether it succeeded. Our own descriptors
    (the stack lock) are not inherited: a server it forks must not hold them for ever."""
    with log.open("ab") as output:
        completed = subprocess.run(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            check=False,
        )
    return completed.returncode == 0


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return ""
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- last lines of {path} ---\n" + "\n".join(tail) + f"\n--- end of {path} ---"


def port_in_use(port: int) -> bool:
    """Connecting is the only check that works for a listener of any owner."""
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` for the block: serialises commands on one stack directory
    (two `up` at once), or two fetches of the Kafka jars. Python's descriptors are not inherited
    by the processes we start, so a server cannot keep the lock after we return."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs. A child of ours that ended (the broker the test process started, then
    killed) is reaped here. A zombie has ended once it is the last of its threads: its main
    thread shows "Z" as soon as it exits, while the others (a JVM has dozens) may still run and
    hold the listening sockets."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may contain any byte.
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state != "Z" or threads > 1:
        return True
    # It became a zombie after the first look: if it is our child, collect it now, or it stays
    # in the process table.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return False


def wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def signal_process(pid: int, signal_number: int) -> None:
    try:
        os.kill(pid, signal_number)
    except OSError as error:
        if error.errno != errno.ESRCH:
            raise


def fail(error: StackError) -> None:
    """Report a failed command the way the stack does: its details, then one line."""
    if error.details:
        print(error.details, file=sys.stderr)
    print(f"[stack] ERROR: {error}", file=sys.stderr, flush=True)
