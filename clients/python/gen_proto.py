"""Generates invalbus/_pb from proto/proto/{cache,wire}.proto with grpcio-tools.

    python clients/python/gen_proto.py          # write the generated modules
    python clients/python/gen_proto.py --check  # exit 1 if they differ from the .proto files

The generated modules are kept in the repository (so that `pip install ./clients/python` needs
no protoc); `scripts/test-python` runs the check, so they cannot drift from the schemas.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE.parent.parent / "proto" / "proto"
OUT = HERE / "src" / "invalbus" / "_pb"
FILES = ("cache.proto", "wire.proto")


def generate(out: Path) -> None:
    from grpc_tools import protoc

    for name in FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            str(PROTO_DIR / name),
        ]
        if name == "cache.proto":
            args.insert(2, f"--grpc_python_out={out}")
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {name}")
    # grpcio-tools writes `import cache_pb2`; inside the package it must be relative.
    grpc_file = out / "cache_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(re.sub(r"^import cache_pb2 as", "from . import cache_pb2 as", text, flags=re.M))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    a = p.parse_args()
    if not a.check:
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            f.name
            for f in sorted(Path(tmp).iterdir())
            if not (OUT / f.name).exists() or (OUT / f.name).read_text() != f.read_text()
        ]
    if stale:
        print(
            "gen_proto: out of date with proto/: " + ", ".join(stale) + " (run python clients/python/gen_proto.py)",
            file=sys.stderr,
        )
        return 1
    print("gen_proto: generated modules match proto/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
