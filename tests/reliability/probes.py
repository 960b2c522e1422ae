"""What the reliability checks measure from outside a running service: the status codes a call may
end with, a server process's memory, a folder's contents, a small corpus, and a JSON summary line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The codes the services document; UNKNOWN and INTERNAL (a server fault) are never an answer to input.
DOCUMENTED_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)

WORDS = ("harbour", "keeper", "lantern", "tide", "granite", "ferry", "gull", "beacon", "reef", "storm")


def corpus(n: int, *, words: int = 30, prefix: str = "doc") -> list[dict[str, Any]]:
    """`n` small documents of the words above, different for each id, deterministic."""
    return [
        {
            "id": f"{prefix}-{i}",
            "title": f"{prefix} {i}",
            "text": " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) + f" item{i}.",
            "metadata": {"group": str(i % 4)},
        }
        for i in range(n)
    ]


def memory_mb(pid: int) -> dict[str, float]:
    """A process's resident memory now (rss) and at its peak so far (hwm), in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB
    return {"rss": round(fields["VmRSS"], 1), "hwm": round(fields["VmHWM"], 1)}


def reset_peak(pid: int) -> None:
    """Sets a process's peak resident memory (VmHWM) to its memory now, so the next peak is new."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def tree_digest(directory: Path) -> str:
    """A hash of every file's relative path and bytes under `directory`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def serving(address: str, timeout: float = 5.0) -> bool:
    """The server at `address` answers its health check with SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def print_summary(check: str, summary: dict[str, Any]) -> None:
    """One JSON line per check, for the closing table of the reliability suite; appended to the file
    RAGFLEET_RELIABILITY_LOG names too, when set (`make reliability` sets it)."""
    line = json.dumps({"check": check, **summary}, sort_keys=True)
    print(line)
    if log := os.environ.get("RAGFLEET_RELIABILITY_LOG"):
        with open(log, "a", encoding="utf-8") as out:
            out.write(line + "\n")
