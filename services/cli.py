"""`ragfleet`: run the fleet, feed it, ask it, evaluate it.

    ragfleet up | down                     the fleet on Ray (embedded by default), behind Serve's gRPC proxy
    ragfleet serve SERVICE --port N        one service on plain grpc.aio (what each compose container runs)
    ragfleet ingest PATH --index NAME      a JSONL file or BEIR folder, through the Pipeline
    ragfleet search | ask                  query an index; `ask` streams the answer events
    ragfleet indexes | delete | rebuild    list, delete and rebuild indexes (rebuild: colbert's PLAID)
    ragfleet eval retrieval --beir DIR     nDCG@10 / Recall@100 / MRR@10 through the running services
    ragfleet eval qa | run | report        SQuAD EM/F1, experiment sweeps, reports with plots
    ragfleet demo [--retrain]              up, ingest the sample corpus, ask the shipped Retro, print, down

Commands that talk to the fleet use --address (default RAGFLEET_ADDRESS, else Serve's proxy at
127.0.0.1:9000) and send the Serve application "pipeline", which a plain server ignores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.catalog import SERVICES
from services.runtime.settings import (
    DEFAULT_PORTS,
    OpenServiceError,
    Settings,
    get_settings,
    is_loopback,
    require_auth_when_exposed,
)
from services.ui import print_passages, progress_bar

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
eval_app = typer.Typer(help="Evaluate the running fleet.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
train_app = typer.Typer(help="Train the models that have no pretrained weights here.", no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console()

AddressOpt = Annotated[str | None, typer.Option(help="Pipeline address host:port.")]
TokenOpt = Annotated[str | None, typer.Option(envvar="RAGFLEET_TOKEN", help="Bearer token.")]
IndexOpt = Annotated[str, typer.Option(help="Index name.")]
RerankDepthOpt = Annotated[int, typer.Option(help="Passages reranked (0: top-k).")]
RerankerModelOpt = Annotated[
    str | None, typer.Option(help="Reranker checkpoint path or id (default: the Reranker's).")
]
SearchRetrieversOpt = Annotated[str | None, typer.Option(help="Comma-separated retrievers (default: all).")]
VectorStoreOpt = Annotated[str | None, typer.Option(help="faiss or chroma.")]
ColbertModelOpt = Annotated[
    str | None, typer.Option(help="ColBERT checkpoint path or id (e.g. from `ragfleet train colbert`).")
]
MambaModelOpt = Annotated[
    str | None, typer.Option(help="Mamba checkpoint folder (default: what `ragfleet train mamba` wrote).")
]
SealModelOpt = Annotated[
    str | None, typer.Option(help="SEAL language model folder (default: what `ragfleet train seal` wrote).")
]


def _client(address: str | None, token: str | None, timeout: float = 120.0) -> Any:
    import ragfleet

    settings = get_settings()
    address = address or os.environ.get("RAGFLEET_ADDRESS") or f"127.0.0.1:{settings.ray.grpc_port}"
    return ragfleet.Client(address, token=token, application="pipeline", timeout=timeout)


def _names(csv: str) -> list[str]:
    return [name.strip() for name in csv.split(",") if name.strip()]


def _dataclass_overrides(items: list[str], *kinds: type) -> list[dict[str, Any]]:
    """FIELD=VALUE strings shared out among the dataclasses `kinds` by field name: one dict per kind. A
    value is read as JSON (else kept as text) and must be of its field's type; ValueError names `config`
    or the field."""
    hints = [typing.get_type_hints(kind) for kind in kinds]
    found: list[dict[str, Any]] = [{} for _ in kinds]
    for item in items:
        name, sep, raw = (part.strip() for part in item.partition("="))
        owner = next((i for i, fields in enumerate(hints) if name in fields), None)
        if not sep or owner is None:
            known = " or ".join(kind.__name__ for kind in kinds)
            raise ValueError(f"config: expected FIELD=VALUE with a field of {known}, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        hint = hints[owner][name]
        allowed = typing.get_args(hint) or (hint,)
        if type(value) not in allowed and not (float in allowed and type(value) is int):
            raise ValueError(f"{name}: expected {hint}, got {raw!r}")
        found[owner][name] = value
    return found


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(1)


# --- running the fleet ----------------------------------------------------------------------------


def _ray_bin() -> str:
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


_WILDCARDS = ("0.0.0.0", "::")


def _join_embedded_ray(settings: Settings) -> str:
    """Prepares this process to join the embedded Ray; returns its GCS address. On loopback that is
    Ray's one-machine mode, whose node address is 127.0.0.1 (otherwise Ray swaps a loopback
    --node-ip-address for the machine's other address and binds its GCS, raylet and agents there).
    Ray reads the mode on import: call this before `import ray`; `ray start` inherits it too."""
    host = settings.ray.host
    if is_loopback(host):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return f"{'127.0.0.1' if host in _WILDCARDS else host}:{settings.ray.port}"


@app.command()
def up(
    address: Annotated[
        str | None,
        typer.Option(help="Join this Ray cluster (ray://head:10001 or 'auto') instead of starting one."),
    ] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the embedded Ray instance.")] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the fleet to answer.")] = 300.0,
) -> None:
    """Start the fleet: every service a Ray Serve deployment behind Serve's gRPC proxy. The embedded
    Ray and Serve listen on ray.host (127.0.0.1 unless exposed on purpose)."""
    settings = get_settings()
    address = address or settings.ray.address
    embedded = address is None
    try:
        # On a cluster Serve's proxies listen on every interface of every node.
        require_auth_when_exposed(settings, settings.ray.host if embedded else "[::]", "the fleet")
    except OpenServiceError as err:
        _fail(err)
    if embedded:
        address = _join_embedded_ray(settings)
        cmd = [_ray_bin(), "start", "--head", f"--port={settings.ray.port}"]
        cmd += ["--disable-usage-stats", "--include-dashboard=false"]
        if settings.ray.host not in _WILDCARDS:
            cmd.append(f"--node-ip-address={settings.ray.host}")
        cpus = num_cpus or settings.ray.num_cpus
        if cpus:
            cmd.append(f"--num-cpus={cpus}")
        with console.status("starting Ray"):
            started = subprocess.run(cmd, capture_output=True, text=True)
        if started.returncode != 0 and "already running" not in started.stderr + started.stdout:
            console.print(started.stdout + started.stderr)
            raise typer.Exit(1)
    import ray

    from services.runtime.serve import fleet_runtime_env, run_fleet

    logging.basicConfig(level=logging.WARNING)
    runtime_env = fleet_runtime_env(settings) if embedded else {}
    ray.init(address=address, namespace="ragfleet", log_to_driver=False, runtime_env=runtime_env)
    with console.status("deploying the fleet (loads the models on first start)"):
        run_fleet(settings)
        _wait_ready(f"127.0.0.1:{settings.ray.grpc_port}", wait)
    console.print(
        f"[green]fleet up[/green]: Pipeline at 127.0.0.1:{settings.ray.grpc_port} "
        "(metadata application=pipeline); `ragfleet down` stops it"
    )


def _wait_ready(address: str, seconds: float) -> None:
    import ragfleet

    deadline = time.time() + seconds
    with ragfleet.Client(address, application="pipeline", timeout=10.0) as client:
        while True:
            try:
                described = client.describe()
                if all(s.healthy for s in described.services):
                    return
                problem = "; ".join(f"{s.name}: {s.detail}" for s in described.services if not s.healthy)
            except ragfleet.errors.RagfleetError as err:
                problem = str(err)
            if time.time() > deadline:
                raise RuntimeError(f"the fleet did not become ready in {seconds:.0f} s: {problem}")
            time.sleep(1.0)


@app.command()
def down(
    address: Annotated[str | None, typer.Option(help="The Ray cluster the fleet runs on.")] = None,
) -> None:
    """Stop the fleet (and the embedded Ray instance that `up` started)."""
    settings = get_settings()
    address = address or settings.ray.address
    embedded = address is None
    if embedded:
        address = _join_embedded_ray(settings)
    import ray
    from ray import serve

    try:
        if not ray.is_initialized():
            if embedded:  # ray.init waits minutes on a GCS address where nothing listens
                host, _, port = address.rpartition(":")
                socket.create_connection((host, int(port)), timeout=5).close()
            ray.init(address=address, namespace="ragfleet", log_to_driver=False)
        serve.shutdown()
        ray.shutdown()
    except (ConnectionError, TimeoutError):
        console.print("no running Ray instance found")
    if embedded:
        subprocess.run([_ray_bin(), "stop"], capture_output=True, text=True)
    console.print("fleet down")


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}.")],
    port: Annotated[int | None, typer.Option(help="Port (default: the service's standard port).")] = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Interface to bind (default: settings.server.host, 127.0.0.1); another address "
            "needs auth.tokens or auth.allow_open."
        ),
    ] = None,
) -> None:
    """Run one service on plain grpc.aio, without Ray."""
    from services.runtime.server import serve_forever

    if service not in SERVICES:
        console.print(f"[red]unknown service {service!r}[/red]; choose one of {', '.join(SERVICES)}")
        raise typer.Exit(2)
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if host:
        settings = settings.model_copy(update={"server": settings.server.model_copy(update={"host": host})})
    spec = SERVICES[service]
    port = port if port is not None else DEFAULT_PORTS.get(service, settings.server.port)
    try:
        asyncio.run(serve_forever(spec.proto_service, spec.build(settings), settings, port=port))
    except OpenServiceError as err:
        _fail(err)


# --- using the fleet ------------------------------------------------------------------------------


def _spec(
    vector_store: str | None,
    faiss_index: str | None,
    model: str | None,
    chunk_tokens: int | None,
    overlap_tokens: int | None,
    sentence_aware: bool,
    whole_documents: bool,
    retrievers: str | None,
    colbert_model: str | None = None,
    nbits: int | None = None,
    doc_maxlen: int | None = None,
    mamba_model: str | None = None,
    seal_model: str | None = None,
) -> dict[str, Any]:
    chunking: dict[str, Any] = {"sentence_aware": sentence_aware, "whole_documents": whole_documents}
    if chunk_tokens is not None:
        chunking["chunk_tokens"] = chunk_tokens
    if overlap_tokens is not None:
        chunking["overlap_tokens"] = overlap_tokens
    spec: dict[str, Any] = {"chunking": chunking}
    for key, value in (
        ("vector_store", vector_store),
        ("faiss_index", faiss_index),
        ("model", model),
        ("colbert_model", colbert_model),
        ("nbits", nbits),
        ("doc_maxlen", doc_maxlen),
        ("mamba_model", mamba_model),
        ("seal_model", seal_model),
    ):
        if value:
            spec[key] = value
    if retrievers:
        spec["retrievers"] = _names(retrievers)
    return spec


@app.command()
def ingest(
    path: Annotated[
        Path, typer.Argument(help="A JSONL file ({id,title,text,metadata} per line) or a BEIR folder.")
    ],
    index: IndexOpt,
    address: AddressOpt = None,
    token: TokenOpt = None,
    vector_store: VectorStoreOpt = None,
    faiss_index: Annotated[str | None, typer.Option(help="flat, ivf or hnsw.")] = None,
    model: Annotated[str | None, typer.Option(help="Sentence-transformers model path or id.")] = None,
    chunk_tokens: Annotated[int | None, typer.Option(help="Tokens per passage.")] = None,
    overlap_tokens: Annotated[
        int | None, typer.Option(help="Tokens shared by neighbouring passages.")
    ] = None,
    sentence_aware: Annotated[bool, typer.Option(help="Cut passages at sentence boundaries.")] = False,
    whole_documents: Annotated[bool, typer.Option(help="One passage per document.")] = False,
    retrievers: Annotated[
        str | None, typer.Option(help="Comma-separated retrievers (default: the gateway's defaults).")
    ] = None,
    colbert_model: ColbertModelOpt = None,
    nbits: Annotated[int | None, typer.Option(help="ColBERT residual bits: 1, 2 or 4.")] = None,
    doc_maxlen: Annotated[int | None, typer.Option(help="ColBERT document length in tokens.")] = None,
    mamba_model: MambaModelOpt = None,
    seal_model: SealModelOpt = None,
    upsert: Annotated[bool, typer.Option(help="Replace documents whose ids exist.")] = False,
) -> None:
    """Chunk and index documents through the Pipeline. Documents with neither title nor text are
    skipped (and counted); a title-only one is indexed by its title."""
    import ragfleet
    from ragfleet._common import iter_documents

    spec = _spec(
        vector_store,
        faiss_index,
        model,
        chunk_tokens,
        overlap_tokens,
        sentence_aware,
        whole_documents,
        retrievers,
        colbert_model=colbert_model,
        nbits=nbits,
        doc_maxlen=doc_maxlen,
        mamba_model=mamba_model,
        seal_model=seal_model,
    )
    skipped: list[str] = []
    with _client(address, token, timeout=3600.0) as client, progress_bar(console) as bar:
        task = bar.add_task(f"ingesting into {index}", total=None)
        try:
            report = client.ingest(
                iter_documents(path, skipped=skipped),
                index=index,
                spec=spec,
                upsert=upsert,
                progress=lambda n: bar.update(task, completed=n),
            )
        except ragfleet.errors.RagfleetError as err:
            _fail(err)
    if skipped:
        console.print(f"skipped {len(skipped)} documents with neither title nor text, e.g. {skipped[:5]}")
    for r in report.retrievers:
        console.print(
            f"{r.version.retriever}: +{r.added} passages (replaced {r.replaced}), "
            f"{r.total_passages} in total, version {r.version.version}, model {r.version.model_id or '-'}"
        )
    console.print(f"{report.documents} documents -> {report.passages} passages")


@app.command()
def search(
    query: Annotated[str, typer.Argument()],
    index: IndexOpt,
    top_k: Annotated[int, typer.Option(help="Results to return.")] = 10,
    retrievers: SearchRetrieversOpt = None,
    fusion: Annotated[str, typer.Option(help="rrf or weighted.")] = "rrf",
    exhaustive: Annotated[bool, typer.Option(help="ColBERT: exact MaxSim over every passage.")] = False,
    ncells: Annotated[int, typer.Option(help="ColBERT/PLAID: centroids per query token (0: by k).")] = 0,
    ndocs: Annotated[int, typer.Option(help="ColBERT/PLAID: candidates kept (0: by k).")] = 0,
    threshold: Annotated[
        float, typer.Option(help="ColBERT/PLAID: centroid score threshold (0: by k).")
    ] = 0.0,
    compressed_rerank: Annotated[
        bool, typer.Option(help="ColBERT/PLAID: final scores from decompressed residuals, not fp16 tokens.")
    ] = False,
    beam: Annotated[int, typer.Option(help="SEAL: beams of the constrained decoding (0: 15).")] = 0,
    ngram_length: Annotated[int, typer.Option(help="SEAL: longest n-gram in tokens (0: 10).")] = 0,
    rerank: Annotated[bool, typer.Option(help="Rerank the fused list.")] = False,
    rerank_depth: RerankDepthOpt = 0,
    reranker_model: RerankerModelOpt = None,
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Retrieve and fuse (and rerank), without generation."""
    import ragfleet

    options = {
        "exhaustive": exhaustive,
        "ncells": ncells,
        "ndocs": ndocs,
        "centroid_score_threshold": threshold,
        "compressed_rerank": compressed_rerank,
        "beam": beam,
        "ngram_length": ngram_length,
    }
    with _client(address, token) as client:
        try:
            found = client.search(
                query,
                index=index,
                top_k=top_k,
                fusion=fusion,
                retrievers=_names(retrievers) if retrievers else None,
                options=options,
                rerank=_rerank(rerank, rerank_depth, reranker_model),
            )
        except ragfleet.errors.RagfleetError as err:
            _fail(err)
    print_passages(console, found.results, query)
    if found.HasField("rerank"):
        console.print(_rerank_line(found.rerank))


