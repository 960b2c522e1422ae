"""Settings of every service: defaults, then a YAML file, then environment variables.

The YAML file is named by RAGFLEET_CONFIG (default: ./ragfleet.yaml when it exists). Environment
variables are RAGFLEET_<FIELD>, nested with a double underscore: RAGFLEET_SERVER__PORT=50051,
RAGFLEET_GATEWAY__RETRIEVERS='{"dense": {"address": "retriever-dense:50061"}}'.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

# Default ports of `ragfleet serve SERVICE` (plain grpc.aio); docker-compose uses the same ones.
DEFAULT_PORTS: dict[str, int] = {
    "pipeline": 50051,
    "retriever-dense": 50061,
    "retriever-bm25": 50062,
    "retriever-colbert": 50063,
    "retriever-mamba": 50064,
    "retriever-seal": 50065,
    "reranker": 50071,
    "generator": 50081,
    "evaluator": 50091,
}


class Endpoint(BaseModel):
    """Where a service answers: a host:port, plus the Ray Serve application when behind Serve's proxy."""

    address: str
    application: str | None = None


class ServerSettings(BaseModel):
    # The interface `ragfleet serve` binds: 127.0.0.1 keeps the service on this machine; any other
    # address (0.0.0.0: every interface) needs auth.tokens, or auth.allow_open, or it refuses to start.
    host: str = "127.0.0.1"
    port: int = 50051
    max_message_bytes: int = 64 * 1024 * 1024
    # Requests handled at once before new ones get RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 256
    metrics_port: int | None = None
    grace_seconds: float = 5.0


class Limits(BaseModel):
    max_query_chars: int = 4096
    max_top_k: int = 1000
    max_batch_queries: int = 4096
    # Results one SearchBatch may ask for: queries x top_k (the reply's size grows with it).
    max_batch_results: int = 100_000
    # Bytes of one Search or SearchBatch reply, counted as a retriever builds it (and again for the
    # Pipeline's fused reply); past it the call fails RESOURCE_EXHAUSTED. Keep it under
    # server.max_message_bytes, which gRPC would otherwise hit only after all the work.
    max_reply_bytes: int = 16 * 1024 * 1024
    # Metadata key=value pairs one search may filter on.
    max_filters: int = 64
    max_document_bytes: int = 2 * 1024 * 1024
    max_id_chars: int = 512
    max_index_name_chars: int = 128
    # UTF-8 bytes of one document's or passage's title.
    max_title_bytes: int = 4096
    # One Retriever Ingest stream: its messages' bytes and its passages, counted as they arrive
    # (past either the stream fails with RESOURCE_EXHAUSTED and nothing is committed).
    max_ingest_bytes: int = 256 * 1024 * 1024
    max_ingest_passages: int = 500_000
    # UTF-8 bytes of one document's or passage's metadata, keys and values together.
    max_metadata_bytes: int = 64 * 1024
    # Ingest chunking: the largest chunk_tokens (and so overlap_tokens) a spec may ask for, the most
    # passages one document may be cut into, and the bytes of those passages together (each passage's
    # text, title and metadata counted).
    max_chunk_tokens: int = 8192
    max_passages_per_document: int = 10_000
    max_chunked_document_bytes: int = 16 * 1024 * 1024


