"""`engram quality` and `engram convert --max-kl` on the project's tiny LM: a checkpoint written by
tools/train_tiny.py --save, read on a held-out text; the gate refuses (exit 1) and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import engram
from engram.cli import main

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import sys

    sys.path.insert(0, str(TOOLS))
    try:
        import train_tiny
    finally:
        sys.path.remove(str(TOOLS))
    root = tmp_path_factory.mktemp("tiny")
    text = root / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 150)
    train_tiny.main(["--data", str(text), "--steps", "8", "--batch-size", "4", "--block-size", "32",
                     "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--engram-vocab", "500",
                     "--lr", "1e-2", "--warmup", "2", "--eval-batches", "1", "--seed", "3", "--json",
                     "--engram-layers", "0", "--save", str(root / "ckpt")])
    return root / "ckpt"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_checkpoint_holds_a_gate_model(checkpoint):
    names = {p.name for p in checkpoint.iterdir()}
    assert {"table.engram", "model.pt", "config.json", "tokenizer.json", "tiny_lm.py", "engram_gate.py",
            "heldout.txt"} <= names
    assert (checkpoint / "heldout.txt").read_text()
    with engram.open(checkpoint / "table.engram") as table:
        assert table.spec.dtype == "float32" and table.spec.head_dim == 16


def test_quality_reports_what_int2_does_to_the_tiny_lm(checkpoint, capsys, tmp_path):
    src = checkpoint / "table.engram"
    engram.convert(src, tmp_path / "int2.engram", dtype="int2", scale_block=16)
    code, out, err = run(capsys, "quality", src, tmp_path / "int2.engram", "--model", checkpoint,
                         "--text", checkpoint / "heldout.txt", "--window", 32, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["positions"] > 0 and r["kl_mean"] > 0 and r["kl_p99"] >= r["kl_mean"] and 0 <= r["top1_agreement"] <= 1
    code, out, _ = run(capsys, "quality", src, src, "--model", checkpoint, "--text", checkpoint / "heldout.txt",
                       "--window", 32)
    assert code == 0 and "KL(source || converted) mean 0 nats" in out and "top-1 agreement 100.00%" in out


def test_convert_max_kl_refuses_with_exit_1_and_writes_nothing(checkpoint, capsys, tmp_path):
    src, dst = checkpoint / "table.engram", tmp_path / "int2.engram"
    gate = ["--gate-model", checkpoint, "--gate-text", checkpoint / "heldout.txt", "--gate-window", 32]
    code, _, err = run(capsys, "convert", src, dst, "--dtype", "int2", "--scale-block", 16, "--max-kl", "1e-9", *gate)
    assert code == 1 and "above max_kl=1e-09: nothing was written" in err
    assert list(tmp_path.iterdir()) == []
    code, out, err = run(capsys, "convert", src, dst, "--dtype", "int4", "--scale-block", 16, "--max-kl", "100",
                         *gate, "--json")
    assert code == 0, err
    assert json.loads(out)["quality"]["kl_mean"] < 100 and dst.is_dir()


def test_gate_flags_are_checked(checkpoint, capsys, tmp_path):
    src = checkpoint / "table.engram"
    code, _, err = run(capsys, "convert", src, tmp_path / "x", "--dtype", "int4", "--scale-block", 16,
                       "--max-kl", "0.1")
    assert code == 3 and "--max-kl needs a model to measure it with: pass --gate-model DIR" in err
    code, _, err = run(capsys, "convert", src, tmp_path / "x", "--dtype", "int4", "--scale-block", 16,
                       "--max-kl", "0.1", "--gate-model", tmp_path, "--gate-text", checkpoint / "heldout.txt")
    assert code == 3 and "has no engram_gate.py" in err
    assert not (tmp_path / "x").exists()
