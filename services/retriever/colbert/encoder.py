"""The ColBERT encoder: a BERT-family transformer, a linear projection, one unit vector per token.

ColBERTv2 (see REFERENCES.md) turns a text into a bag of token vectors:

    [CLS] marker tokens... [SEP]  ->  BERT  ->  Linear(hidden, dim, bias=False)  ->  L2 normalise per token

with the marker [Q] = `[unused0]` for queries and [D] = `[unused1]` for documents, right after [CLS].

- Queries are cut to `query_maxlen` (32) tokens and padded up to it with [MASK] ("query augmentation");
  every one of the `query_maxlen` outputs is a query vector, the [MASK] ones included. Whether the other
  tokens attend to the [MASK] tokens is the checkpoint's `attend_to_mask_tokens` (ColBERT's default and
  colbertv2.0's setting: no; their own outputs exist either way, as each [MASK] position attends to the
  real tokens).
- Documents are cut to `doc_maxlen` (220) tokens. The outputs of padding and, with `mask_punctuation`,
  of tokens that are a single `string.punctuation` character are dropped. [CLS], [D] and [SEP] are kept,
  as in ColBERT, so an empty text still gives 3 vectors and every document can be matched.

Checkpoints use the Hugging Face layout that colbert-ir/colbertv2.0 is published in: `config.json`
(a BertConfig, architectures "HF_ColBERT"), `model.safetensors` (or `pytorch_model.bin`, read with
`weights_only=True`) holding `bert.<BertModel key>` tensors and `linear.weight` (dim x hidden), the
tokenizer files and `artifact.metadata` (ColBERT's config as JSON; the fields of `ColbertSettings` are
honoured, the others are kept and written back by `save`). "all-MiniLM-L6-v2" loads MiniLM's transformer
from the offline package with an untrained projection (a fixed random orthonormal map, which keeps dot
products roughly intact up to scale, a baseline); `ragfleet train colbert` trains that projection and,
with --train-layers, MiniLM's top layers.

"ragfleet-colbert" (SHIPPED_NAME) is the trained default that ships with the project: a delta over the
pip-installed MiniLM (`save_delta`: the fine-tuned top layers and the projection in float16, a few MB,
with the settings and the training record in the safetensors metadata) at SHIPPED_FILE.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from services.runtime.artifacts import CHECKPOINTS_DIR, publish_dir, publish_file
from services.runtime.model_errors import ArtifactError, ParamError
from services.runtime.models import MINILM_ID, MINILM_NAMES, resolve_model

# The trained default that ships with the project: MiniLM's top layer(s) fine-tuned with a projection,
# stored as a delta over the pip-installed MiniLM (`save_delta`; `make colbert-model` makes it).
SHIPPED_NAME = "ragfleet-colbert"
SHIPPED_FILE = Path(__file__).with_name("shipped") / f"{SHIPPED_NAME}.safetensors"
SAFETENSORS_FILE = "model.safetensors"
PYTORCH_FILE = "pytorch_model.bin"
METADATA_FILE = "artifact.metadata"
LINEAR_KEY = "linear.weight"
BERT_PREFIX = "bert."
UNTRAINED_PROJECTION_SEED = 0
QUERY_BATCH_SIZE = 64


class ColbertSettings(BaseModel):
    """The fields of ColBERT's `artifact.metadata` that decide how texts are encoded."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    query_maxlen: int = Field(32, ge=4)
    doc_maxlen: int = Field(220, ge=3)
    dim: int = Field(128, ge=1)
    mask_punctuation: bool = True
    attend_to_mask_tokens: bool = False
    query_token_id: str = "[unused0]"
    doc_token_id: str = "[unused1]"
    # With unit vectors, "l2" (minus the squared distance) ranks exactly as "cosine" does.
    similarity: Literal["cosine", "l2"] = "cosine"
    interaction: Literal["colbert"] = "colbert"


