"""Regenerate diredi_secure/_proto/ from protos/ (``make protos``); ``--check`` fails if stale.

protoc writes imports by the .proto path under the include root (``from diredi.v1 import ...``).
We keep the wire package ``diredi.v1`` (what grpcurl and other-language clients see) and rewrite
those imports to ``diredi_secure._proto.diredi.v1`` so the generated modules resolve inside our
package without putting a generic ``diredi`` package into site-packages. That rewrite is the only
post-processing; everything else is exactly protoc's output.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "diredi_secure" / "_proto"
_IMPORT_RE = re.compile(r"\b(from|import) diredi\.v1\b")


def generate(into: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins live next to this interpreter
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={into}",
        f"--grpc_python_out={into}",
        f"--mypy_out={into}",
        f"--mypy_grpc_out={into}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    files = sorted(p for p in into.rglob("*") if p.is_file())
    for path in files:
        text = path.read_text()
        text = _IMPORT_RE.sub(r"\1 diredi_secure._proto.diredi.v1", text)
        path.write_text(text)
    for pkg in {p.parent for p in files} | {into / "diredi"}:
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text("")
    return sorted(p for p in into.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed files are stale")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        fresh = {p.relative_to(fresh_root): p.read_bytes() for p in generate(fresh_root)}
        target = OUT_ROOT / "diredi"
        if opts.check:
            current = {
                p.relative_to(OUT_ROOT): p.read_bytes()
                for p in target.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            }
            stale = sorted(
                str(k) for k in fresh.keys() | current.keys() if fresh.get(k) != current.get(k)
            )
            if stale:
                print("stale generated protobuf code (run `make protos`): " + ", ".join(stale))
                return 1
            print("generated protobuf code is fresh")
            return 0
        if target.exists():
            shutil.rmtree(target)
        for rel, data in fresh.items():
            dest = OUT_ROOT / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        print(f"wrote {len(fresh)} files under {OUT_ROOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
