#!/usr/bin/env python3
"""Regenerate the checked-in wire stubs in client/park/_proto/ from protos/.

protoc names generated modules after the proto path (`park/v1/jobs.proto` ->
`park.v1.jobs_pb2`), which would collide with the `park` package itself; the
stubs live in `park._proto` instead, so import lines are rewritten. Only import
lines and type references are touched, never the serialized descriptors.

    python scripts/gen_protos.py            # rewrite client/park/_proto/
    python scripts/gen_protos.py --check    # exit 1 if the checked-in stubs are stale
"""
from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
STUBS = ROOT / "client" / "park" / "_proto"
_IMPORT = re.compile(r"^from park\.v1 import ", re.M)
_PYI_REF = re.compile(r"\bpark\.v1\.")


def generate(dest: Path) -> None:
    """Write the stubs for every protos/park/v1/*.proto into dest (created)."""
    from grpc_tools import protoc  # a test/dev dependency, not a runtime one

    with tempfile.TemporaryDirectory() as tmp:
        sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "park" / "v1").glob("*.proto"))
        include = Path(protoc.__file__).parent / "_proto"
        mypy_plugin = shutil.which("protoc-gen-mypy") or str(Path(sys.executable).parent / "protoc-gen-mypy")
        args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--plugin=protoc-gen-mypy={mypy_plugin}", f"--python_out={tmp}",
                f"--grpc_python_out={tmp}", f"--mypy_out={tmp}", *sources]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((Path(tmp) / "park" / "v1").iterdir()):
            text = f.read_text()
            text = _IMPORT.sub("from park._proto import ", text)
            if f.suffix == ".pyi":
                text = _PYI_REF.sub("park._proto.", text)
            (dest / f.name).write_text(text)
    (dest / "__init__.py").write_text('"""Generated wire stubs; regenerate with scripts/gen_protos.py, never edit."""\n')


def stale_files(current: Path = STUBS) -> list[str]:
    """Names of stub files that differ from a fresh generation (empty if up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "fresh"
        generate(fresh)
        names = {p.name for p in fresh.iterdir()} | {p.name for p in current.glob("*.py*")}
        return sorted(n for n in names if not (current / n).exists() or not (fresh / n).exists()
                      or not filecmp.cmp(current / n, fresh / n, shallow=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: client/park/_proto/{name}")
        return 1 if stale else 0
    if STUBS.exists():
        shutil.rmtree(STUBS)
    generate(STUBS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
