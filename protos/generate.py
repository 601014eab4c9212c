"""Generate the Python code for the wire contract: `python -m protos.generate` (or `python protos/generate.py`).

The generated modules are committed; tests/test_protos.py regenerates them into a temporary folder and checks
that the files are byte-identical, so a changed .proto or a grpcio-tools upgrade without regenerating fails CI.
The repository root is the include root, so the generated gRPC module imports
`from protos.rapnet.v1 import inference_pb2` and the package imports as `protos.rapnet.v1.inference_pb2`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ("protos/rapnet/v1/inference.proto",)


def generate(out_dir: str | Path = ROOT) -> list[Path]:
    """Run protoc (grpc_tools' bundled copy) for every proto; returns the files written."""
    out_dir = Path(out_dir)
    written = []
    for proto in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        stem = out_dir / proto[: -len(".proto")]
        written += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2.pyi"), Path(f"{stem}_pb2_grpc.py")]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT), help="output root (default: the repository root)")
    for path in generate(parser.parse_args(argv).out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
