"""Load: many SDK clients searching and asking (retrieval only) at once, for a fixed time.

`run_load` starts `clients` threads, each with its own `ragfleet.Client`, that alternate Search and
Ask(generate=False) on one index for `seconds`. It reports the calls, the errors (goal: none), the
p50 and p99 latency of each kind, and the resident memory of the Pipeline and the Retriever before
and after (and at the peak, reset before the run).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ragfleet
from tests.reliability.probes import WORDS, corpus, memory_mb, reset_peak
from tools.fleet import LocalFleet

INDEX = "load"
PROCESSES = ("pipeline", "retriever-bm25")


@dataclass
class LoadReport:
    clients: int
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"search": [], "ask": []})
    errors: Counter = field(default_factory=Counter)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        def percentile(values: list[float], q: int) -> float:
            if len(values) < 2:
                return round(values[0] * 1000, 1) if values else 0.0
            return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 1)

        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "calls": sum(len(v) for v in self.latencies.values()) + sum(self.errors.values()),
            "errors": dict(self.errors),
            **{
                f"{kind}_ms": {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}
                for kind, v in self.latencies.items()
            },
            "memory_mb": self.memory,
        }


def _client(address: str, n: int, stop_at: float, report: LoadReport, lock: threading.Lock) -> None:
    with ragfleet.Client(address, timeout=60) as client:
        i = n
        while time.monotonic() < stop_at:
            kind = "search" if i % 2 == 0 else "ask"
            question = f"{WORDS[i % len(WORDS)]} {WORDS[(i * 3 + 1) % len(WORDS)]}"
            start = time.monotonic()
            try:
                if kind == "search":
                    client.search(question, index=INDEX, top_k=10)
                else:
                    client.ask_once(question, index=INDEX, top_k=5, generate=False)
            except ragfleet.errors.RagfleetError as err:
                with lock:
                    report.errors[f"{kind}: {type(err).__name__}"] += 1
            else:
                with lock:
                    report.latencies[kind].append(time.monotonic() - start)
            i += 1


def prepare(fleet: LocalFleet, documents: int = 300) -> None:
    with ragfleet.Client(fleet.address, timeout=120) as client:
        client.ingest(corpus(documents, words=120), index=INDEX, upsert=True)


def run_load(fleet: LocalFleet, *, clients: int, seconds: float) -> LoadReport:
    """`clients` threads of Search and Ask on the index `prepare` made, for `seconds`."""
    report = LoadReport(clients=clients, seconds=seconds)
    pids = {name: fleet.pid(name) for name in PROCESSES}
    before = {}
    for name, pid in pids.items():
        reset_peak(pid)
        before[name] = memory_mb(pid)["rss"]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    threads = [
        threading.Thread(target=_client, args=(fleet.address, n, stop_at, report, lock))
        for n in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, pid in pids.items():
        now = memory_mb(pid)
        report.memory[name] = {"before": before[name], "peak": now["hwm"], "after": now["rss"]}
    return report
