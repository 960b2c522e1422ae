"""The services ragfleet can run, by the name used on the command line, in compose and in Ray Serve.

A name maps to its proto service and a factory for the object that implements it. Retriever services
are one per backend (`retriever-dense`, `retriever-bm25`, `retriever-colbert`,
`retriever-mamba`, `retriever-seal`) so each scales and fails
on its own; plain `retriever` serves every backend in settings from one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.runtime.settings import Settings


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    proto_service: str
    build: Callable[[Settings], Any]
    # The grpc_servicer_functions entry Ray Serve's proxy needs for this service.
    servicer_function: str


def _pipeline(settings: Settings) -> Any:
    from services.gateway.service import PipelineService

    return PipelineService(settings)


def _generator(settings: Settings) -> Any:
    from services.generator.service import GeneratorService

    return GeneratorService(settings)


def _reranker(settings: Settings) -> Any:
    from services.reranker.service import RerankerService

    return RerankerService(settings)


def _evaluator(settings: Settings) -> Any:
    from services.evaluator.service import EvaluatorService

    return EvaluatorService(settings)


def _retriever(backends: list[str] | None) -> Callable[[Settings], Any]:
    def build(settings: Settings) -> Any:
        from services.retriever.service import RetrieverService

        return RetrieverService(settings, backends=backends)

    return build


_RETRIEVER_FN = "ragfleet.v1.retriever_pb2_grpc.add_RetrieverServicer_to_server"
SERVICES: dict[str, ServiceSpec] = {
    "pipeline": ServiceSpec(
        "pipeline",
        "ragfleet.v1.Pipeline",
        _pipeline,
        "ragfleet.v1.pipeline_pb2_grpc.add_PipelineServicer_to_server",
    ),
    "retriever-dense": ServiceSpec(
        "retriever-dense", "ragfleet.v1.Retriever", _retriever(["dense"]), _RETRIEVER_FN
    ),
    "retriever-bm25": ServiceSpec(
        "retriever-bm25", "ragfleet.v1.Retriever", _retriever(["bm25"]), _RETRIEVER_FN
    ),
    "retriever-colbert": ServiceSpec(
        "retriever-colbert", "ragfleet.v1.Retriever", _retriever(["colbert"]), _RETRIEVER_FN
    ),
    "retriever-mamba": ServiceSpec(
        "retriever-mamba", "ragfleet.v1.Retriever", _retriever(["mamba"]), _RETRIEVER_FN
    ),
    "retriever-seal": ServiceSpec(
        "retriever-seal", "ragfleet.v1.Retriever", _retriever(["seal"]), _RETRIEVER_FN
    ),
    "reranker": ServiceSpec(
        "reranker",
        "ragfleet.v1.Reranker",
        _reranker,
        "ragfleet.v1.reranker_pb2_grpc.add_RerankerServicer_to_server",
    ),
    "generator": ServiceSpec(
        "generator",
        "ragfleet.v1.Generator",
        _generator,
        "ragfleet.v1.generator_pb2_grpc.add_GeneratorServicer_to_server",
    ),
    "evaluator": ServiceSpec(
        "evaluator",
        "ragfleet.v1.Evaluator",
        _evaluator,
        "ragfleet.v1.evaluator_pb2_grpc.add_EvaluatorServicer_to_server",
    ),
    "retriever": ServiceSpec("retriever", "ragfleet.v1.Retriever", _retriever(None), _RETRIEVER_FN),
}