class RetrieverSettings(BaseModel):
    # Backends this Retriever process serves; each has its own indexes under RAGFLEET_HOME.
    backends: list[str] = ["dense", "bm25"]
    # Sentence-transformers model: "all-MiniLM-L6-v2" (offline package), a local path or a hub id.
    model: str = "all-MiniLM-L6-v2"
    vector_store: str = "faiss"
    faiss_index: str = "flat"
    # When set, Chroma indexes live on this server (HttpClient) instead of embedded on disk.
    chroma_host: str | None = None
    chroma_port: int = 8000
    device: str = "cpu"
    batch_size: int = 64
    bm25_stopwords: str = "en"
    # ColBERT checkpoint of new colbert indexes: "ragfleet-colbert" (the trained default that ships
    # with the project), "all-MiniLM-L6-v2" (MiniLM with an untrained projection, a baseline), or the
    # folder `ragfleet train colbert` writes / any HF ColBERT checkpoint.
    colbert_model: str = "ragfleet-colbert"
    # Bits per residual dimension (1, 2 or 4) and document length in tokens of new colbert indexes.
    colbert_nbits: int = 2
    colbert_doc_maxlen: int = 220
    # Mamba checkpoint of new mamba indexes: a folder in the Hugging Face MambaModel layout with its
    # tokenizer; None means <home>/models/mamba, what `ragfleet train mamba` writes.
    mamba_model: str | None = None
    # Tokens (the appended EOS not counted) of the longest passage or query a mamba index encodes;
    # longer inputs are INVALID_ARGUMENT, never truncated.
    mamba_max_tokens: int = 8192
    # SEAL language model of new seal indexes: a Hugging Face causal or seq2seq LM folder with its
    # tokenizer; None means <home>/models/seal, what `ragfleet train seal` writes.
    seal_model: str | None = None
    # Largest beam and longest n-gram (tokens) a seal search may ask for in its SearchOptions.
    seal_max_beam: int = 64
    seal_max_ngram: int = 32
    # Tokens a seal index may hold (its FM-index); an ingest past it is RESOURCE_EXHAUSTED.
    seal_token_budget: int = 100_000_000


class GatewaySettings(BaseModel):
    retrievers: dict[str, Endpoint] = Field(
        default_factory=lambda: {
            "dense": Endpoint(address=f"127.0.0.1:{DEFAULT_PORTS['retriever-dense']}"),
            "bm25": Endpoint(address=f"127.0.0.1:{DEFAULT_PORTS['retriever-bm25']}"),
        }
    )
    # Retrievers an ingest goes to when its spec names none; None means every configured retriever.
    default_retrievers: list[str] | None = None
    reranker: Endpoint | None = None
    generator: Endpoint | None = None
    chunk_tokens: int = 200
    overlap_tokens: int = 40
    sentence_aware: bool = False
    rrf_k: int = 60
    # Seconds a call to another service may take when the caller sent no deadline.
    default_timeout: float = 60.0
    # Most passages, and bytes, of one Ingest message sent on to each retriever (a passage larger than
    # ingest_batch_bytes goes alone); keep the bytes well under the retrievers' server.max_message_bytes.
    ingest_batch: int = 256
    ingest_batch_bytes: int = 4 * 1024 * 1024


class GeneratorSettings(BaseModel):
    # Retro checkpoint folder; None means <home>/models/retro (what `ragfleet train retro` writes).
    model: str | None = None
    # Tokenizer the checkpoint was trained with: "all-MiniLM-L6-v2", a local path or a hub id.
    tokenizer: str = "all-MiniLM-L6-v2"
    # The Retriever that fresh neighbours come from as each generated chunk completes.
    retriever: Endpoint = Endpoint(address=f"127.0.0.1:{DEFAULT_PORTS['retriever-dense']}")
    # Named in the call metadata when that Retriever process serves several backends.
    retriever_backend: str = "dense"
    device: str = "cpu"
    max_tokens_limit: int = 512
    default_max_tokens: int = 64


class RerankerSettings(BaseModel):
    # Backend of a call that names none: "cross_encoder" or "first".
    backend: str = "cross_encoder"
    # Cross-encoder checkpoint (a folder or hub id); None means <home>/models/cross-encoder, what
    # `ragfleet train cross-encoder` writes.
    cross_encoder_model: str | None = None
    # FIRST: a causal LM (a folder or hub id); None means <home>/models/first. Passages per window
    # (each labelled by a letter), the window's step up the list, and the most tokens of a passage.
    first_model: str | None = None
    first_window: int = Field(20, ge=2, le=26)
    first_stride: int = Field(10, ge=1)
    first_passage_tokens: int = Field(300, ge=8)
    device: str = "cpu"
    # (query, passage) pairs per forward pass; 0 sizes it for the device (`pairs_per_batch`).
    batch_size: int = Field(0, ge=0)
    # Most candidates of the concurrent calls one cross-encoder scores together (a larger call goes
    # alone); 0 scores each call alone.
    batch_pairs: int = Field(512, ge=0)
    # Most candidates one call may send.
    max_candidates: int = 1000
    # Checkpoints kept loaded at once (calls may name their own); the least recently used is dropped.
    max_loaded_models: int = 2

    def pairs_per_batch(self) -> int:
        """`batch_size`, or for 0 the device's: 32 pairs on a CPU (the fixed size the service had before)
        and 256 on an accelerator, where larger batches amortise each launch (a MiniLM-sized model at 256
        tokens needs well under 1 GiB of activations for them; not measured here, no GPU)."""
        if self.batch_size:
            return self.batch_size
        return 32 if self.device == "cpu" else 256


