"""The import rules of ARCHITECTURE.md, checked by parsing the source (nothing is imported).

(a) ragfleet_kernels/ imports neither `services` nor `grpc`; (b) model code imports neither `grpc` nor the
runtime's error, server, serve or calls modules; (c) a Retriever backend does not import a sibling backend;
(d) a service package does not import another one (services talk through the `ragfleet` stubs); (e) the
packaged code imports nothing from tools/, bench/ or tests/, which a wheel does not hold. Imports inside
functions count too. `services/cli.py` and `services/demo/` are front-ends: no rule applies to them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MODEL_CODE = (
    "ragfleet_kernels",
    "services/generator/retro",
    "services/retriever/colbert/encoder.py",
    "services/retriever/colbert/plaid.py",
    "services/retriever/colbert/codec.py",
    "services/retriever/mamba/model.py",
    "services/retriever/seal/search.py",
    "services/retriever/seal/lm.py",
    "services/retriever/seal/train.py",
    "services/reranker/backend.py",
    "services/reranker/cross_encoder.py",
    "services/reranker/first.py",
)
GRPC_BOUND = (
    "grpc",
    "services.runtime.errors",
    "services.runtime.server",
    "services.runtime.serve",
    "services.runtime.calls",
)
SERVICE_PACKAGES = ("gateway", "retriever", "generator", "evaluator", "reranker")
# Every other module or package directly under services/retriever is a backend (dense, bm25, colbert, ...).
RETRIEVER_SHARED = ("__init__", "backend", "passages", "service", "vectors")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(root: Path, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, names) of every import statement in the file, names absolute. `from a import b` names both
    `a` and `a.b`, since b may be a module; relative imports are resolved against the file's package."""
    module = _module_name(root, path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, [alias.name]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else [])
                base = ".".join(parts)
            yield node.lineno, [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _retriever_backend(module: str) -> str | None:
    """The backend a module belongs to (`services.retriever.colbert.plaid` -> "colbert"), or None."""
    parts = module.split(".")
    if len(parts) >= 3 and parts[:2] == ["services", "retriever"] and parts[2] not in RETRIEVER_SHARED:
        return parts[2]
    return None


def _service_package(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "services" and parts[1] in SERVICE_PACKAGES:
        return parts[1]
    return None


@dataclass(frozen=True, order=True)
class Violation:
    path: str
    line: int
    rule: str  # a key of RULES
    imported: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.imported} ({RULES[self.rule]})"


RULES = {
    "kernel": "a kernel imports services or grpc",
    "model": "model code imports grpc or the runtime's errors, server, serve or calls",
    "backend": "a Retriever backend imports another backend",
    "service": "a service package imports another service package",
    "shipped": "packaged code imports tools, bench or tests, which are not packaged",
}


def _broken_rule(rel: str, module: str, name: str) -> str | None:
    """The first rule that `module` (at path `rel`) importing `name` breaks, or None."""
    if any(_within(name, top) for top in ("tools", "bench", "tests")):
        return "shipped"
    if rel.startswith("ragfleet_kernels/") and (_within(name, "services") or _within(name, "grpc")):
        return "kernel"
    if any(rel == m or rel.startswith(m + "/") for m in MODEL_CODE) and any(
        _within(name, bound) for bound in GRPC_BOUND
    ):
        return "model"
    backend, other = _retriever_backend(module), _retriever_backend(name)
    if backend and other and other != backend:
        return "backend"
    service, other = _service_package(module), _service_package(name)
    if service and other and other != service:
        return "service"
    return None


def violations(root: Path) -> list[Violation]:
    """Every import under root/ragfleet_kernels and root/services that breaks a rule, one per import
    statement."""
    found = []
    for path in sorted([*(root / "ragfleet_kernels").rglob("*.py"), *(root / "services").rglob("*.py")]):
        rel, module = path.relative_to(root).as_posix(), _module_name(root, path)
        for line, names in _imports(root, path):
            broken = [(rule, name) for name in names if (rule := _broken_rule(rel, module, name))]
            if broken:
                found.append(Violation(rel, line, *broken[0]))
    return sorted(found)


def test_the_rules_name_files_that_exist() -> None:
    for path in MODEL_CODE:
        assert (ROOT / path).exists(), f"{path} moved: update MODEL_CODE (and ARCHITECTURE.md)"


def test_the_tree_keeps_the_import_rules() -> None:
    broken = violations(ROOT)
    assert not broken, "imports against ARCHITECTURE.md:\n" + "\n".join(map(str, broken))


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_checker_catches_a_violation_of_each_rule(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "ragfleet_kernels/fast.py": (
                "import grpc\nfrom services.runtime.storage import atomic_write_json\n"
            ),
            "services/evaluator/report.py": "def f():\n    from bench.common import markdown_table\n",
            "services/generator/retro/model.py": "def f():\n    from services.runtime import errors\n",
            "services/retriever/colbert/plaid.py": "from services.runtime import errors\n",
            "services/retriever/colbert/encoder.py": "from ..dense import DenseBackend\n",
            "services/retriever/dense.py": "from services.retriever.bm25 import Bm25Backend\n",
            "services/gateway/service.py": "import services.retriever.service\n",
            # Allowed: the shared modules, the stubs, a backend's own package, the retriever's shared parts.
            "services/gateway/fusion.py": (
                "from ragfleet.v1 import retriever_pb2\nfrom services.catalog import SERVICES\n"
                "from services.runtime.settings import Settings\nfrom services.ui import progress\n"
            ),
            "services/retriever/bm25.py": (
                "from services.retriever.backend import Backend\nfrom .passages import PassageStore\n"
            ),
            "services/retriever/colbert/backend.py": "from . import plaid\nfrom .encoder import Encoder\n",
            "services/retriever/service.py": "from services.retriever import bm25, dense\n",
            "services/generator/retro/train.py": "import grpc_tools\nimport services.runtime.artifacts\n",
            # Front-ends use every service.
            "services/cli.py": "from services.gateway.service import PipelineService\n",
            "services/demo/run.py": "from services.retriever.dense import DenseBackend\n",
        },
    )
    found = [(v.path, v.line, v.rule) for v in violations(tmp_path)]
    assert found == [
        ("ragfleet_kernels/fast.py", 1, "kernel"),
        ("ragfleet_kernels/fast.py", 2, "kernel"),
        ("services/evaluator/report.py", 2, "shipped"),
        ("services/gateway/service.py", 1, "service"),
        ("services/generator/retro/model.py", 2, "model"),
        ("services/retriever/colbert/encoder.py", 1, "backend"),
        ("services/retriever/colbert/plaid.py", 1, "model"),
        ("services/retriever/dense.py", 1, "backend"),
    ]
    assert (
        str(violations(tmp_path)[0])
        == "ragfleet_kernels/fast.py:1: imports grpc (a kernel imports services or grpc)"
    )