def _rerank(enabled: bool, depth: int, model: str | None) -> dict[str, Any] | None:
    """The SDK's `rerank` argument from the --rerank, --rerank-depth and --reranker-model flags."""
    return {"depth": depth, "model": model or ""} if enabled else None


def _rerank_line(report: Any) -> str:
    """What a RerankReport says, in one line."""
    if not report.model_id:
        return f"not reranked: {escape(report.note)}"
    return (
        f"reranked by {escape(report.model_id)}: {report.truncated} of {report.candidates} passages "
        f"cut at {report.max_length} tokens"
    )


@app.command()
def ask(
    question: Annotated[str, typer.Argument()],
    index: IndexOpt,
    top_k: Annotated[int, typer.Option(help="Passages to retrieve.")] = 5,
    retrievers: SearchRetrieversOpt = None,
    rerank: Annotated[bool, typer.Option(help="Rerank when a reranker is configured.")] = False,
    rerank_depth: RerankDepthOpt = 0,
    reranker_model: RerankerModelOpt = None,
    generate: Annotated[bool, typer.Option(help="Generate an answer when a generator is configured.")] = True,
    max_tokens: Annotated[int | None, typer.Option(help="Most tokens to generate.")] = None,
    temperature: Annotated[float, typer.Option(help="0 decodes greedily.")] = 0.0,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (0 < p <= 1).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Ask a question; prints the streamed events (passages, answer tokens, answer) as they come."""
    import ragfleet

    params: dict[str, Any] = {"temperature": temperature, "stop": stop or []}
    for key, value in (("max_tokens", max_tokens), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            params[key] = value
    with _client(address, token) as client:
        try:
            for event in client.ask(
                question,
                index=index,
                top_k=top_k,
                rerank=_rerank(rerank, rerank_depth, reranker_model),
                retrievers=_names(retrievers) if retrievers else None,
                generate=generate,
                params=params,
            ):
                _print_event(event)
        except ragfleet.errors.RagfleetError as err:
            _fail(err)


def _print_event(event: Any) -> None:
    kind = event.WhichOneof("event")
    if kind in ("retrieved", "reranked"):
        print_passages(console, getattr(event, kind).passages, kind)
        if kind == "reranked":
            console.print(_rerank_line(event.reranked.rerank))
    elif kind == "token":
        # Raw text as it comes: no markup, highlighting or wrapping; the console flushes every write.
        console.out(event.token, end="", highlight=False)
    elif kind == "answer":
        answer = event.answer
        console.print(f"\n[bold]answer[/bold]: {escape(answer.text)}")
        console.print("citations: " + ", ".join(f"{c.passage_id} ({c.weight:.3f})" for c in answer.citations))
        console.print("timings: " + ", ".join(f"{t.stage} {t.millis:.1f} ms" for t in answer.timings))


@app.command()
def indexes(address: AddressOpt = None, token: TokenOpt = None) -> None:
    """List indexes with their retrievers, versions and sizes."""
    table = Table("index", "retriever", "version", "passages", "documents", "model")
    with _client(address, token) as client:
        for entry in client.list_indexes():
            for d in entry.retrievers:
                table.add_row(
                    entry.index,
                    d.version.retriever,
                    str(d.version.version),
                    str(d.passages),
                    str(d.documents),
                    d.version.model_id,
                )
    console.print(table)


@app.command()
def delete(
    index: IndexOpt,
    ids: Annotated[list[str] | None, typer.Option("--id", help="Passage id (repeatable).")] = None,
    doc_ids: Annotated[list[str] | None, typer.Option("--doc-id", help="Document id (repeatable).")] = None,
    drop: Annotated[bool, typer.Option(help="Delete the whole index.")] = False,
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete passages, documents or a whole index."""
    import ragfleet

    with _client(address, token) as client:
        try:
            done = client.delete(index=index, ids=ids or (), doc_ids=doc_ids or (), drop_index=drop)
        except ragfleet.errors.RagfleetError as err:
            _fail(err)
    for r in done.retrievers:
        console.print(f"{r.version.retriever}: deleted {r.deleted}, now version {r.version.version}")


@app.command()
def rebuild(
    index: IndexOpt,
    retrievers: Annotated[
        str | None, typer.Option(help="Comma-separated retrievers (default: all that hold the index).")
    ] = None,
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Rebuild an index's approximate search structure (colbert: new centroids and codes)."""
    import ragfleet

    with _client(address, token, timeout=3600.0) as client:
        try:
            done = client.rebuild(index, retrievers=_names(retrievers) if retrievers else None)
        except ragfleet.errors.RagfleetError as err:
            _fail(err)
    for r in done.retrievers:
        console.print(f"{r.version.retriever}: version {r.version.version}")


@eval_app.command("retrieval")
def eval_retrieval(
    beir: Annotated[Path, typer.Option(help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.")],
    split: Annotated[str, typer.Option(help="qrels split.")] = "test",
    retrievers: Annotated[
        str,
        typer.Option(
            help="Comma-separated: dense, bm25, colbert, mamba, seal, hybrid (dense + bm25); "
            "a+b fuses a and b (hybrid+seal)."
        ),
    ] = "dense,bm25,hybrid",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the markdown table here.")] = None,
    index: Annotated[
        str | None, typer.Option(help="Search this existing index instead of ingesting the set.")
    ] = None,
    vector_store: VectorStoreOpt = None,
    colbert_model: ColbertModelOpt = None,
    mamba_model: MambaModelOpt = None,
    seal_model: SealModelOpt = None,
    chunk_tokens: Annotated[
        int | None, typer.Option(help="Chunk documents (default: whole documents).")
    ] = None,
    reuse_index: Annotated[
        bool, typer.Option(help="Keep the index for the next run; search the one an earlier run kept.")
    ] = False,
    rerank: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated reranker backends (cross_encoder, first): each retriever's "
            "list is also scored reranked by each, as <retriever>+<backend>."
        ),
    ] = None,
    rerank_depth: Annotated[int, typer.Option(help="Passages reranked per query.")] = 30,
    reranker_model: Annotated[
        list[str] | None,
        typer.Option(help="BACKEND=PATH_OR_ID: a backend's checkpoint (repeatable; default: the Reranker's)"),
    ] = None,
    retrieval_weight: Annotated[
        float | None,
        typer.Option(
            help="Weight (0 to 1) of the retrieval scores in the reranked order (default: each model's own)."
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Queries per SearchBatch call (1: one search a query, each timed).")
    ] = 64,
    unseen_by: Annotated[
        str | None,
        typer.Option(
            help="Also score the queries whose relevant documents are never relevant in this split "
            "(e.g. train: what a model trained on it cannot have memorised)."
        ),
    ] = None,
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Ingest a BEIR set through the services, search every query, score with pytrec_eval (an
    experiment: its runs are recorded under RAGFLEET_HOME/runs). Documents with neither title nor
    text are skipped and counted (judged ones count as misses)."""
    import ragfleet
    from services.evaluator.retrieval import (
        markdown_table,
        reranker_models,
        retrieval_experiment,
        run_retrieval_eval,
    )
    from services.runtime.storage import atomic_write_json

    try:
        experiment = retrieval_experiment(
            beir,
            split=split,
            retrievers=_names(retrievers),
            chunk_tokens=chunk_tokens,
            vector_store=vector_store,
            colbert_model=colbert_model,
            mamba_model=mamba_model,
            seal_model=seal_model,
            index=index,
            keep_index=reuse_index,
            rerank=_names(rerank or ""),
            rerank_depth=rerank_depth,
            reranker_models=reranker_models(reranker_model or []),
            retrieval_weight=retrieval_weight,
            batch_size=batch_size,
        )
        with _client(address, token, timeout=3600.0) as client:
            results = run_retrieval_eval(client, experiment, home=get_settings().home, unseen_by=unseen_by)
    except (ValueError, FileNotFoundError, ragfleet.errors.RagfleetError) as err:
        _fail(err)
    table = markdown_table(results)
    console.print(table)
    if json_out:
        atomic_write_json(json_out, results)
        console.print(f"wrote {json_out}")
    if markdown:
        markdown.write_text(table + "\n")


@eval_app.command("qa")
def eval_qa(
    squad: Annotated[Path, typer.Option(help="SQuAD v1.1 or v2.0 dataset JSON.")],
    predictions: Annotated[Path, typer.Option(help="Predictions JSON: {question id: answer text}.")],
    na_probs: Annotated[Path | None, typer.Option(help="v2.0: {question id: no-answer probability}.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the scores here.")] = None,
) -> None:
    """Score predictions exactly as the official SQuAD v1.1 / v2.0 scripts do."""
    from services.evaluator.metrics.qa import score_squad_files
    from services.runtime.storage import atomic_write_json

    try:
        scores = score_squad_files(squad, predictions, na_probs)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    print(json.dumps(scores))
    if json_out:
        atomic_write_json(json_out, scores)


@eval_app.command("run")
def eval_run(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (see deploy/eval/*.yaml).")],
    report: Annotated[bool, typer.Option(help="Write the report when the sweep ends.")] = True,
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Run a sweep over pipeline settings through the live services; one record per run."""
    import ragfleet
    from services.evaluator import experiments
    from services.evaluator.report import build_report, load_records
    from services.evaluator.service import report_dir

    settings = get_settings()
    try:
        experiment = experiments.ExperimentConfig.from_yaml(config)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    with _client(address, token, timeout=24 * 3600.0) as client, experiments.progress_display() as show:
        try:
            run_ids = experiments.run_experiment(client, experiment, home=settings.home, progress=show)
        except (ValueError, FileNotFoundError, ragfleet.errors.RagfleetError) as err:
            _fail(err)
    console.print("runs: " + " ".join(run_ids))
    if report:
        paths = build_report(
            load_records(run_ids, settings.home / "runs"), report_dir(settings.home, experiment.name)
        )
        console.print(f"report: {paths['markdown']} and {paths['html']}")


@eval_app.command("report")
def eval_report(
    runs: Annotated[list[str], typer.Argument(help="Run ids (under RAGFLEET_HOME/runs) or run JSON files.")],
    out: Annotated[
        Path | None, typer.Option(help="Report folder (default: under RAGFLEET_HOME/runs/reports).")
    ] = None,
    metric: Annotated[str | None, typer.Option(help="Primary metric (default: ndcg@10, else f1).")] = None,
) -> None:
    """Markdown + HTML report with plots and paired significance tests between runs."""
    from services.evaluator.report import build_report, load_records
    from services.evaluator.service import report_dir

    settings = get_settings()
    try:
        records = load_records(runs, settings.home / "runs")
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    paths = build_report(records, out or report_dir(settings.home, records[0]["experiment"]), metric=metric)
    console.print(
        f"report: {paths['markdown']} and {paths['html']}; plots: {', '.join(map(str, paths['plots']))}"
    )


# --- training -------------------------------------------------------------------------------------

# Options the trainers share, with the same help; each command gives its own default.
BeirTrainOpt = Annotated[Path | None, typer.Option(help="BEIR folder: its split's queries and qrels.")]
SplitTrainOpt = Annotated[str, typer.Option(help="qrels split of --beir.")]
PseudoCorpusOpt = Annotated[
    Path | None, typer.Option(help="JSONL file or BEIR folder without queries: trains on pseudo-queries.")
]
MineIndexOpt = Annotated[
    str | None,
    typer.Option(
        help="Index to mine negatives in; ingested if it is new (default: the data's name; with --corpus "
        "NAME-clozeSEED, the documents with their pseudo-queries (titles or sentences) cut out)."
    ),
]
StepsOpt = Annotated[int, typer.Option(help="Optimiser steps in all, a resumed run's included.")]
PeakLrOpt = Annotated[float, typer.Option(help="AdamW peak learning rate.")]
MineDepthOpt = Annotated[int, typer.Option(help="Hits per retriever searched for negatives.")]
ValidationOpt = Annotated[
    float,
    typer.Option(help="Share of the queries held out to tune the weight of the retrieval scores."),
]
MaxQueriesOpt = Annotated[int | None, typer.Option(help="Train on at most this many queries.")]
CheckpointEveryOpt = Annotated[int, typer.Option(help="Steps between checkpoints.")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue from the last one in OUT/checkpoints.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda.")]


def _run_trainer(
    train: Callable[..., dict[str, Any]],
    options: dict[str, Any],
    model: str,
    *,
    fleet: bool = False,
    errors: tuple[type[Exception], ...] = (),
) -> None:
    """Runs a `ragfleet train` command: `train(**options)` with the command's options, which are the
    trainer's keyword arguments (but --address and --token: with `fleet`, the fleet's client they
    reach goes first). A bad input, a missing file or a failed fleet call (or one of `errors`) exits
    with its message; else it prints the metrics as JSON, their warnings, and where `model` was written
    (options' out)."""
    import ragfleet

    options = dict(options)
    address, token = options.pop("address", None), options.pop("token", None)
    with contextlib.ExitStack() as stack:
        try:
            client = [stack.enter_context(_client(address, token, timeout=3600.0))] if fleet else []
            metrics = train(*client, **options)
        except (ValueError, FileNotFoundError, ragfleet.errors.RagfleetError, *errors) as err:
            _fail(err)
    print(json.dumps(metrics))
    for warning in metrics.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    console.print(f"{model} written to {options['out']}")


@train_app.command("colbert")
def train_colbert_command(
    beir: BeirTrainOpt = None,
    split: SplitTrainOpt = "train",
    corpus: Annotated[
        Path | None, typer.Option(help="JSONL corpus without queries: trains on pseudo-queries.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: RAGFLEET_HOME/models/colbert-minilm).")
    ] = None,
    base: Annotated[str, typer.Option(help="Student: MiniLM or a ColBERT checkpoint.")] = "all-MiniLM-L6-v2",
    teacher: Annotated[str, typer.Option(help="'dense' or 'cross-encoder:PATH'.")] = "dense",
    steps: StepsOpt = 300,
    batch_size: Annotated[int, typer.Option(help="Queries per step.")] = 16,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed of the data order (and of pseudo-queries).")] = 0,
    candidates: Annotated[int, typer.Option(help="Candidates per query the teacher scores.")] = 32,
    train_layers: Annotated[
        int, typer.Option(help="Top transformer layers fine-tuned with the projection (0: projection only).")
    ] = 0,
    layer_lr: Annotated[float, typer.Option(help="AdamW learning rate of those layers.")] = 5e-5,
    export: Annotated[
        Path | None,
        typer.Option(help="Also write the trained layers and projection as a delta over MiniLM (a file)."),
    ] = None,
    max_queries: MaxQueriesOpt = None,
    checkpoint_every: CheckpointEveryOpt = 50,
    resume: ResumeOpt = False,
    device: Annotated[str, typer.Option(help="Device of the transformer (cpu, cuda).")] = "cpu",
) -> None:
    """Train a ColBERT encoder on MiniLM by distillation from a teacher: the projection, and the top
    transformer layers with --train-layers."""
    options = dict(locals())  # before any other name is bound
    from services.retriever.colbert.train import train_colbert
    from services.runtime.errors import ServiceError

    out = out or get_settings().home / "models" / "colbert-minilm"
    _run_trainer(train_colbert, {**options, "out": out}, "ColBERT checkpoint", errors=(ServiceError,))


@train_app.command("cross-encoder")
def train_cross_encoder_command(
    beir: BeirTrainOpt = None,
    split: SplitTrainOpt = "train",
    corpus: PseudoCorpusOpt = None,
    index: MineIndexOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: RAGFLEET_HOME/models/cross-encoder).")
    ] = None,
    base: Annotated[str, typer.Option(help="Student transformer: MiniLM or a path.")] = "all-MiniLM-L6-v2",
    teacher: Annotated[str, typer.Option(help="'none', 'dense' or 'cross-encoder:PATH'.")] = "none",
    steps: StepsOpt = 100,
    batch_size: Annotated[int, typer.Option(help="Examples (query + positive + negatives) per step.")] = 8,
    negatives: Annotated[int, typer.Option(help="Hard negatives per example.")] = 3,
    max_length: Annotated[int, typer.Option(help="Tokens of a (query, passage) input.")] = 256,
    lr: PeakLrOpt = 5e-5,
    mine_depth: MineDepthOpt = 30,
    validation: ValidationOpt = 0.1,
    max_queries: MaxQueriesOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the data order, the head and pseudo-queries.")] = 0,
    checkpoint_every: CheckpointEveryOpt = 50,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Train the default reranker: a cross-encoder on MiniLM, with hard negatives from the running fleet."""
    options = dict(locals())  # before any other name is bound
    from services.reranker.train import train_cross_encoder

    out = out or get_settings().home / "models" / "cross-encoder"
    _run_trainer(train_cross_encoder, {**options, "out": out}, "cross-encoder", fleet=True)


@train_app.command("first")
def train_first_command(
    beir: BeirTrainOpt = None,
    split: SplitTrainOpt = "train",
    corpus: PseudoCorpusOpt = None,
    index: MineIndexOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: RAGFLEET_HOME/models/first).")
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="'cross-encoder:PATH' or 'dense' (default: the cross-encoder that `ragfleet train "
            "cross-encoder` wrote to RAGFLEET_HOME/models/cross-encoder)."
        ),
    ] = None,
    base: Annotated[
        str, typer.Option(help="'minilm-decoder' (MiniLM as a causal LM) or any HF causal LM path or id.")
    ] = "minilm-decoder",
    window: Annotated[int, typer.Option(help="Passages per training window.")] = 20,
    orders: Annotated[
        int | None, typer.Option(help="Rotations of an example's window in one step (default: the window).")
    ] = None,
    passage_tokens: Annotated[int, typer.Option(help="Tokens of a passage in a window.")] = 48,
    steps: StepsOpt = 10,
    batch_size: Annotated[int, typer.Option(help="Examples per step, each in --orders windows.")] = 1,
    lr: PeakLrOpt = 5e-5,
    ranking_weight: Annotated[float, typer.Option(help="Weight of the RankNet loss.")] = 10.0,
    mine_depth: MineDepthOpt = 30,
    validation: ValidationOpt = 0.1,
    max_queries: MaxQueriesOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the data and window orders, and pseudo-queries.")] = 0,
    checkpoint_every: CheckpointEveryOpt = 25,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Train the FIRST reranker: a causal LM that ranks a window in its first token, taught by a teacher."""
    options = dict(locals())  # before any other name is bound
    from services.reranker.train_first import train_first

    home = get_settings().home
    out = out or home / "models" / "first"
    teacher = teacher or f"cross-encoder:{home / 'models' / 'cross-encoder'}"
    _run_trainer(train_first, {**options, "out": out, "teacher": teacher}, "FIRST reranker", fleet=True)


@train_app.command("mamba")
def train_mamba_command(
    beir: BeirTrainOpt = None,
    split: SplitTrainOpt = "train",
    corpus: PseudoCorpusOpt = None,
    index: MineIndexOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: RAGFLEET_HOME/models/mamba).")
    ] = None,
    negatives: Annotated[
        str, typer.Option(help="'fleet' (hard negatives mined through the fleet) or 'none' (in-batch only).")
    ] = "fleet",
    hard_negatives: Annotated[int, typer.Option(help="Mined negatives per example.")] = 1,
    teacher: Annotated[str, typer.Option(help="'dense' (MiniLM distillation) or 'none'.")] = "dense",
    layers: Annotated[int, typer.Option(help="Mamba blocks.")] = 2,
    state_size: Annotated[int, typer.Option(help="SSM state size (d_state).")] = 8,
    expand: Annotated[int, typer.Option(help="SSM width as a multiple of d_model (384).")] = 1,
    steps: StepsOpt = 200,
    batch_size: Annotated[int, typer.Option(help="Queries per step.")] = 16,
    max_length: Annotated[
        int, typer.Option(help="Training tokens per text (the retriever never cuts).")
    ] = 128,
    lr: PeakLrOpt = 1e-3,
    distill_weight: Annotated[float, typer.Option(help="Weight of the teacher's KL term.")] = 1.0,
    max_queries: MaxQueriesOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the data order, the weights and pseudo-queries.")] = 0,
    checkpoint_every: CheckpointEveryOpt = 50,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Train the default mamba retriever: a Mamba bi-encoder, InfoNCE with in-batch and mined hard
    negatives plus distillation from MiniLM (--negatives none: no fleet needed)."""
    options = dict(locals())  # before any other name is bound
    from services.datasets.mining import mine_examples, prepare_index
    from services.retriever.mamba.train import train_mamba

    def train(client: Any = None, **kwargs: Any) -> dict[str, Any]:
        def miner(name, documents, queries, count):
            prepare_index(client, name, documents.values())
            return mine_examples(client, name, queries, depth=30, negatives=count, progress=True)

        return train_mamba(miner=miner if client is not None else None, **kwargs)

    out = out or get_settings().home / "models" / "mamba"
    _run_trainer(train, {**options, "out": out}, "mamba retriever", fleet=negatives == "fleet")


@train_app.command("seal")
def train_seal_command(
    beir: BeirTrainOpt = None,
    split: SplitTrainOpt = "train",
    corpus: PseudoCorpusOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: RAGFLEET_HOME/models/seal).")
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="A Hugging Face causal or seq2seq LM folder to fine-tune instead.")
    ] = None,
    pseudo: Annotated[bool, typer.Option(help="With --beir, add pseudo-queries of its corpus.")] = True,
    steps: StepsOpt = 1000,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (after warmup).")] = 1e-3,
    spans: Annotated[int, typer.Option(help="Passage spans (query -> n-gram targets) per pair.")] = 4,
    max_pairs: Annotated[int | None, typer.Option(help="Train on at most this many pairs.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data order, the spans and pseudo-queries.")] = 0,
    checkpoint_every: CheckpointEveryOpt = 200,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Train SEAL's language model: query -> passage n-gram and query -> title (default: a small GPT-2
    over MiniLM's tokenizer and embeddings)."""
    options = dict(locals())  # before any other name is bound
    from services.retriever.seal.train import train_seal

    out = out or get_settings().home / "models" / "seal"
    _run_trainer(train_seal, {**options, "out": out}, "SEAL language model")


@train_app.command("retro")
def train_retro_command(
    index: Annotated[str, typer.Option(help="The Retro database: an index of ~64-token passages.")],
    corpus: Annotated[
        Path, typer.Option(help="Training documents (JSONL or BEIR folder); ingested into --index if new.")
    ],
    qa: Annotated[
        Path | None, typer.Option(help="Question/answer set (QA JSONL or SQuAD) to train answering on.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: HOME/models/retro).")] = None,
    config: Annotated[
        list[str] | None,
        typer.Option(
            "--config",
            help="FIELD=VALUE of the model (RetroConfig) or the run (TrainSettings: steps, batch_size, "
            "seq_len, lr, warmup, seed, ...), repeatable; e.g. d_model=128, steps=500.",
        ),
    ] = None,
    retrievers: Annotated[str, typer.Option(help="Retrievers that find neighbours (a,b).")] = "dense",
    tokenizer: Annotated[str, typer.Option(help="Tokenizer name or path.")] = "all-MiniLM-L6-v2",
    resume: ResumeOpt = False,
    address: AddressOpt = None,
    token: TokenOpt = None,
) -> None:
    """Train Retro with neighbours retrieved through the running fleet; reports held-out perplexity."""
    import ragfleet
    from services.generator.retro.model import RetroConfig
    from services.generator.retro.train import TrainProgress, TrainSettings, train_from_fleet

    out = out or get_settings().home / "models" / "retro"
    with _client(address, token, timeout=3600.0) as client, progress_bar(console) as bar:
        task = bar.add_task("starting", total=None)

        def show(p: TrainProgress) -> None:
            loss = f" (loss {p.loss:.3f})" if p.loss is not None else ""
            bar.update(task, completed=p.done, total=p.total, description=f"{p.stage}{loss}")

        try:
            model, run = _dataclass_overrides(config or [], RetroConfig, TrainSettings)
            record = train_from_fleet(
                client,
                index=index,
                corpus=corpus,
                out=out,
                qa=qa,
                retrievers=_names(retrievers),
                config_overrides=model,
                settings=TrainSettings(**run),
                tokenizer=tokenizer,
                resume=resume,
                progress=show,
            )
        except (ValueError, FileNotFoundError, ragfleet.errors.RagfleetError) as err:
            _fail(err)
    print(json.dumps({"out": str(out), "eval": record["eval"], "data": record["data"]}))
    console.print(f"Retro model written to {out}")


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Leave the fleet running afterwards.")] = False,
    retrain: Annotated[
        bool,
        typer.Option(help="Train the demo's Retro model afresh (~18 min on two cores), not the shipped one."),
    ] = False,
    export: Annotated[
        Path | None,
        typer.Option(help="Also write the demo's model as it ships (fp16) here: services/demo/model."),
    ] = None,
    address: AddressOpt = None,
) -> None:
    """Start the fleet, ingest the sample corpus, install the demo's shipped Retro model into RAGFLEET_HOME
    (or train one: --retrain, or when the shipped one was made by another recipe), ask the demo questions,
    print the streamed answers, how many are right and cite the right passage first, and the time to the
    first answer; stop."""
    from services.demo.retro import export_demo_model, model_dir
    from services.demo.run import run_demo

    begun = time.perf_counter()
    started = address is None
    if started:
        up(address=None, num_cpus=None, wait=300.0)
        console.print(f"fleet up after {time.perf_counter() - begun:.1f} s")
    try:
        with _client(address, None, timeout=600.0) as client:
            run_demo(client, console, home=get_settings().home, retrain=retrain, started=begun)
        if export is not None:
            export_demo_model(model_dir(get_settings().home), export)
            console.print(f"the demo's model, as it ships, written to {export}")
    finally:
        if started and not keep:
            down(address=None)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
