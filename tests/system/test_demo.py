"""The demo (`make demo`) runs end to end; here on a tiny table and corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import engram

TOOLS = Path(__file__).parents[2] / "tools"


def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    import demo

    spec = json.loads((TOOLS / "demo_spec.json").read_text())
    spec["engram_vocab_size"] = [5003, 5003]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    demo.main(["--out", str(tmp_path / "out"), "--files", "3", "--spec", str(tmp_path / "spec.json")])
    out = capsys.readouterr().out
    assert "every tier returned identical rows" in out and "EngramMemory(layer 1" in out
    assert "same tokens: True" in out                          # generation with caches == recompute
    assert (tmp_path / "out" / "hot_rows.npz").exists() and (tmp_path / "out" / "coverage.png").exists()
    sys.modules.pop("demo", None)
    sys.modules.pop("generate", None)


def test_docstring_states_the_table_size(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    import demo

    from engram.cli.common import load_spec

    spec = load_spec(str(demo.SPEC), engram.Compression.from_tokenizer_file(demo.TOKENIZER))
    layer_mib = {round(spec.layer_bytes(i) / 2**20) for i in spec.layer_ids}
    assert len(spec.layer_ids) == 2 and len(layer_mib) == 1
    assert f"two layers of ~{layer_mib.pop()} MiB, ~{round(spec.total_bytes / 2**20)} MiB in all" in demo.__doc__
    sys.modules.pop("demo", None)
