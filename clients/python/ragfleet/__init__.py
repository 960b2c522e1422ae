"""ragfleet: Python SDK for the ragfleet RAG services (gRPC; needs only grpcio and protobuf).

    import ragfleet
    client = ragfleet.Client("127.0.0.1:50051")
    client.ingest("corpus.jsonl", index="docs")
    print(client.search("a question", index="docs", top_k=5))

`Client` blocks, `AsyncClient` is the asyncio twin; `EvaluatorClient` talks to the Evaluator
service. Failures raise `ragfleet.errors.*`.
`make_channel` and `call_metadata` are what services use to call each other with the same
channel defaults and metadata. Generated messages and stubs live in `ragfleet.v1`.
"""

from ragfleet import errors
from ragfleet._common import call_metadata, make_channel
from ragfleet.aio import AsyncClient
from ragfleet.client import Client
from ragfleet.errors import RagfleetError
from ragfleet.evaluator import EvaluatorClient
from ragfleet.v1.common_pb2 import (
    ChunkingSpec,
    Document,
    Fusion,
    GenerationParams,
    IndexSpec,
    RetrievalSpec,
    SearchOptions,
)
from ragfleet.v1.pipeline_pb2 import RerankSpec

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "ChunkingSpec",
    "Client",
    "Document",
    "EvaluatorClient",
    "Fusion",
    "GenerationParams",
    "IndexSpec",
    "RagfleetError",
    "RerankSpec",
    "RetrievalSpec",
    "SearchOptions",
    "call_metadata",
    "errors",
    "make_channel",
]