def project_tokens(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Token vectors from transformer outputs: `hidden (..., hidden) @ weight.T`, L2-normalised."""
    return torch.nn.functional.normalize(hidden.to(weight.dtype) @ weight.T, dim=-1)


def untrained_projection(hidden: int, dim: int, seed: int = UNTRAINED_PROJECTION_SEED) -> torch.Tensor:
    """A fixed (dim, hidden) map with orthonormal rows: a random subspace, same for every run."""
    gaussian = torch.randn(hidden, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    basis, _ = torch.linalg.qr(gaussian)  # (hidden, dim), orthonormal columns
    return basis.T.contiguous().float()


class ColbertEncoder:
    """Encodes queries and documents into ColBERT token vectors; see the module docstring."""

    def __init__(
        self,
        bert: torch.nn.Module,
        tokenizer: Any,
        projection: torch.Tensor,
        settings: ColbertSettings,
        *,
        model_id: str,
        device: str = "cpu",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.bert = bert.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.model_id = model_id
        # Everything artifact.metadata said; `save` writes it back with the settings in force.
        self.metadata = dict(metadata or {})
        hidden = bert.config.hidden_size
        if projection.shape != (settings.dim, hidden):
            raise ArtifactError(
                f"colbert model {model_id!r}: {LINEAR_KEY} has shape {tuple(projection.shape)}, "
                f"expected (dim {settings.dim}, hidden {hidden})"
            )
        self.projection = projection.float().to(device)
        self.settings = settings
        vocab = tokenizer.get_vocab()
        for token in ("cls_token", "sep_token", "pad_token", "mask_token"):
            if getattr(tokenizer, token, None) not in vocab:
                raise ArtifactError(f"colbert model {model_id!r}: the tokenizer has no {token}")
        for token in (settings.query_token_id, settings.doc_token_id):
            if token not in vocab:
                raise ArtifactError(f"colbert model {model_id!r}: marker {token!r} is not in the vocab")
        self._query_marker = vocab[settings.query_token_id]
        self._doc_marker = vocab[settings.doc_token_id]
        punctuation = tokenizer(list(string.punctuation), add_special_tokens=False)["input_ids"]
        skip = sorted({ids[0] for ids in punctuation if len(ids) == 1}) if settings.mask_punctuation else []
        self._skip_ids = torch.tensor(skip, dtype=torch.long)

    @property
    def dim(self) -> int:
        return self.settings.dim

    @property
    def query_maxlen(self) -> int:
        return self.settings.query_maxlen

    @property
    def doc_maxlen(self) -> int:
        return self.settings.doc_maxlen

    @property
    def hidden_size(self) -> int:
        return int(self.bert.config.hidden_size)

    # --- loading and saving -----------------------------------------------------------------------

    @classmethod
    def load(cls, name_or_path: str, *, device: str = "cpu", doc_maxlen: int | None = None) -> ColbertEncoder:
        """A ColBERT checkpoint (folder or hub id), or "all-MiniLM-L6-v2" with an untrained projection.

        Raises ArtifactError when the checkpoint is missing or broken, ParamError for a `doc_maxlen` the
        model cannot take.
        """
        from transformers import AutoModel, AutoTokenizer

        if name_or_path == SHIPPED_NAME:
            return cls.load_delta(SHIPPED_FILE, device=device, doc_maxlen=doc_maxlen)
        minilm = name_or_path in MINILM_NAMES
        folder = Path(resolve_model(name_or_path)) if minilm else _checkpoint_folder(name_or_path)
        model_id = f"colbert:{MINILM_ID}+untrained-projection" if minilm else name_or_path
        try:
            metadata = _read_metadata(folder)
            settings = ColbertSettings.model_validate(metadata)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            bert, info = AutoModel.from_pretrained(
                folder, local_files_only=True, add_pooling_layer=False, output_loading_info=True
            )
            projection = (
                untrained_projection(bert.config.hidden_size, settings.dim)
                if minilm
                else _read_linear(folder)
            )
        except ArtifactError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, ValidationError) as err:
            raise ArtifactError(f"colbert model {name_or_path!r} does not load: {err}") from err
        broken = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        if broken:
            raise ArtifactError(
                f"colbert model {name_or_path!r}: weights missing or of the wrong shape: {broken[:5]}"
            )
        if projection.shape[0] != settings.dim:
            if "dim" in metadata:
                raise ArtifactError(
                    f"colbert model {name_or_path!r}: {METADATA_FILE} says dim {settings.dim}, "
                    f"{LINEAR_KEY} has {projection.shape[0]} rows"
                )
            settings = settings.model_copy(update={"dim": projection.shape[0]})
        limit = int(bert.config.max_position_embeddings)
        if doc_maxlen is not None:
            if not 3 <= doc_maxlen <= limit:
                raise ParamError("doc_maxlen", f"must be in [3, {limit}] for this model, got {doc_maxlen}")
            settings = settings.model_copy(update={"doc_maxlen": doc_maxlen})
        if max(settings.query_maxlen, settings.doc_maxlen) > limit:
            raise ArtifactError(
                f"colbert model {name_or_path!r}: {METADATA_FILE} asks for more than the model's {limit} "
                "positions (query_maxlen / doc_maxlen)"
            )
        return cls(bert, tokenizer, projection, settings, model_id=model_id, device=device, metadata=metadata)

    @classmethod
    def load_delta(cls, path: Path, *, device: str = "cpu", doc_maxlen: int | None = None) -> ColbertEncoder:
        """MiniLM with the layers and projection of a delta file (`save_delta`) in place of its own."""
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k).float() for k in f.keys()}
            base, settings = meta["base"], json.loads(meta["settings"])
        except (OSError, KeyError, ValueError, SafetensorError) as err:
            raise ArtifactError(f"colbert delta {str(path)!r} does not load: {err}") from err
        if base not in MINILM_NAMES:
            raise ArtifactError(f"colbert delta {str(path)!r}: base {base!r} is not MiniLM")
        encoder = cls.load(base, device=device)
        state = encoder.bert.state_dict()
        layers = {k.removeprefix(BERT_PREFIX): v for k, v in tensors.items() if k != LINEAR_KEY}
        wrong = [k for k, v in layers.items() if k not in state or state[k].shape != v.shape]
        if LINEAR_KEY not in tensors or wrong:
            raise ArtifactError(f"colbert delta {str(path)!r}: {wrong[:5] or [LINEAR_KEY]} do not fit MiniLM")
        encoder.bert.load_state_dict(layers, strict=False)
        settings = ColbertSettings.model_validate(settings)
        if doc_maxlen is not None:
            settings = settings.model_copy(update={"doc_maxlen": doc_maxlen})
        training = json.loads(meta.get("training", "{}"))
        metadata = {**settings.model_dump(), "ragfleet_training": training}
        return cls(
            encoder.bert,
            encoder.tokenizer,
            tensors[LINEAR_KEY],
            settings,
            model_id=f"colbert:{path.stem}@{meta.get('fingerprint', '')[:10]}",
            device=device,
            metadata=metadata,
        )

    def save_delta(self, path: Path | str, layers: int) -> None:
        """Writes the top `layers` transformer layers and the projection as a delta over MiniLM (what
        `load_delta` reads): float16, with the settings, the training record and a fingerprint of the
        tensors in the metadata. Only for an encoder whose base is MiniLM."""
        total = len(self.bert.encoder.layer)
        prefixes = tuple(f"encoder.layer.{i}." for i in range(total - layers, total))
        tensors = {
            BERT_PREFIX + k: v.detach().cpu().to(torch.float16).contiguous()
            for k, v in self.bert.state_dict().items()
            if k.startswith(prefixes)
        }
        tensors[LINEAR_KEY] = self.projection.detach().cpu().to(torch.float16).contiguous()
        digest = hashlib.sha256()
        for key in sorted(tensors):
            digest.update(key.encode() + tensors[key].numpy().tobytes())
        meta = {
            "base": MINILM_ID,
            "settings": json.dumps(self.settings.model_dump(), sort_keys=True),
            "training": json.dumps(self.metadata.get("ragfleet_training", {}), sort_keys=True),
            "fingerprint": digest.hexdigest(),
        }
        publish_file(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))

    def save(self, path: Path | str) -> None:
        """Writes a checkpoint in the layout `load` reads, published whole (`artifacts.publish_dir`): a
        folder already at `path` is replaced, except for its `checkpoints/` (the training state of
        `ragfleet train colbert`), which moves into the new folder."""

        def build(tmp: Path) -> None:
            config = self.bert.config.to_dict()
            config["architectures"] = ["HF_ColBERT"]
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            self.tokenizer.save_pretrained(tmp)
            tensors = {
                BERT_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.bert.state_dict().items()
            }
            tensors[LINEAR_KEY] = self.projection.detach().cpu().contiguous()
            save_file(tensors, tmp / SAFETENSORS_FILE, metadata={"format": "pt"})
            metadata = {**self.metadata, **self.settings.model_dump()}
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))

        publish_dir(path, build, carry=(CHECKPOINTS_DIR,))

    # --- encoding ---------------------------------------------------------------------------------

    def encode_queries(
        self, texts: Sequence[str], batch_size: int = QUERY_BATCH_SIZE
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, query_maxlen, dim) float32 unit vectors on the CPU, and the lengths (n,) int64, which are
        all query_maxlen: the [MASK] padding outputs are query vectors."""
        hidden = self.query_hidden_states(texts, batch_size)
        vectors = project_tokens(hidden.to(self.device), self.projection).cpu()
        return vectors, torch.full((len(texts),), self.query_maxlen, dtype=torch.int64)

    def encode_documents(self, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
        """One (tokens_i, dim) float16 array of unit vectors per text, in input order, without the
        padding and punctuation outputs ([CLS], [D] and [SEP] remain, so tokens_i >= 3)."""
        out: list[np.ndarray] = [np.empty((0, self.dim), np.float16)] * len(texts)
        for positions, hidden, keep, _ in self._document_batches(texts, batch_size):
            vectors = project_tokens(hidden, self.projection).to(torch.float16).cpu()
            keep = keep.cpu()
            for row, i in enumerate(positions):
                out[i] = vectors[row][keep[row]].numpy()
        return out

    def query_hidden_states(
        self, texts: Sequence[str], batch_size: int = QUERY_BATCH_SIZE, layer: int | None = None
    ) -> torch.Tensor:
        """The transformer outputs behind `encode_queries`: (n, query_maxlen, hidden) float32, CPU; with
        `layer`, the hidden states after that many transformer layers instead of after all of them."""
        ids, attention = self.query_inputs(texts)
        batches = [torch.empty((0, self.query_maxlen, self.hidden_size))]
        for start in range(0, len(ids), batch_size):
            end = start + batch_size
            batches.append(self._hidden(ids[start:end], attention[start:end], layer).cpu())
        return torch.cat(batches)

    def query_inputs(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries' token ids (n, query_maxlen), padded with [MASK], and their attention mask."""
        rows = self._with_markers(texts, self._query_marker, self.query_maxlen)
        ids = torch.full((len(rows), self.query_maxlen), self.tokenizer.mask_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            attention[r, : len(row)] = 1
        if self.settings.attend_to_mask_tokens:
            attention[:] = 1
        return ids, attention

    def document_states(
        self, texts: Sequence[str], layer: int, batch_size: int = 32, dtype: torch.dtype = torch.float32
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per text, the hidden states after `layer` transformer layers of all its tokens (tokens_i,
        hidden), CPU, and which of them `encode_documents` keeps (tokens_i,) bool: what the layers above
        need to finish the encoding (`run_layers`)."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = [()] * len(texts)  # type: ignore[list-item]
        for positions, hidden, keep, attention in self._document_batches(texts, batch_size, layer):
            hidden, keep, lengths = hidden.to(dtype).cpu(), keep.cpu(), attention.sum(1).tolist()
            for row, i in enumerate(positions):
                out[i] = (hidden[row, : lengths[row]], keep[row, : lengths[row]])
        return out

    def _with_markers(self, texts: Sequence[str], marker: int, maxlen: int) -> list[list[int]]:
        """[CLS] marker text-tokens [SEP] per text, the text cut so that the whole fits `maxlen`."""
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got one string")
        if not texts:
            return []
        tokens = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=maxlen - 3)
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        return [[cls, marker, *ids, sep] for ids in tokens["input_ids"]]

    def _document_batches(
        self, texts: Sequence[str], batch_size: int, layer: int | None = None
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(input positions, hidden states (b, L, hidden) after `layer` layers (None: all), tokens to
        keep (b, L), attention mask (b, L)) per batch; texts are sorted by length so that a batch holds
        little padding."""
        rows = self._with_markers(texts, self._doc_marker, self.doc_maxlen)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
        for start in range(0, len(order), batch_size):
            positions = order[start : start + batch_size]
            width = len(rows[positions[0]])
            ids = torch.full((len(positions), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for r, i in enumerate(positions):
                ids[r, : len(rows[i])] = torch.tensor(rows[i])
                attention[r, : len(rows[i])] = 1
            keep = attention.bool() & ~torch.isin(ids, self._skip_ids)
            yield positions, self._hidden(ids, attention, layer), keep.to(self.device), attention

    def _hidden(self, ids: torch.Tensor, attention: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        ids, attention = ids.to(self.device), attention.to(self.device)
        with torch.inference_mode():
            if layer is None:
                return self.bert(input_ids=ids, attention_mask=attention).last_hidden_state.float()
            # Only the layers asked for: the ones above are what a trainer runs itself.
            hidden = self.bert.embeddings(input_ids=ids)
            return run_layers(self.bert.encoder.layer[:layer], hidden, attention).float()


def run_layers(
    layers: Sequence[torch.nn.Module], hidden: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    """`layers` (BERT layers, in order) applied to hidden states (b, L, hidden) under an attention mask
    (b, L) of 1 for real tokens: what the transformer does above a layer whose outputs were kept."""
    blocked = (1.0 - attention[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in layers:
        hidden = layer(hidden, attention_mask=blocked)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def _checkpoint_folder(name_or_path: str) -> Path:
    """The local folder of a checkpoint: the path itself, or the hub snapshot of a hub id (from the local
    cache only when HF_HUB_OFFLINE=1)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise ArtifactError(f"colbert model {name_or_path!r}: no such checkpoint folder")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(name_or_path, local_files_only=offline))
    except Exception as err:  # huggingface_hub raises many kinds: not cached, offline, bad repo id
        raise ArtifactError(
            f"colbert model {name_or_path!r}: not a local folder and not available from the hub "
            f"({type(err).__name__}: {err})"
        ) from err


def _read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    metadata = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return metadata


def _read_linear(folder: Path) -> torch.Tensor:
    """`linear.weight` from model.safetensors, else from pytorch_model.bin (never unpickled)."""
    if (folder / SAFETENSORS_FILE).is_file():
        with safe_open(folder / SAFETENSORS_FILE, framework="pt") as weights:
            if LINEAR_KEY in weights.keys():
                return weights.get_tensor(LINEAR_KEY).float()
    elif (folder / PYTORCH_FILE).is_file():
        state = torch.load(folder / PYTORCH_FILE, map_location="cpu", weights_only=True)
        if LINEAR_KEY in state:
            return state[LINEAR_KEY].float()
    else:
        raise ArtifactError(f"{folder}: neither {SAFETENSORS_FILE} nor {PYTORCH_FILE}")
    raise ArtifactError(f"{folder}: no {LINEAR_KEY} in the weights, so not a ColBERT checkpoint")
