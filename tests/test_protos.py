"""The checked-in wire stubs are exactly what scripts/gen_protos.py generates."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    stale = gen.stale_files()
    assert stale == [], f"regenerate with `python scripts/gen_protos.py`; stale: {stale}"
