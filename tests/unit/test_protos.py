"""The committed stubs in clients/python/ragfleet/v1 are exactly what `make protos` generates."""

from pathlib import Path

from tools.protogen import CLIENT_ROOT, generate


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    generated = {p.name: p.read_bytes() for p in generate(tmp_path)}
    committed_dir = CLIENT_ROOT / "ragfleet" / "v1"
    committed = {p.name: p.read_bytes() for p in committed_dir.glob("*_pb2*.py*")}
    assert sorted(generated) == sorted(committed), "stub files differ: run `make protos`"
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"stubs out of date with protos/: {stale}; run `make protos`"


def test_every_service_is_defined() -> None:
    from google.protobuf import descriptor_pool

    from ragfleet.v1 import evaluator_pb2, generator_pb2, pipeline_pb2, reranker_pb2, retriever_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    for name in ("Retriever", "Reranker", "Generator", "Evaluator", "Pipeline"):
        assert pool.FindServiceByName(f"ragfleet.v1.{name}").methods
