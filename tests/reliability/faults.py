"""Processes killed at the worst moments (SIGKILL: no shutdown of any kind), and what callers see.

- `kill_retriever_under_search`: clients search through the Pipeline with the SDK's default retries
  while the retriever is killed and started again. A search may fail only with UNAVAILABLE, and once
  the retriever is back (healthy) and the Pipeline has had `reconnect_s` to notice, every search works.
- `kill_retriever_during_ingest`: an ingest is killed part way, at a random moment. The client gets
  UNAVAILABLE (or, when the kill came after the commit, its report); after a restart the index is at
  the version it was at before (or the one after, complete), no version folder but the manifest's is
  left, the passage count is the version's, and the next ingest works.
- `kill_generator_mid_stream`: an Ask is streaming tokens when the generator is killed; the client
  gets UNAVAILABLE within `PROMPT_S`.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ragfleet
from services.runtime.storage import load_manifest
from tests.integration.test_generator_fleet import save_checkpoint
from tests.reliability.probes import corpus
from tools.fleet import LocalFleet

INDEX = "faults"
# How soon a client must hear that the generator it streams from died.
PROMPT_S = 5.0


@dataclass
class SearchOutcome:
    start: float
    end: float
    error: str | None  # the ragfleet.errors class name, None for a success


@dataclass
class SearchFaultReport:
    kills: int = 0
    searches: list[SearchOutcome] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)  # (killed, healthy again)
    broken: list[str] = field(default_factory=list)

    def after_back(self, search: SearchOutcome) -> float | None:
        """Seconds from the retriever being healthy again to the start of `search`, for the kill
        that a search ending then saw; None when it started while the retriever was down, or before
        any kill."""
        windows = [w for w in self.windows if w[0] <= search.end]
        if not windows or search.start < windows[-1][1]:
            return None
        return search.start - windows[-1][1]

    def summary(self) -> dict[str, Any]:
        failed = [s for s in self.searches if s.error]
        late = [t for t in map(self.after_back, failed) if t is not None]
        return {
            "kills": self.kills,
            "searches": len(self.searches),
            "failed": len(failed),
            "failed_codes": dict(Counter(s.error for s in failed)),
            "failed_after_back": len(late),
            "down_s": [round(back - killed, 2) for killed, back in self.windows],
            "last_failure_after_back_s": round(max(late, default=0.0), 2),
            "broken": self.broken[:5],
        }


def _searcher(address: str, stop: threading.Event, outcomes: list[SearchOutcome]) -> None:
    with ragfleet.Client(address, timeout=30) as client:  # the SDK's default retries
        while not stop.is_set():
            start = time.monotonic()
            try:
                client.search("keeper tide", index=INDEX, top_k=5)
                error = None
            except ragfleet.errors.RagfleetError as err:
                error = type(err).__name__
            outcomes.append(SearchOutcome(start, time.monotonic(), error))


def kill_retriever_under_search(
    fleet: LocalFleet, *, clients: int, kills: int, down_s: float, between_s: float, reconnect_s: float
) -> SearchFaultReport:
    """`kills` times: search for `between_s`, SIGKILL the bm25 retriever, wait `down_s`, start it;
    searches that start `reconnect_s` after it is healthy again must work."""
    with ragfleet.Client(fleet.address, timeout=60) as client:
        client.ingest(corpus(30), index=INDEX, upsert=True)
    report = SearchFaultReport()
    stop = threading.Event()
    outcomes: list[SearchOutcome] = []
    threads = [
        threading.Thread(target=_searcher, args=(fleet.address, stop, outcomes)) for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    try:
        for _ in range(kills):
            time.sleep(between_s)
            killed = time.monotonic()
            fleet.kill("retriever-bm25")
            time.sleep(down_s)
            fleet.start("retriever-bm25")
            report.windows.append((killed, time.monotonic()))
            report.kills += 1
        time.sleep(between_s)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    report.searches = sorted(outcomes, key=lambda s: s.start)
    for search in report.searches:
        since = report.after_back(search)
        if search.error and search.error != "Unavailable":
            report.broken.append(f"a search failed with {search.error}")
        elif search.error and not any(killed <= search.end for killed, _ in report.windows):
            report.broken.append(f"a search failed ({search.error}) before any kill")
        elif search.error and since is not None and since >= reconnect_s:
            report.broken.append(f"a search failed {since:.1f} s after the retriever was back")
    return report


@dataclass
class IngestFaultReport:
    rounds: int = 0
    outcomes: Counter = field(default_factory=Counter)  # how each killed ingest ended for its client
    versions: list[str] = field(default_factory=list)  # "kept v3" or "committed v4"
    broken: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "client_saw": dict(self.outcomes),
            "versions": dict(Counter(v.split()[0] for v in self.versions)),
            "broken": self.broken[:5],
        }


def _described(client: ragfleet.Client) -> tuple[int, int]:
    (description,) = client.describe_index(INDEX).retrievers
    return description.version.version, description.passages


def kill_retriever_during_ingest(
    fleet: LocalFleet, *, rounds: int, documents: int, seed: int = 0
) -> IngestFaultReport:
    """`rounds` times: ingest `documents` documents and SIGKILL the bm25 retriever at a random moment
    of it, then start the retriever and check the index (see the module docstring)."""
    rng = random.Random(seed)
    report = IngestFaultReport()
    directory = fleet.home / "indexes" / "default" / INDEX / "bm25"
    with ragfleet.Client(fleet.address, timeout=120) as client:
        client.ingest(corpus(20), index=INDEX, upsert=True)
        timed = time.monotonic()
        client.ingest(corpus(documents, prefix="timing", words=60), index=f"{INDEX}-timing")
        whole = time.monotonic() - timed  # kills are drawn from the span one ingest takes
        for n in range(rounds):
            before = _described(client)
            outcome: list[str] = []
            docs = corpus(documents, prefix=f"r{n}", words=60)
            ingest = threading.Thread(target=_ingest, args=(client, docs, outcome))
            started = time.monotonic()
            ingest.start()
            time.sleep(rng.uniform(0.02, 0.9) * whole)
            fleet.kill("retriever-bm25")
            ingest.join()
            killed_after = time.monotonic() - started
            on_disk = load_manifest(directory)
            fleet.start("retriever-bm25")
            report.rounds += 1
            report.outcomes[outcome[0]] += 1
            after = _described(client)
            folders = sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name.startswith("v"))
            if outcome[0] == "ok":
                report.versions.append(f"committed v{after[0]}")
                if after != (before[0] + 1, before[1] + documents):
                    report.broken.append(f"round {n}: acknowledged, yet {after} after {before}")
            else:
                report.versions.append(
                    f"kept v{after[0]}" if after[0] == before[0] else f"committed v{after[0]}"
                )
                if outcome[0] != "Unavailable":
                    report.broken.append(
                        f"round {n}: killed after {killed_after:.2f} s, the client saw {outcome[0]}"
                    )
                if after not in (before, (before[0] + 1, before[1] + documents)):
                    report.broken.append(
                        f"round {n}: index at {after}, was {before} (disk v{on_disk and on_disk.version})"
                    )
            if folders != [f"v{after[0]:06d}"]:
                report.broken.append(f"round {n}: version folders {folders} at v{after[0]}")
            try:
                client.ingest([{"id": f"after-{n}", "text": f"recovered{n}"}], index=INDEX)
                found = client.search(f"recovered{n}", index=INDEX, top_k=1).results
                if found[0].passage.doc_id != f"after-{n}":
                    report.broken.append(f"round {n}: the next ingest is not found")
            except ragfleet.errors.RagfleetError as err:
                report.broken.append(f"round {n}: the next ingest failed: {err}")
    return report


def _ingest(client: ragfleet.Client, documents: list[dict[str, Any]], outcome: list[str]) -> None:
    try:
        client.ingest(documents, index=INDEX, batch_size=64)
        outcome.append("ok")
    except ragfleet.errors.RagfleetError as err:
        outcome.append(type(err).__name__)


@dataclass
class GeneratorFaultReport:
    events_before_kill: int = 0
    client_saw: str = ""
    seconds_to_error: float = 0.0
    broken: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "events_before_kill": self.events_before_kill,
            "client_saw": self.client_saw,
            "seconds_to_error": round(self.seconds_to_error, 2),
            "broken": self.broken,
        }


def kill_generator_mid_stream(fleet: LocalFleet, params: dict[str, Any]) -> GeneratorFaultReport:
    """Writes a tiny Retro checkpoint, asks with generation and SIGKILLs the generator when the first
    token arrives."""
    report = GeneratorFaultReport()
    save_checkpoint(fleet.home)
    with ragfleet.Client(fleet.address, timeout=120) as client:
        client.ingest(corpus(20), index=INDEX, upsert=True)
        question = "who keeps the lantern on the reef?"
        killed = 0.0
        try:
            for event in client.ask(question, index=INDEX, top_k=2, params=params):
                report.events_before_kill += 0 if killed else 1
                if event.WhichOneof("event") == "token" and not killed:
                    fleet.kill("generator")
                    killed = time.monotonic()
            report.client_saw = "the answer"
        except ragfleet.errors.RagfleetError as err:
            report.client_saw = type(err).__name__
        report.seconds_to_error = time.monotonic() - killed if killed else 0.0
    if not killed:
        report.broken.append("no token came before the stream ended")
    elif report.client_saw != "Unavailable":
        report.broken.append(f"the client saw {report.client_saw}, not Unavailable")
    elif report.seconds_to_error > PROMPT_S:
        report.broken.append(f"the client heard after {report.seconds_to_error:.1f} s")
    return report
