"""The one bootstrap step for what the system must provide: PostgreSQL, Java and Maven, the Kafka
broker's jars, and on request chromium, docker-compose, wrk, helm and prometheus. Each installer
checks first and installs only what is missing; the stack commands only check (`require_*`)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path

from devstack.deploy_tools import install_deploy_tools
from devstack.packages import Bootstrap
from devstack.settings import KAFKA_POM, PG_MAJOR, MissingDependency, StackError
from devstack.system import as_root, locked, log_tail, say

JAVA_MAJOR = 17
DEBIAN_CLUSTER_CONF = Path(f"/etc/postgresql/{PG_MAJOR}/main")
# ---------------------------------------------------------------- checks


def find_pg_bindir(environ: Mapping[str, str]) -> Path | None:
    """The bin directory of a PostgreSQL of our major version: PG_BIN, Debian's, pg_config's."""
    candidates = [environ.get("PG_BIN", ""), f"/usr/lib/postgresql/{PG_MAJOR}/bin"]
    if pg_config := shutil.which("pg_config"):
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(found.stdout.strip())
    for candidate in filter(None, candidates):
        bindir = Path(candidate)
        if not all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            continue
        version = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False
        )
        if f" {PG_MAJOR}." in version.stdout:
            return bindir
    return None


def java_major_version() -> int | None:
    if shutil.which("java") is None:
        return None
    shown = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
    found = re.search(r'version "(\d+)', shown.stderr + shown.stdout)
    return int(found.group(1)) if found else None


def kafka_version(pom: Path = KAFKA_POM) -> str:
    namespace = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = ET.parse(pom).findtext("m:properties/m:kafka.version", namespaces=namespace)  # noqa: S314
    if not version:
        raise StackError(f"no <kafka.version> in {pom}")
    return version


def kafka_libs_marker(pom: Path = KAFKA_POM) -> str:
    """What `.complete` of a finished fetch holds: a changed pom means a new fetch."""
    fingerprint = hashlib.sha256(pom.read_bytes()).hexdigest()
    return f"kafka {kafka_version(pom)} pom-sha256 {fingerprint}\n"


def kafka_libs_complete(libs_dir: Path) -> bool:
    marker = libs_dir / ".complete"
    return marker.is_file() and marker.read_text() == kafka_libs_marker()


def require_postgres(environ: Mapping[str, str]) -> Path:
    if (bindir := find_pg_bindir(environ)) is None:
        raise MissingDependency(f"PostgreSQL {PG_MAJOR}")
    return bindir


def require_kafka(libs_dir: Path) -> None:
    if (java := java_major_version()) is None or java < JAVA_MAJOR:
        raise MissingDependency(f"Java {JAVA_MAJOR}")
    if not kafka_libs_complete(libs_dir):
        raise MissingDependency(f"the Kafka broker (jars in {libs_dir})")


# ---------------------------------------------------------------- installers


def install_postgres(bootstrap: Bootstrap) -> None:
    if find_pg_bindir(bootstrap.environ) is not None:
        return
    say(f"installing PostgreSQL {PG_MAJOR} (apt)")
    bootstrap.apt.install(f"postgresql-{PG_MAJOR}")
    stop_debian_system_cluster()
    require_postgres(bootstrap.environ)


def stop_debian_system_cluster() -> None:
    """Debian's package creates and starts a system cluster on 5432; ours needs the port."""
    if not DEBIAN_CLUSTER_CONF.is_dir():
        return
    say(f"stopping Debian's system cluster {PG_MAJOR}/main and setting it to manual start")
    subprocess.run(
        as_root(["pg_ctlcluster", str(PG_MAJOR), "main", "stop"]),
        capture_output=True,
        check=False,
    )
    subprocess.run(
        as_root(["tee", str(DEBIAN_CLUSTER_CONF / "start.conf")]),
        input=b"manual\n",
        stdout=subprocess.DEVNULL,
        check=True,
    )


def install_java_and_maven(bootstrap: Bootstrap) -> None:
    if (java := java_major_version()) is None or java < JAVA_MAJOR:
        say(f"installing Java {JAVA_MAJOR} (apt)")
        bootstrap.apt.install(f"openjdk-{JAVA_MAJOR}-jre-headless")
    if shutil.which("mvn") is None:
        say("installing Maven (apt)")
        bootstrap.apt.install("maven")


def install_kafka_libs(bootstrap: Bootstrap) -> None:
    libs_dir = bootstrap.kafka_libs_dir
    if kafka_libs_complete(libs_dir):
        return
    install_java_and_maven(bootstrap)
    # Several checkouts or terminals may bootstrap at once; only one fetches.
    with locked(libs_dir.with_name(libs_dir.name + ".lock")):
        if kafka_libs_complete(libs_dir):
            return
        staging = libs_dir.with_name(f"{libs_dir.name}.tmp.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        say(f"fetching Kafka {kafka_version()} jars with Maven into {libs_dir}")
        with tempfile.NamedTemporaryFile(suffix=".log") as mvn_log:
            log = Path(mvn_log.name)
            with log.open("ab") as output:
                fetched = subprocess.run(
                    ["mvn", "-q", "-B", "-ntp", "-Dstyle.color=never", "-f", str(KAFKA_POM),
                     "dependency:copy-dependencies", f"-DoutputDirectory={staging}"],
                    stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, check=False,
                )  # fmt: skip
            if fetched.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                raise StackError("Maven could not fetch the Kafka jars", log_tail(log))
        if not any(staging.glob("kafka_2.13-*.jar")):
            raise StackError("kafka_2.13 jar missing after the Maven fetch")
        (staging / ".complete").write_text(kafka_libs_marker())
        shutil.rmtree(libs_dir, ignore_errors=True)
        staging.rename(libs_dir)


def install_apt_tool(program: str, package: str) -> Callable[[Bootstrap], None]:
    """An installer of one Debian package, skipped when `program` is already on PATH."""

    def install(bootstrap: Bootstrap) -> None:
        if shutil.which(program) is not None:
            return
        say(f"installing {package} (apt)")
        bootstrap.apt.install(package)

    install.__name__ = f"install_{package}"
    return install


BASE_INSTALLERS: tuple[Callable[[Bootstrap], None], ...] = (
    install_postgres,
    install_java_and_maven,
    install_kafka_libs,
)
OPTIONAL_INSTALLERS: dict[str, Callable[[Bootstrap], None]] = {
    "browser": install_apt_tool("chromium", "chromium"),
    "compose": install_apt_tool("docker-compose", "docker-compose"),
    "bench_tools": install_apt_tool("wrk", "wrk"),
    "deploy_tools": install_deploy_tools,
}


def bootstrap(kafka_libs_dir: Path, extras: list[str]) -> None:
    """Install what is missing: the base installers, then the optional ones named in `extras`."""
    context = Bootstrap(kafka_libs_dir)
    for installer in (*BASE_INSTALLERS, *(OPTIONAL_INSTALLERS[name] for name in extras)):
        installer(context)
