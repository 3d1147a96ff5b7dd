"""The container image (Dockerfile) agrees with the service's settings, and the lock files with
pyproject.toml; both checked as text (tests/deploy/test_compose.py checks the compose file)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from order_viewer.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"

SETTINGS = {name.upper(): field for name, field in Settings.model_fields.items()}
# Written out in the compose file although they are the defaults: they must stay the defaults.
CONTRACT_DEFAULTS = (
    "KAFKA_TOPIC",
    "KAFKA_DLQ_TOPIC",
    "KAFKA_GROUP_ID",
    "HTTP_PORT",
    "CACHE_CAPACITY",
    "LOG_LEVEL",
)


def healthcheck_url(test: list[str] | str) -> str:
    urls = re.findall(r"https?://[^\s'\"]+", json.dumps(test))
    assert len(urls) == 1, f"expected one URL in the healthcheck {test!r}"
    url: str = urls[0]
    return url


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), one list per FROM stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in map(str.strip, text.splitlines()):
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        assert stages, "the Dockerfile must start with FROM"
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def arguments_of(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [arguments for name, arguments in stage if name == instruction]


def test_the_image_is_multi_stage_slim_and_runs_as_a_user() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert arguments_of(stage, "FROM")[0].startswith("python:3.11-slim")
    final = stages[-1]
    users = arguments_of(final, "USER")
    assert users, "the final stage must set a USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    for stage in stages:
        for command in arguments_of(stage, "RUN"):
            # No `.[dev]`, `order-viewer[dev,...]`: only the runtime dependencies.
            assert not re.search(r"\[[^\]]*\bdev\b", command), command


def test_the_image_serves_http_with_a_liveness_healthcheck() -> None:
    final = dockerfile_stages()[-1]
    port = str(SETTINGS["HTTP_PORT"].default)
    assert port in " ".join(arguments_of(final, "EXPOSE")).split()
    assert "HTTP_HOST=0.0.0.0" in " ".join(arguments_of(final, "ENV")).split()

    [healthcheck] = arguments_of(final, "HEALTHCHECK")
    url = urlsplit(healthcheck_url(healthcheck))
    assert url.path == "/livez"
    assert str(url.port) == port

    assert arguments_of(final, "ENTRYPOINT") == ['["order-viewer"]']
    assert arguments_of(final, "CMD") == ['["serve"]']


def test_the_build_context_leaves_out_local_state() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().splitlines())
    assert {".git", ".venv", ".stack", ".env", "tests", "test-artifacts"} <= ignored


def locked_versions(lock: str) -> dict[str, str]:
    """name -> pinned version of a requirements lock file (pip's hash-checking format)."""
    pins = {}
    for line in (ROOT / "requirements" / lock).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)", line)
        if match:
            pins[canonical_name(match[1])] = match[2]
    return pins


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> dict[str, str]:
    """name -> specifier of the requirements as pyproject.toml declares them."""
    parsed = [Requirement(requirement) for requirement in requirements]
    return {canonical_name(req.name): str(req.specifier) for req in parsed}


@pytest.mark.parametrize(
    ("lock", "extras"), [("main.txt", []), ("dev.txt", ["dev"])], ids=["main", "dev"]
)
def test_every_declared_dependency_is_locked_at_a_version_it_allows(
    lock: str, extras: list[str]
) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = declared(project["dependencies"])
    for extra in extras:
        wanted |= declared(project["optional-dependencies"][extra])
    pins = locked_versions(lock)
    for name, specifier in wanted.items():
        assert name in pins, f"{name} is not in requirements/{lock}: run `make lock`"
        assert SpecifierSet(specifier).contains(pins[name], prereleases=True), (
            f"requirements/{lock} pins {name}=={pins[name]}, outside {specifier}: run `make lock`"
        )


def test_every_locked_version_carries_hashes() -> None:
    for lock in ("main.txt", "dev.txt"):
        text = (ROOT / "requirements" / lock).read_text()
        entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
        for entry in entries:
            if "==" in entry:
                assert "--hash=sha256:" in entry, entry.splitlines()[0]
