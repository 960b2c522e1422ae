"""Generates the Python stubs of protos/ragfleet/v1 into clients/python (`make protos`).

The generated files are committed; tests/unit/test_protos.py regenerates them into a temporary
folder and fails when the committed ones differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
CLIENT_ROOT = ROOT / "clients" / "python"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "ragfleet" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc for every contract into out_dir/ragfleet/v1 and returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted((out_dir / "ragfleet" / "v1").glob("*_pb2*.py*"))


def main() -> None:
    written = generate(CLIENT_ROOT)
    print(f"generated {len(written)} files into {CLIENT_ROOT / 'ragfleet' / 'v1'}", file=sys.stderr)


if __name__ == "__main__":
    main()
