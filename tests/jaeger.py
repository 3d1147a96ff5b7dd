"""Jaeger (v2, the `jaeger` program of the Go module `github.com/jaegertracing/jaeger`, installed by
`python -m devstack install --deploy-tools`) as a subprocess on free ports: OTLP/HTTP in, traces
in memory, its query API out."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devstack.deploy_tools import INSTALL_COMMAND, jaeger_path
from tests.conftest import free_port, kill, wait_http_ready, wait_until


class Jaeger:
    """One Jaeger, its receiver and query API each on a port of its own."""

    def __init__(self, directory: Path) -> None:
        binary = jaeger_path()
        if binary is None:
            pytest.fail(f"jaeger is not installed: run `{INSTALL_COMMAND}` (make test runs it)")
        self.otlp_port, self.query_port, grpc_port = free_port(), free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.otlp_port}"
        self.query = f"http://127.0.0.1:{self.query_port}"
        config = {
            "service": {
                "extensions": ["jaeger_storage", "jaeger_query"],
                "pipelines": {
                    "traces": {"receivers": ["otlp"], "exporters": ["jaeger_storage_exporter"]}
                },
                # Its own metrics would take a fixed port (8888).
                "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
            },
            "extensions": {
                "jaeger_storage": {"backends": {"memory": {"memory": {"max_traces": 10_000}}}},
                "jaeger_query": {
                    "storage": {"traces": "memory"},
                    "http": {"endpoint": f"127.0.0.1:{self.query_port}"},
                    "grpc": {"endpoint": f"127.0.0.1:{grpc_port}"},
                },
            },
            "receivers": {
                "otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{self.otlp_port}"}}}
            },
            "exporters": {"jaeger_storage_exporter": {"trace_storage": "memory"}},
        }
        config_path = directory / "jaeger.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = directory / "jaeger.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(binary), "--config", str(config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_http_ready(f"{self.query}/api/services", self.process, self.log_path, "jaeger")

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """The trace as Jaeger's query API returns it, or None while it has none of it."""
        response = httpx.get(f"{self.query}/api/traces/{trace_id}", timeout=10)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        data: list[dict[str, Any]] = response.json()["data"]
        return data[0] if data else None

    def wait_for(
        self, trace_id: str, complete: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        """The trace once `complete` says it holds every span expected (they arrive in the
        exporters' batches, one process's at a time)."""

        def found() -> dict[str, Any] | None:
            trace = self.trace(trace_id)
            return trace if trace is not None and complete(trace) else None

        trace: dict[str, Any] = wait_until(found, timeout, f"the spans of trace {trace_id}")
        return trace

    def stop(self) -> None:
        kill(self.process)  # its traces are in memory: nothing to keep
