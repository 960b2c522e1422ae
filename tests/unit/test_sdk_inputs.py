"""SDK input handling without a server: reading documents, building requests, batching ingest."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

import ragfleet
from ragfleet import _common
from ragfleet.errors import InvalidArgument
from ragfleet.v1 import common_pb2


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- documents ---------------------------------------------------------------------------------


def test_documents_from_dicts_and_messages() -> None:
    docs = list(
        _common.iter_documents(
            [
                {"id": "a", "title": "T", "text": "alpha", "metadata": {"year": 2020, "tag": "x"}},
                {"_id": "b", "text": ""},
                {"id": 7, "text": "seven", "title": None, "metadata": {"ok": True, "l": [1]}},
                ragfleet.Document(id="c", text="gamma"),
            ]
        )
    )
    assert [d.id for d in docs] == ["a", "b", "7", "c"]
    assert docs[0].title == "T" and dict(docs[0].metadata) == {"year": "2020", "tag": "x"}
    assert dict(docs[2].metadata) == {"ok": "true", "l": "[1]"}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": "no id"}, "documents[1]: field 'id' (or '_id') is missing"),
        ({"id": "", "text": "x"}, "documents[1]: field 'id' must be a non-empty string"),
        ({"id": "x"}, "documents[1]: field 'text' is missing"),
        ({"id": "x", "text": 3}, "documents[1]: field 'text' must be a string"),
        ({"id": "x", "text": "t", "metadata": [1]}, "documents[1]: field 'metadata' must be an object"),
    ],
)
def test_invalid_dicts_name_item_and_field(record: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        list(_common.iter_documents([{"id": "ok", "text": "fine"}, record]))


def test_wrong_source_types() -> None:
    with pytest.raises(TypeError, match="source"):
        _common.iter_documents({"id": "a", "text": "a dict is not a corpus"})
    with pytest.raises(TypeError, match=r"documents\[0\]"):
        list(_common.iter_documents(["just a string"]))


def test_jsonl_file_beir_folder_and_gzip(tmp_path: Path) -> None:
    records = [{"_id": "d1", "title": "One", "text": "first"}, {"_id": "d2", "text": "second"}]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\ufeff" + json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n", "utf-8")
    assert [d.id for d in _common.iter_documents(str(path))] == ["d1", "d2"]
    assert [d.id for d in _common.iter_documents(tmp_path)] == ["d1", "d2"]  # BEIR folder

    gz = tmp_path / "gz" / "corpus.jsonl.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [d.text for d in _common.iter_documents(gz.parent)] == ["first", "second"]


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _common.iter_documents(tmp_path / "nope.jsonl")
    with pytest.raises(InvalidArgument, match="without corpus.jsonl"):
        _common.iter_documents(tmp_path)


def test_jsonl_errors_name_file_line_and_field(tmp_path: Path) -> None:
    good = json.dumps({"id": "a", "text": "x"})
    cases = {
        "bad_json.jsonl": (f"{good}\n{good}\n{{not json\n".encode(), r"bad_json.jsonl:3: invalid JSON"),
        "bad_utf8.jsonl": (
            f"{good}\n".encode() + b'{"id": "b", "text": "caf\xe9"}\n',
            r"bad_utf8.jsonl:2: not valid UTF-8 \(byte 25 of the line\)",
        ),
        "bad_text.jsonl": (f'{good}\n\n{{"id": "b", "text": 3}}\n'.encode(), r"bad_text.jsonl:3: field"),
        "array.jsonl": (b"[1, 2]\n", r"array.jsonl:1: expected an object, got list"),
    }
    for name, (content, pattern) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InvalidArgument, match=pattern):
            list(_common.iter_documents(tmp_path / name))


# --- requests ----------------------------------------------------------------------------------


def test_search_request_fields() -> None:
    fields = _common.RetrievalArgs(
        index="idx",
        top_k=3,
        retrievers="dense",
        fusion={"method": "weighted", "weights": {"dense": 2.0}},
        filters={"year": 2020, "lang": "en"},
        with_continuation=True,
        candidates=50,
    )
    request = _common.search_request("q", fields)
    spec = request.retrieval
    assert (request.query, spec.index, spec.top_k, spec.candidates) == ("q", "idx", 3, 50)
    assert list(spec.retrievers) == ["dense"] and spec.with_continuation
    assert spec.fusion.method == "weighted" and dict(spec.fusion.weights) == {"dense": 2.0}
    assert dict(spec.filters) == {"year": "2020", "lang": "en"}


def test_retrieval_spec_keyword_arguments_override_a_given_spec() -> None:
    base = {"index": "base", "top_k": 7, "filters": {"lang": "en"}, "retrievers": ["bm25"]}
    fields = {"retrieval": base, "retrievers": "dense", "options": {"exhaustive": True}}
    spec = _common.retrieval_spec(fields, top_k=10)
    assert (spec.index, spec.top_k, dict(spec.filters)) == ("base", 7, {"lang": "en"})
    assert list(spec.retrievers) == ["bm25", "dense"] and spec.options.exhaustive
    message = ragfleet.RetrievalSpec(index="m", candidates=3)
    spec = _common.retrieval_spec({"index": "other", "retrieval": message}, top_k=5)
    assert (spec.index, spec.top_k, spec.candidates) == ("other", 5, 3) and message.index == "m"
    with pytest.raises(TypeError, match="'topk'"):
        _common.retrieval_spec({"index": "i", "topk": 3}, top_k=5)
    with pytest.raises(InvalidArgument, match="retrieval.top_k"):
        _common.retrieval_spec({"index": "i", "top_k": "many"}, top_k=5)
    with pytest.raises(InvalidArgument, match="retrieval.bogus"):
        _common.retrieval_spec({"index": "i", "retrieval": {"bogus": 1}}, top_k=5)


def test_retry_policy_names_only_the_idempotent_methods() -> None:
    config = json.loads(_common.retry_service_config("ragfleet.v1.Pipeline", ("Search", "Describe"), 9))
    (method,) = config["methodConfig"]
    assert [n["method"] for n in method["name"]] == ["Search", "Describe"]
    assert method["retryPolicy"]["maxAttempts"] == _common.MAX_ATTEMPTS
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert json.loads(_common.retry_service_config("ragfleet.v1.Pipeline", ("Search",), 0)) == {
        "methodConfig": []
    }


def test_fusion_forms() -> None:
    assert _common.to_fusion(None) is None
    assert _common.to_fusion("rrf") == common_pb2.Fusion(method="rrf")
    fusion = ragfleet.Fusion(method="rrf", rrf_k=10)
    assert _common.to_fusion(fusion) is fusion
    with pytest.raises(InvalidArgument, match="fusion: .*bogus"):
        _common.to_fusion({"bogus": 1})
    with pytest.raises(TypeError, match="fusion"):
        _common.to_fusion(3)  # type: ignore[arg-type]


def test_ask_and_delete_requests() -> None:
    request = _common.ask_request(
        "why?",
        {
            "index": "idx",
            "top_k": 4,
            "retrievers": ["dense", "bm25"],
            "fusion": None,
            "rerank": True,
            "generate": False,
            "params": {"temperature": 0.5, "max_tokens": 16, "seed": 3},
        },
    )
    assert request.question == "why?" and list(request.retrieval.retrievers) == ["dense", "bm25"]
    assert request.rerank and not request.generate and not request.retrieval.HasField("fusion")
    assert request.params.max_tokens == 16 and request.params.HasField("seed")
    delete = _common.delete_request({"index": "idx", "ids": ("a#0",), "doc_ids": "b"})
    assert list(delete.ids) == ["a#0"] and list(delete.doc_ids) == ["b"]


def test_index_spec_nested_dict_and_bad_field() -> None:
    spec = _common.to_index_spec(
        {"model": "m", "chunking": {"chunk_tokens": 64, "sentence_aware": True}, "retrievers": ["bm25"]}
    )
    assert spec is not None and spec.chunking.chunk_tokens == 64 and list(spec.retrievers) == ["bm25"]
    with pytest.raises(InvalidArgument, match="spec: .*chunk_token"):
        _common.to_index_spec({"chunking": {"chunk_token": 64}})


def test_index_spec_colbert_fields_and_search_options() -> None:
    spec = _common.to_index_spec({"colbert_model": "/models/colbert", "nbits": 4, "doc_maxlen": 180})
    assert spec is not None and (spec.colbert_model, spec.nbits, spec.doc_maxlen) == (
        "/models/colbert",
        4,
        180,
    )
    options = {"ncells": 2, "centroid_score_threshold": 0.4, "ndocs": 64}
    request = _common.search_batch_request(["q"], {"index": "idx", "top_k": 5, "options": options})
    assert (request.retrieval.options.ncells, request.retrieval.options.ndocs) == (2, 64)
    with pytest.raises(InvalidArgument, match="options: .*exhaustiv"):
        _common.search_batch_request(["q"], {"index": "i", "options": {"exhaustiv": True}})
    rebuild = _common.rebuild_request(index="idx", retrievers="colbert")
    assert (rebuild.index, list(rebuild.retrievers)) == ("idx", ["colbert"])


def test_ingest_stream_batches_and_header() -> None:
    sent: list[int] = []
    stream = _common.IngestStream(
        {
            "index": "idx",
            "spec": {"vector_store": "faiss"},
            "upsert": True,
            "batch_size": 2,
            "progress": sent.append,
        }
    )
    docs = [ragfleet.Document(id=str(i), text="t") for i in range(5)]
    messages = list(stream.requests(docs))
    assert [len(m.documents) for m in messages] == [2, 2, 1]
    assert (messages[0].index, messages[0].spec.vector_store, messages[0].upsert) == ("idx", "faiss", True)
    assert all(not m.index and not m.HasField("spec") and not m.upsert for m in messages[1:])
    assert sent == [2, 4, 5]


def test_ingest_stream_without_documents_sends_header() -> None:
    stream = _common.IngestStream({"index": "idx", "batch_size": 8})
    messages = list(stream.requests([]))
    assert len(messages) == 1 and messages[0].index == "idx" and not messages[0].documents


def test_ingest_stream_rejects_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        _common.IngestStream({"index": "i", "batch_size": 0})
    with pytest.raises(TypeError, match="'batch'"):
        _common.IngestStream({"index": "i", "batch": 8})  # type: ignore[typeddict-unknown-key]


def test_call_metadata_and_channels() -> None:
    metadata = dict(ragfleet.call_metadata(token="t", application="pipeline", request_id="r1", deadline=12.5))
    assert metadata == {
        "x-request-id": "r1",
        "x-ragfleet-deadline": "12.500000",
        "authorization": "Bearer t",
        "application": "pipeline",
    }
    ((key, value),) = ragfleet.call_metadata()
    assert key == "x-request-id" and len(value) == 32
    for tls in (False, True):
        channel = ragfleet.make_channel("127.0.0.1:1", tls=tls, options=[("grpc.keepalive_time_ms", 1000)])
        channel.close()
