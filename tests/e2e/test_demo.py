"""The demo path end to end: `ragfleet demo` starts the fleet on an embedded Ray (Serve's gRPC proxy),
ingests the sample corpus, installs the demo's shipped Retro model (no training: `test_demo_model`
checks it is what the recipe makes), asks its questions through the SDK and prints ranked passages,
streamed answers with citations, how many answers are right and cite the right passage first, and the
time to the first answer. With --keep the fleet stays up, so the same Serve deployment is then checked
for generation and the error model."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import ragfleet
from services.demo.corpus import demo_questions
from tools.fleet import RAGFLEET, free_port

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)
def test_demo_runs_through_ray_serve(tmp_path: Path) -> None:
    grpc_port = free_port()
    env = dict(os.environ)
    env.update(
        RAGFLEET_HOME=str(tmp_path / "home"),
        RAGFLEET_RAY__GRPC_PORT=str(grpc_port),
        RAGFLEET_RAY__HTTP_PORT=str(free_port()),
        HF_HUB_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
        COLUMNS="200",
    )
    try:
        run = subprocess.run(
            [RAGFLEET, "demo", "--keep"], env=env, capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        out = run.stdout
        assert "using the demo's shipped Retro model" in out and "training" not in out, out[-3000:]
        summary = re.search(r"(\d+)/(\d+) questions have the answering document first, (\d+)/\d+ within", out)
        assert summary, out[-3000:]
        top1, total, top5 = map(int, summary.groups())
        assert total == len(demo_questions())
        assert top5 >= total - 1 and top1 >= total // 2, out[-3000:]
        assert "within the top 5 (dense + bm25 fused)" in out and "Retrieval only" not in out
        answers = re.search(
            r"(\d+)/(\d+) generated answers contain the expected answer \((\d+)/\d+ questions were answered",
            out,
        )
        assert answers, out[-3000:]
        right, asked, generated = map(int, answers.groups())
        assert asked == total and generated == total and right >= total - 1, out[-3000:]
        assert out.count("citations: ") == total
        cited = re.search(r"(\d+)/(\d+) right answers cite the passage holding the answer first", out)
        assert cited and int(cited.group(2)) == right and int(cited.group(1)) == right, out[-3000:]
        assert out.count("first citation ") == right
        assert re.search(r"first answer after [\d.]+ s, last after [\d.]+ s", out), out[-3000:]

        with ragfleet.Client(f"127.0.0.1:{grpc_port}", application="pipeline", timeout=60) as client:
            q = demo_questions()[0]
            found = client.search(q["question"], index="demo", top_k=3)
            assert q["doc_id"] in [r.passage.doc_id for r in found.results]
            events = list(client.ask(q["question"], index="demo", top_k=3, params={"max_tokens": 16}))
            kinds = [e.WhichOneof("event") for e in events]
            assert kinds[0] == "retrieved" and kinds[-1] == "answer" and set(kinds[1:-1]) == {"token"}
            answer = events[-1].answer
            assert not answer.retrieval_only and answer.citations
            assert "".join(e.token for e in events[1:-1]) == answer.text
            assert any(m.startswith("retro:") for m in answer.model_ids)
            with pytest.raises(ragfleet.errors.InvalidArgument) as err:
                list(client.ask(q["question"], index="demo", params={"max_tokens": 100_000}))
            assert "params.max_tokens" in err.value.details
            with pytest.raises(ragfleet.errors.NotFound):
                client.search("q", index="missing-index")
            with pytest.raises(ragfleet.errors.InvalidArgument) as err:
                client.search("q", index="demo", top_k=0)
            assert "top_k" in err.value.details
            with pytest.raises(ragfleet.errors.InvalidArgument):
                client.ingest([{"id": "", "text": "x"}], index="demo")
    finally:
        subprocess.run([RAGFLEET, "down"], env=env, capture_output=True, text=True, timeout=300)
