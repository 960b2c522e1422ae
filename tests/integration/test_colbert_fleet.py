"""The colbert retriever in a real fleet: `ragfleet serve retriever-colbert` (MiniLM, offline), a bm25
retriever and the pipeline on loopback, driven through the SDK and the CLI. Covers ingest routing
(gateway.default_retrievers), PLAID and exhaustive search, search options, rebuild, delete and errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ragfleet
from services.cli import app
from services.demo.corpus import demo_documents, demo_questions
from services.runtime.settings import get_settings
from tools.fleet import LocalFleet, start_local_fleet

pytestmark = pytest.mark.integration

INDEX = "islands"
# Four questions' islands and two more, four documents each: small enough to encode in seconds.
QUESTIONS = demo_questions()[:4]
ISLANDS = {q["doc_id"].split("-")[0] for q in QUESTIONS} | {"bruneth", "garrita"}
DOCUMENTS = [d for d in demo_documents() if d["id"].split("-")[0] in ISLANDS]
SPEC = {"retrievers": ["colbert", "bm25"], "chunking": {"whole_documents": True}}
MODEL_ID = "colbert:ragfleet-colbert@"  # the shipped default's, then its fingerprint


@pytest.fixture(scope="module")
def colbert_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    running = start_local_fleet(
        tmp_path_factory.mktemp("colbert-home"),
        ("retriever-colbert", "retriever-bm25", "pipeline"),
        RAGFLEET_GATEWAY__DEFAULT_RETRIEVERS='["bm25"]',
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(colbert_fleet: LocalFleet) -> Iterator[ragfleet.Client]:
    with ragfleet.Client(colbert_fleet.address, timeout=300.0) as c:
        report = c.ingest(DOCUMENTS, index=INDEX, spec=SPEC)
        assert sorted(r.version.retriever for r in report.retrievers) == ["bm25", "colbert"]
        yield c


def versions(c: ragfleet.Client, index: str = INDEX) -> dict[str, int]:
    return {d.version.retriever: d.version.version for d in c.describe_index(index).retrievers}


def top_docs(response) -> list[str]:
    return [r.passage.doc_id for r in response.results]


def test_an_ingest_naming_no_retrievers_goes_to_the_default_ones(client: ragfleet.Client) -> None:
    report = client.ingest(DOCUMENTS[:2], index="plain")
    assert [r.version.retriever for r in report.retrievers] == ["bm25"]
    assert [v.retriever for v in client.search("lighthouse", index="plain").versions] == ["bm25"]
    with pytest.raises(ragfleet.errors.NotFound):
        client.search("lighthouse", index="plain", retrievers=["colbert"])


def test_colbert_finds_the_answers_with_plaid_and_exhaustively(client: ragfleet.Client) -> None:
    for q in QUESTIONS:
        plaid = client.search(q["question"], index=INDEX, top_k=5, retrievers=["colbert"])
        exact = client.search(
            q["question"], index=INDEX, top_k=5, retrievers=["colbert"], options={"exhaustive": True}
        )
        assert top_docs(plaid)[0] == top_docs(exact)[0] == q["doc_id"], (q, top_docs(plaid), top_docs(exact))
        assert plaid.results[0].retriever == "colbert"
        assert plaid.versions[0].retriever == "colbert"
        assert plaid.versions[0].model_id.startswith(MODEL_ID)
        fused = client.search(q["question"], index=INDEX, top_k=3)
        assert {v.retriever for v in fused.versions} == {"colbert", "bm25"}
        assert q["doc_id"] in top_docs(fused)
    questions = [q["question"] for q in QUESTIONS]
    batch = client.search_batch(
        questions, index=INDEX, top_k=1, retrievers="colbert", options={"ncells": 4, "ndocs": 64}
    )
    assert [top_docs(r)[0] for r in batch.responses] == [q["doc_id"] for q in QUESTIONS]


def test_rebuild_moves_colbert_to_a_new_version_and_delete_is_visible(client: ragfleet.Client) -> None:
    before = versions(client)
    rebuilt = client.rebuild(INDEX)
    after = {r.version.retriever: r.version.version for r in rebuilt.retrievers}
    assert after == {"colbert": before["colbert"] + 1, "bm25": before["bm25"]}
    assert versions(client) == after
    question = QUESTIONS[1]
    found = client.search(question["question"], index=INDEX, top_k=5, retrievers=["colbert"])
    assert top_docs(found)[0] == question["doc_id"]
    client.delete(index=INDEX, doc_ids=[question["doc_id"]])
    for options in (None, {"exhaustive": True}):
        found = client.search(
            question["question"], index=INDEX, top_k=24, retrievers="colbert", options=options
        )
        assert question["doc_id"] not in top_docs(found)
    assert versions(client) == {"colbert": after["colbert"] + 1, "bm25": after["bm25"] + 1}


@pytest.mark.parametrize(
    ("call", "error", "field"),
    [
        (
            lambda c: c.search("q", index=INDEX, retrievers=["bm25"], options={"exhaustive": True}),
            ragfleet.errors.InvalidArgument,
            "options.exhaustive",
        ),
        (
            lambda c: c.search("q", index=INDEX, options={"ndocs": 10}),
            ragfleet.errors.InvalidArgument,
            "options.ndocs",
        ),
        (
            lambda c: c.search("q", index=INDEX, retrievers=["colbert"], options={"ncells": -1}),
            ragfleet.errors.InvalidArgument,
            "options.ncells",
        ),
        (
            lambda c: c.search(" ", index=INDEX, retrievers=["colbert"]),
            ragfleet.errors.InvalidArgument,
            "query",
        ),
        (
            lambda c: c.search("x" * 100_000, index=INDEX, retrievers=["colbert"]),
            ragfleet.errors.InvalidArgument,
            "query",
        ),
        (lambda c: c.search("q", index="nope", retrievers=["colbert"]), ragfleet.errors.NotFound, "nope"),
        (lambda c: c.rebuild("nope"), ragfleet.errors.NotFound, "nope"),
        (lambda c: c.rebuild(INDEX, retrievers=["splade"]), ragfleet.errors.InvalidArgument, "retrievers"),
        (
            lambda c: c.ingest(DOCUMENTS[:1], index="bad", spec={"retrievers": ["colbert"], "nbits": 3}),
            ragfleet.errors.InvalidArgument,
            "spec.nbits",
        ),
    ],
    ids=[
        "options-on-bm25",
        "options-fanned-out-to-bm25",
        "negative-ncells",
        "empty-query",
        "long-query",
        "unknown-index",
        "rebuild-unknown-index",
        "rebuild-unknown-retriever",
        "bad-nbits",
    ],
)
def test_errors_name_the_field_and_change_nothing(client: ragfleet.Client, call, error, field) -> None:
    before = versions(client)
    with pytest.raises(error, match=field):
        call(client)
    assert versions(client) == before
    with pytest.raises(ragfleet.errors.NotFound):
        client.describe_index("bad")


def test_cli_ingest_search_and_rebuild(
    client: ragfleet.Client, colbert_fleet: LocalFleet, tmp_path: Path
) -> None:
    runner = CliRunner()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS[:8]))
    address = ["--address", colbert_fleet.address]
    ingested = runner.invoke(
        app,
        [
            "ingest",
            str(corpus),
            "--index",
            "cli",
            "--retrievers",
            "colbert",
            "--nbits",
            "1",
            "--whole-documents",
        ]
        + address,
    )
    assert ingested.exit_code == 0, ingested.output
    assert "colbert: +8 passages" in ingested.output
    described = client.describe_index("cli").retrievers
    assert [(d.version.retriever, d.spec.nbits, d.passages) for d in described] == [("colbert", 1, 8)]
    question = QUESTIONS[0]["question"]
    for extra in ([], ["--exhaustive"], ["--ncells", "2", "--ndocs", "16", "--threshold", "0.3"]):
        searched = runner.invoke(
            app,
            ["search", question, "--index", "cli", "--retrievers", "colbert", "--top-k", "2", *extra]
            + address,
        )
        assert searched.exit_code == 0, searched.output
        assert "colbert" in searched.output
    rebuilt = runner.invoke(app, ["rebuild", "--index", "cli", "--retrievers", "colbert"] + address)
    assert rebuilt.exit_code == 0 and "colbert: version 2" in rebuilt.output, rebuilt.output
    failed = runner.invoke(
        app, ["search", question, "--index", "cli", "--exhaustive"] + ["--retrievers", "bm25"] + address
    )
    assert failed.exit_code == 1 and "options.exhaustive" in failed.output


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A RAGFLEET_HOME of the test's own: eval retrieval records its runs under it."""
    monkeypatch.setenv("RAGFLEET_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def test_cli_eval_retrieval_of_colbert(colbert_fleet: LocalFleet, tmp_path: Path, home: Path) -> None:
    beir = tmp_path / "islands"
    (beir / "qrels").mkdir(parents=True)
    corpus = [{"_id": d["id"], "title": d["title"], "text": d["text"]} for d in DOCUMENTS]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    queries = [{"_id": f"q{i}", "text": q["question"]} for i, q in enumerate(QUESTIONS)]
    (beir / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    qrels = "".join(f"q{i}\t{q['doc_id']}\t1\n" for i, q in enumerate(QUESTIONS))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    out = tmp_path / "results.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "retrieval",
            "--beir",
            str(beir),
            "--retrievers",
            "colbert",
            "--colbert-model",
            "all-MiniLM-L6-v2",
        ]
        + ["--json", str(out), "--address", colbert_fleet.address],
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    assert scores["colbert"]["mrr@10"] == 1.0 and set(scores) == {"colbert", "timings", "dataset"}
    assert list((home / "runs").glob("*.json"))
    # The index spec carries the checkpoint: one that does not exist fails the ingest.
    missing = tmp_path / "no-checkpoint"
    result = CliRunner().invoke(
        app,
        ["eval", "retrieval", "--beir", str(beir), "--retrievers", "colbert", "--colbert-model", str(missing)]
        + ["--address", colbert_fleet.address],
    )
    assert result.exit_code == 1 and "no such checkpoint folder" in " ".join(result.output.split())
