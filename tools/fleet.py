"""Runs ragfleet services as local `ragfleet serve` processes on loopback ports: a test harness.

The integration tests and the benchmarks use it to stand up a real fleet without Ray: the same processes
docker-compose runs, with the gateway pointed at the retrievers by environment variables.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

RAGFLEET = str(Path(sys.executable).with_name("ragfleet"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Polls the standard health service until it says SERVING; fails fast if the process exits."""
    deadline = time.time() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"service on port {port} exited with {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.3)
    raise TimeoutError(f"service on port {port} not healthy after {timeout:.0f} s")


def service_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAGFLEET_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    env.update(extra)
    return env


@dataclass
class Service:
    name: str
    port: int
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [RAGFLEET, "serve", self.name, "--port", str(self.port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait(self) -> None:
        wait_healthy(self.port, self.proc)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class LocalFleet:
    home: Path
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.services["pipeline"].address

    def pid(self, name: str) -> int:
        return self.services[name].proc.pid

    def kill(self, name: str) -> None:
        """SIGKILLs one service (no shutdown of any kind) and waits for it to be gone."""
        self.services[name].kill()

    def start(self, name: str) -> None:
        """Starts a killed or stopped service again on its port and waits until it is healthy."""
        service = self.services[name]
        service.start()
        service.wait()

    def restart(self, name: str) -> None:
        self.kill(name)
        self.start(name)

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()


def start_local_fleet(
    home: Path,
    names: tuple[str, ...] = ("retriever-dense", "retriever-bm25", "pipeline"),
    **env_overrides: str,
) -> LocalFleet:
    """Starts the named services at once and waits until each is healthy; `env_overrides` are extra
    environment variables (settings) for all of them. The gateway finds the retrievers, the reranker and
    the generator, and the generator the dense retriever (else bm25), on their loopback ports."""
    fleet = LocalFleet(home=home)
    ports = {name: free_port() for name in names}
    retrievers = {
        name.removeprefix("retriever-"): {"address": f"127.0.0.1:{ports[name]}"}
        for name in names
        if name.startswith("retriever-")
    }
    env = service_env(home, RAGFLEET_GATEWAY__RETRIEVERS=json.dumps(retrievers), **env_overrides)
    if "pipeline" in ports:
        pipeline = json.dumps({"address": f"127.0.0.1:{ports['pipeline']}"})
        env.setdefault("RAGFLEET_EVALUATOR__PIPELINE", pipeline)
    if "reranker" in ports:
        reranker = json.dumps({"address": f"127.0.0.1:{ports['reranker']}"})
        env.setdefault("RAGFLEET_GATEWAY__RERANKER", reranker)
    if "generator" in ports:
        generator = json.dumps({"address": f"127.0.0.1:{ports['generator']}"})
        env.setdefault("RAGFLEET_GATEWAY__GENERATOR", generator)
        if "retriever-dense" in ports:
            dense = json.dumps({"address": f"127.0.0.1:{ports['retriever-dense']}"})
            env.setdefault("RAGFLEET_GENERATOR__RETRIEVER", dense)
        elif "retriever-bm25" in ports:  # a fleet without the (slow to start) dense retriever
            bm25 = json.dumps({"address": f"127.0.0.1:{ports['retriever-bm25']}"})
            env.setdefault("RAGFLEET_GENERATOR__RETRIEVER", bm25)
            env.setdefault("RAGFLEET_GENERATOR__RETRIEVER_BACKEND", "bm25")
    for name in names:
        fleet.services[name] = Service(name, ports[name], env)
        fleet.services[name].start()
    try:
        for service in fleet.services.values():
            service.wait()
    except BaseException:
        fleet.stop()
        raise
    return fleet