class EvaluatorSettings(BaseModel):
    # The Pipeline that experiment sweeps run through.
    pipeline: Endpoint = Endpoint(address=f"127.0.0.1:{DEFAULT_PORTS['pipeline']}")


class AuthSettings(BaseModel):
    # Bearer token -> tenant. Empty: no authentication, every caller is tenant "default". Give every
    # service of a fleet the same tokens: the Pipeline forwards the caller's token and each service
    # maps it to a tenant itself, so a retriever without them serves every caller as "default".
    tokens: dict[str, str] = {}
    # Serve without tokens on an address other machines can reach. Off, such a service refuses to
    # start (see require_auth_when_exposed); on loopback no tokens are needed.
    allow_open: bool = False


class TlsSettings(BaseModel):
    cert_file: Path | None = None
    key_file: Path | None = None
    # With a client CA, clients must present a certificate signed by it (mTLS).
    client_ca_file: Path | None = None


class RaySettings(BaseModel):
    # None: start an embedded Ray on this machine; "ray://head:10001" or "auto" joins a cluster.
    address: str | None = None
    # Where the embedded Ray (GCS, raylet, agents, workers) and Serve's proxies listen. 127.0.0.1 keeps
    # all of them on this machine. Another address exposes the fleet and Ray itself (which has no
    # authentication) to the network: Ray takes it as the node's address (0.0.0.0: Ray picks one) and
    # listens there or on every interface, Serve's gRPC proxy and replicas on every interface, and the
    # services need auth.tokens (or auth.allow_open).
    host: str = "127.0.0.1"
    # The embedded Ray's GCS port (what `ragfleet up` starts and `ragfleet down` stops).
    port: int = 6379
    grpc_port: int = 9000
    http_port: int = 8000
    num_cpus: int | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAGFLEET_", env_nested_delimiter="__", extra="ignore")

    home: Path = Path(".ragfleet")
    log_level: str = "INFO"
    server: ServerSettings = ServerSettings()
    limits: Limits = Limits()
    retriever: RetrieverSettings = RetrieverSettings()
    gateway: GatewaySettings = GatewaySettings()
    generator: GeneratorSettings = GeneratorSettings()
    reranker: RerankerSettings = RerankerSettings()
    evaluator: EvaluatorSettings = EvaluatorSettings()
    auth: AuthSettings = AuthSettings()
    tls: TlsSettings = TlsSettings()
    ray: RaySettings = RaySettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = config_path()
        if config is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config))
        return tuple(sources)


class OpenServiceError(ValueError):
    """A service would answer unauthenticated calls on an address other machines can reach."""


def is_loopback(host: str) -> bool:
    """Whether only this machine reaches `host`: localhost, 127.0.0.0/8 (also IPv4-mapped) or ::1."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def require_auth_when_exposed(
    settings: Settings, host: str, what: str, *, client_certificates: bool = False
) -> None:
    """Refuses (OpenServiceError) to let `what` listen on `host` open to other machines: without
    auth.tokens, client certificates (mTLS) or an explicit auth.allow_open, it must bind loopback."""
    auth = settings.auth
    if is_loopback(host) or auth.tokens or auth.allow_open or client_certificates:
        return
    raise OpenServiceError(
        f"{what} would listen on {host} with no authentication: give every service the same "
        "auth.tokens (RAGFLEET_AUTH__TOKENS, a JSON object of token: tenant), or set auth.allow_open "
        "(RAGFLEET_AUTH__ALLOW_OPEN=true) to serve every caller as tenant 'default', or listen on 127.0.0.1"
    )


def config_path() -> Path | None:
    named = os.environ.get("RAGFLEET_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            raise FileNotFoundError(f"RAGFLEET_CONFIG names {path}, which is not a file")
        return path
    default = Path("ragfleet.yaml")
    return default if default.is_file() else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
