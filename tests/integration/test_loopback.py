"""A default embedded fleet stays on loopback. After `ragfleet up` (ray.host 127.0.0.1), every TCP socket
a process of the fleet listens on (Ray's GCS, raylet, agents and workers; Serve's controller, proxies and
replicas) is bound to 127.0.0.1, none to another interface or to all of them. Exposing the fleet is an
explicit setting, and without authentication `ragfleet up` refuses it."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import ragfleet
from services.runtime.settings import is_loopback
from tools.fleet import RAGFLEET, free_port, service_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

TCP_LISTEN = "0A"  # the state column of a listening socket in /proc/net/tcp


def _address(hex_address: str) -> tuple[str, int]:
    """An address of /proc/net/tcp{,6}: the IP as 32-bit words printed in host byte order, the port."""
    ip, port = hex_address.split(":")
    words = [int(ip[i : i + 8], 16) for i in range(0, len(ip), 8)]
    family = socket.AF_INET if len(words) == 1 else socket.AF_INET6
    return socket.inet_ntop(family, struct.pack(f"={len(words)}I", *words)), int(port, 16)


def _listening() -> dict[int, tuple[str, int]]:
    """Every listening TCP socket of this network namespace, by inode."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == TCP_LISTEN:
                found[int(fields[9])] = _address(fields[1])
    return found


def _processes_of(home: Path) -> set[int]:
    """The processes whose environment names this RAGFLEET_HOME (the Ray daemons `ragfleet up` starts)
    and their descendants (Ray's agents and workers, which overwrite their environment's memory with
    their process title)."""
    mark = f"RAGFLEET_HOME={home}".encode()
    children: dict[int, list[int]] = {}
    marked = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(pid)
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                marked.append(pid)
        except OSError:  # another user's, or gone
            continue
    family: set[int] = set()
    while marked:
        pid = marked.pop()
        if pid not in family:
            family.add(pid)
            marked.extend(children.get(pid, []))
    return family


def _sockets(pids: set[int]) -> list[tuple[str, str, int]]:
    """(process, host, port) for every socket those processes listen on."""
    listening = _listening()
    found = []
    for pid in sorted(pids):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            inode = int(target[len("socket:[") : -1]) if target.startswith("socket:[") else None
            if inode in listening:
                found.append((f"{pid} {command[:80]}", *listening[inode]))
    return found


def _stop(home: Path) -> None:
    """Ends the fleet's processes by pid: `ragfleet down` runs `ray stop`, which would also stop every
    other Ray instance of this user on the machine."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _processes_of(home):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        while _processes_of(home) and time.time() < deadline:
            time.sleep(0.5)


def _default_env(home: Path, **settings: str) -> dict[str, str]:
    """The environment of a user who set nothing about binding or auth, plus `settings`."""
    env = service_env(home)
    configured = ("RAGFLEET_CONFIG", "RAGFLEET_RAY__HOST", "RAGFLEET_AUTH__", "RAY_")
    for key in [key for key in env if key.startswith(configured)]:
        del env[key]
    env.update(settings)
    return env


@dataclass
class Fleet:
    home: Path
    ray_port: int
    grpc_port: int


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("loopback-home")
    running = Fleet(home, ray_port=free_port(), grpc_port=free_port())
    env = _default_env(
        home,
        RAGFLEET_RAY__PORT=str(running.ray_port),
        RAGFLEET_RAY__GRPC_PORT=str(running.grpc_port),
        RAGFLEET_RAY__HTTP_PORT=str(free_port()),
    )
    try:
        started = subprocess.run(
            [RAGFLEET, "up", "--wait", "600"], env=env, cwd=home, capture_output=True, text=True, timeout=900
        )
        if started.returncode != 0:
            output = (started.stdout + started.stderr)[-4000:]
            pytest.fail(f"ragfleet up failed ({started.returncode}):\n{output}")
        yield running
    finally:
        _stop(home)


@pytest.mark.ray
def test_every_socket_of_a_default_fleet_is_on_loopback(fleet: Fleet) -> None:
    sockets = _sockets(_processes_of(fleet.home))
    # The scan sees the fleet: Ray's GCS and Serve's gRPC proxy are among the sockets.
    assert {fleet.ray_port, fleet.grpc_port} <= {port for _, _, port in sockets}
    exposed = [f"{host}:{port} ({process})" for process, host, port in sockets if not is_loopback(host)]
    assert exposed == []


@pytest.mark.ray
def test_the_fleet_answers_on_loopback(fleet: Fleet) -> None:
    with ragfleet.Client(f"127.0.0.1:{fleet.grpc_port}", application="pipeline", timeout=60) as client:
        assert all(service.healthy for service in client.describe().services)


def test_up_refuses_to_expose_an_open_fleet(tmp_path: Path) -> None:
    env = _default_env(tmp_path, RAGFLEET_RAY__HOST="0.0.0.0", RAGFLEET_RAY__PORT=str(free_port()))
    started = subprocess.run(
        [RAGFLEET, "up"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 1
    assert "would listen on 0.0.0.0 with no authentication" in " ".join(started.stdout.split())
    assert not _processes_of(tmp_path)
