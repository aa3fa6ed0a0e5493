from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import engram
from engram.cli import main
from engram.serving.hotrows import HotRowPlan

REPO = Path(__file__).resolve().parents[2]

TOKENIZER = str(Path(engram.__file__).parent / "data" / "bpe_bytelevel_4k.tokenizer.json")
SPEC = {"engram_vocab_size": [5003, 5003], "max_ngram_size": 3, "n_head_per_ngram": 2,
        "n_embed_per_ngram": 16, "layer_ids": [1, 4]}


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat on the mat.\nthe cat sat on the hat.\n" * 50)
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_hash_json_matches_the_library(capsys, spec_file):
    code, out, _ = run(capsys, "hash", "--spec", spec_file, "--tokenizer", TOKENIZER, "--text", "Hello world", "--json")
    assert code == 0
    payload = json.loads(out)
    comp = engram.Compression.from_tokenizer_file(TOKENIZER)
    spec = engram.TableSpec.from_dict({**SPEC, "compressed_vocab_size": comp.compressed_vocab_size})
    ids = np.array([payload["ids"]])
    assert payload["compressed_ids"] == comp(ids)[0].tolist()
    expected = engram.NgramHasher(spec, comp).hash(ids, 4)[0]
    heads = payload["layers"]["4"]
    assert [h["rows"] for h in heads] == expected.T.tolist()
    assert heads[2]["order"] == 3 and heads[2]["head"] == 0
    assert heads[1]["global_rows"] == (expected[:, 1] + spec.head_offsets(4)[1]).tolist()


def test_hash_human_summary(capsys, spec_file):
    code, out, _ = run(capsys, "hash", "--spec", spec_file, "--tokenizer", TOKENIZER, "--text", "Hi there")
    assert code == 0
    assert "compressed ids:" in out and "layer 1" in out and "n=3 k=1" in out


def test_stats_writes_plan_and_plot(capsys, spec_file, corpus, tmp_path):
    hot, plot = tmp_path / "hot.npz", tmp_path / "cov.png"
    code, out, _ = run(capsys, "stats", "--spec", spec_file, "--tokenizer", TOKENIZER, corpus,
                       "--all-families", "--hot-rows", str(hot), "--plot", str(plot), "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["tokens"] > 500 and set(payload["orders"]) == {"2", "3"}
    layer = payload["layers"]["1"]
    assert set(layer["families"]) == {"multiplicative-xor", "xxh64", "murmur3"}
    assert layer["coverage"]["0.5"] <= layer["coverage"]["0.9"] <= layer["coverage"]["0.99"] <= layer["rows_touched"]
    plan = HotRowPlan.load(hot)
    assert plan.tokens == payload["tokens"] and plan.rows[1].size == layer["rows_touched"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_human_summary(capsys, spec_file, corpus):
    code, out, _ = run(capsys, "stats", "--spec", spec_file, "--tokenizer", TOKENIZER, corpus)
    assert code == 0
    assert "distinct n-grams, Zipf exponent" in out and "collision rate" in out


def test_usage_errors_are_not_tracebacks(capsys, spec_file):
    code, _, err = run(capsys, "hash", "--spec", spec_file)
    assert code == 2 and "usage: engram hash" in err and "required" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice: 'frobnicate'" in err
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "exit codes" in out


def test_refused_input_exits_3_with_the_reason(capsys, tmp_path):
    code, _, err = run(capsys, "hash", "--spec", str(tmp_path / "nope.json"), "--tokenizer", TOKENIZER, "--text", "x")
    assert code == 3 and "--spec file" in err and "does not exist" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SPEC, "max_ngram_size": 1}))
    code, _, err = run(capsys, "hash", "--spec", str(bad), "--tokenizer", TOKENIZER, "--text", "x")
    assert code == 3 and "TableSpec.max_ngram_size=1 is invalid" in err
    bad.write_text("{not json")
    code, _, err = run(capsys, "hash", "--spec", str(bad), "--tokenizer", TOKENIZER, "--text", "x")
    assert code == 3 and "is not valid JSON" in err


@pytest.fixture
def built(capsys, spec_file, tmp_path):
    path = str(tmp_path / "t.engram")
    code, out, err = run(capsys, "build", path, "--spec", spec_file, "--vocab-size", "300", "--seed", "3",
                         "--chunk-rows", "4096", "--json")
    assert code == 0, err
    return path, json.loads(out)


def test_build_writes_the_table_the_library_would(built, tmp_path):
    path, payload = built
    assert payload["dry_run"] is False and payload["disk_bytes"] > 0
    comp = engram.Compression.identity(300)
    spec = engram.TableSpec.from_dict({**SPEC, "compressed_vocab_size": 300})
    same = engram.build_table(tmp_path / "lib.engram", spec, comp, seed=3, chunk_rows=4096)
    with engram.open(path) as table, same:
        assert table.spec == spec and table.compression == comp
        ids = np.array([[1, 2, 3, 299]])
        assert table.lookup(ids, 4).equal(same.lookup(ids, 4))
        assert payload["layers"]["1"]["chunks"] == table.layout(1).n_chunks
        assert payload["layers"]["1"]["rows"] == spec.rows(1)


def test_build_dry_run_writes_nothing(capsys, spec_file, tmp_path):
    path = tmp_path / "dry.engram"
    code, out, _ = run(capsys, "build", str(path), "--spec", spec_file, "--vocab-size", "300", "--dry-run",
                       "--dtype", "bfloat16")
    assert code == 0 and not path.exists()
    assert "would build" in out and "bfloat16" in out and "chunk(s)" in out and "free" in out
    code, out, _ = run(capsys, "build", str(path), "--spec", spec_file, "--vocab-size", "300", "--dry-run", "--json")
    payload = json.loads(out)
    spec = engram.TableSpec.from_dict({**SPEC, "compressed_vocab_size": 300})
    assert payload["fits"] is True and payload["layers"]["4"]["bytes"] == spec.layer_bytes(4)
    assert payload["disk_bytes"] >= spec.total_bytes


def test_build_refuses_a_table_that_would_not_fit(capsys, tmp_path, monkeypatch):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({**SPEC, "engram_vocab_size": [10**9, 10**9], "n_embed_per_ngram": 4096}))
    import engram.cli.write as write

    monkeypatch.setattr(write, "free_bytes", lambda path: 10 << 30)
    code, out, _ = run(capsys, "build", str(tmp_path / "x"), "--spec", str(big), "--vocab-size", "10", "--dry-run")
    assert code == 3 and "would NOT fit" in out                          # the plan, and the refusal
    code, _, err = run(capsys, "build", str(tmp_path / "x"), "--spec", str(big), "--vocab-size", "10")
    assert code == 3 and "only 10.0 GiB is free" in err
    assert not (tmp_path / "x").exists()


def test_build_refuses_to_replace_without_overwrite(capsys, built, spec_file):
    path, _ = built
    code, _, err = run(capsys, "build", path, "--spec", spec_file, "--vocab-size", "300")
    assert code == 3 and "already exists: pass --overwrite to replace" in err
    code, _, _ = run(capsys, "build", path, "--spec", spec_file, "--vocab-size", "300", "--overwrite", "--seed", "4")
    assert code == 0


def test_inspect(capsys, built):
    path, _ = built
    code, out, _ = run(capsys, "inspect", path, "--json", "--sample-rows", "500")
    assert code == 0
    payload = json.loads(out)
    spec = engram.TableSpec.from_dict(payload["spec"])
    layer = payload["layers"]["1"]
    assert layer["table_sizes"] == list(spec.table_sizes(1)) and layer["checksums"] == layer["chunks"]
    assert len(layer["multipliers"]) == 3
    sample = layer["sample"]
    # rows are N(0, 0.02^2) over D=8 values: the norm is about 0.02*sqrt(8)
    assert sample["rows"] == 500 and sample["all_zero_rows"] == 0
    assert 0.03 < sample["norm_mean"] < 0.08 and abs(sample["value_std"] - 0.02) < 0.003
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0 and "format version 1" in out and "multipliers" in out and "all-zero" in out


def test_verify_ok_and_corrupt(capsys, built):
    path, _ = built
    code, out, _ = run(capsys, "verify", path)
    assert code == 0 and "ok" in out
    with engram.open(path) as table:
        chunk = table.chunk_files(4)[1]
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", path, "--json")
    payload = json.loads(out)
    assert code == 1 and payload["ok"] is False
    assert "layer 4" in payload["error"] and "chunk 1" in payload["error"]


def test_missing_table_exits_3(capsys, tmp_path):
    code, _, err = run(capsys, "inspect", str(tmp_path / "nope"))
    assert code == 3 and "nope" in err


def test_bench_reports_tiers_and_baselines(capsys, built):
    path, _ = built
    code, out, _ = run(capsys, "bench", path, "--tier", "ram", "mmap", "--batch", "2", "--seq", "64",
                       "--repeats", "2", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["workload"]["batch"] == 2 and r["workload"]["layer_id"] == 1
    assert set(r["baselines"]) == {"index_select", "embedding"} and set(r["tiers"]) == {"ram", "mmap"}
    for entry in r["tiers"].values():
        assert entry["tokens_per_s"] > 0 and entry["cold"] is False
        assert entry["vs_index_select"] == pytest.approx(entry["tokens_per_s"] / r["baselines"]["index_select"])
    code, out, _ = run(capsys, "bench", path, "--tier", "direct", "--batch", "1", "--seq", "16", "--repeats", "1",
                       "--layer", "4")
    assert code == 0 and "direct" in out and "baseline index_select" in out
    code, _, err = run(capsys, "bench", path, "--layer", "2")
    assert code == 3 and "layer_id=2 has no table" in err


def _reference_rows(spec):
    return {lid: np.random.default_rng(lid).standard_normal((spec.rows(lid), spec.head_dim)).astype(np.float32)
            for lid in spec.layer_ids}


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_import_reference_checkpoint(capsys, spec_file, tmp_path, fmt):
    import torch
    from safetensors.torch import save_file

    spec = engram.TableSpec.from_dict({**SPEC, "compressed_vocab_size": 300})
    rows = _reference_rows(spec)
    tensors = {f"layers.{lid}.engram.multi_head_embedding.embedding.weight": torch.from_numpy(r)
               for lid, r in rows.items()}
    src = tmp_path / f"ckpt.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file(tensors, src)
    else:
        torch.save(tensors, src)
    path = tmp_path / "imported.engram"
    code, out, err = run(capsys, "import", str(path), "--spec", spec_file, "--vocab-size", "300",
                         "--weights", str(src), "--json")
    assert code == 0, err
    assert json.loads(out)["layers"]["4"]["rows"] == spec.rows(4)
    with engram.open(path) as table:
        for lid, r in rows.items():
            np.testing.assert_array_equal(table.rows(lid, np.arange(spec.rows(lid))).numpy(), r)


def _v41_checkpoint(tmp_path):
    """A spec file (D = 32: one E8M0 scale per row) and a V4.1-layout FP8 checkpoint of its layer 1:
    (spec, encoded rows); files spec.json and v41.safetensors in tmp_path."""
    import torch
    from safetensors.torch import save_file

    from engram.storage.quant import encode

    spec_d = {**SPEC, "n_embed_per_ngram": 64, "layer_ids": [1]}
    (tmp_path / "spec.json").write_text(json.dumps(spec_d))
    spec = engram.TableSpec.from_dict({**spec_d, "compressed_vocab_size": 300})
    q = encode(np.random.default_rng(0).standard_normal((spec.rows(1), 32)).astype(np.float32), "float8_e4m3")
    save_file({"model.layers.1.engram.embedding.weight": torch.from_numpy(q.values).view(torch.float8_e4m3fn),
               "model.layers.1.engram.embedding.weight_scale_inv": torch.from_numpy(q.scales)},
              tmp_path / "v41.safetensors")
    return spec, q


def test_import_fp8_checkpoint_dequantizes(capsys, tmp_path):
    import torch

    from engram.storage.quant import decode

    spec, q = _v41_checkpoint(tmp_path)
    path = tmp_path / "fp8.engram"
    code, _, err = run(capsys, "import", str(path), "--spec", str(tmp_path / "spec.json"), "--vocab-size", "300",
                       "--weights", str(tmp_path / "v41.safetensors"))
    assert code == 0, err
    with engram.open(path) as table:
        got = table.rows(1, np.arange(spec.rows(1)))
    assert torch.equal(got, decode(q.values, q.scales, "float8_e4m3"))


def test_import_dry_run_checks_the_tensors_and_writes_nothing(capsys, spec_file, tmp_path):
    import torch
    from safetensors.torch import save_file

    spec = engram.TableSpec.from_dict({**SPEC, "compressed_vocab_size": 300})
    name = "layers.{}.engram.multi_head_embedding.embedding.weight"
    good = {name.format(lid): torch.zeros(spec.rows(lid), spec.head_dim) for lid in spec.layer_ids}
    save_file(good, tmp_path / "good.safetensors")
    path = tmp_path / "t.engram"
    code, out, err = run(capsys, "import", str(path), "--spec", spec_file, "--vocab-size", "300",
                         "--weights", str(tmp_path / "good.safetensors"), "--dry-run", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["dry_run"] and d["disk_bytes"] == sum(lay["disk_bytes"] for lay in d["layers"].values())
    assert d["source_dtypes"] == {str(lid): "float32" for lid in spec.layer_ids}
    assert not path.exists() and not list(tmp_path.glob(".t.engram*"))
    short = {**good, name.format(4): torch.zeros(spec.rows(4) - 1, spec.head_dim)}
    save_file(short, tmp_path / "short.safetensors")
    code, _, err = run(capsys, "import", str(path), "--spec", spec_file, "--vocab-size", "300",
                       "--weights", str(tmp_path / "short.safetensors"), "--dry-run")
    assert code == 3 and f"weights[4] has shape ({spec.rows(4) - 1}, {spec.head_dim})" in err
    assert not path.exists()


def test_import_names_the_missing_tensor(capsys, spec_file, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"other": torch.zeros(2, 2)}, tmp_path / "c.safetensors")
    code, _, err = run(capsys, "import", str(tmp_path / "t"), "--spec", spec_file, "--vocab-size", "300",
                       "--weights", str(tmp_path / "c.safetensors"))
    assert code == 3 and "no tensor in" in err and "matches weight_pattern" in err
    assert "names look like ['other']" in err
    assert not (tmp_path / "t").exists()


# -- bad input never ends in a traceback ----------------------------------------------------------
def test_negative_counts_are_usage_errors(capsys, built):
    path, _ = built
    code, _, err = run(capsys, "inspect", path, "--sample-rows", "-1")
    assert code == 2 and "argument --sample-rows: -1 is invalid: pass an int >= 0" in err
    code, _, err = run(capsys, "bench", path, "--batch", "0")
    assert code == 2 and "argument --batch: 0 is invalid: pass an int >= 1" in err


@pytest.mark.parametrize("argv", [
    ["hash", "--spec", "SPEC", "--tokenizer", "TOK", "--text", "x"],
    ["stats", "--spec", "SPEC", "--tokenizer", "TOK", "CORPUS"],
    ["build", "OUT", "--spec", "SPEC", "--tokenizer", "TOK", "--dry-run"],
])
def test_missing_or_damaged_tokenizer_exits_3(capsys, spec_file, corpus, tmp_path, argv):
    bad = tmp_path / "tok.json"
    bad.write_text("{not json")
    names = {"SPEC": spec_file, "CORPUS": corpus, "OUT": str(tmp_path / "t")}
    for tok, message in ((bad, "cannot be loaded ("), (tmp_path / "none.json", "does not exist")):
        code, _, err = run(capsys, *[str(tok) if a == "TOK" else names.get(a, a) for a in argv])
        assert code == 3 and f"tokenizer file {str(tok)!r} {message}" in err and "pass the tokenizer.json" in err


def test_stats_refuses_output_paths_before_counting(capsys, spec_file, corpus, tmp_path, monkeypatch):
    import engram.making.corpus

    monkeypatch.setattr(engram.making.corpus, "tokenize_files", lambda *a, **k: pytest.fail("counted before refusing"))
    base = ["stats", "--spec", spec_file, "--tokenizer", TOKENIZER, corpus]
    missing = tmp_path / "missing" / "hot.npz"
    code, _, err = run(capsys, *base, "--hot-rows", str(missing))
    assert code == 3 and f"--hot-rows {str(missing)!r}: the folder {str(missing.parent)!r} does not exist" in err
    code, _, err = run(capsys, *base, "--plot", str(tmp_path / "missing" / "cov.png"))
    assert code == 3 and "--plot" in err and "does not exist: create it first" in err
    code, _, err = run(capsys, *base, "--plot", str(tmp_path))
    assert code == 3 and "is a folder: pass a file path, e.g." in err and "coverage.png" in err


@pytest.mark.parametrize("exc, code, message", [
    (PermissionError(13, "Permission denied", "corpus.txt"), 3, "Permission denied: 'corpus.txt'"),
    (KeyboardInterrupt(), 130, "engram stats: interrupted"),
])
def test_os_errors_exit_3_and_interrupts_130(capsys, spec_file, corpus, monkeypatch, exc, code, message):
    import engram.making.corpus

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(engram.making.corpus, "tokenize_files", fail)
    got, _, err = run(capsys, "stats", "--spec", spec_file, "--tokenizer", TOKENIZER, corpus)
    assert got == code and message in err


def test_free_bytes_of_a_path_whose_parents_do_not_exist_yet(capsys, spec_file, tmp_path):
    import shutil

    from engram.cli.common import free_bytes

    deep = tmp_path / "a" / "b" / "t.engram"
    assert abs(free_bytes(str(deep)) - shutil.disk_usage(tmp_path).free) < 1 << 30
    code, out, _ = run(capsys, "build", str(deep), "--spec", spec_file, "--vocab-size", "300", "--dry-run")
    assert code == 0 and "would build" in out and not (tmp_path / "a").exists()


def test_human_bytes():
    from engram.cli.common import human_bytes

    assert [human_bytes(n) for n in (0, 1023, 1024, 1536 << 20, 1 << 40, 5 << 50)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 GiB", "1.0 TiB", "5120.0 TiB"]


# -- build --dry-run refuses what a real build would ------------------------------------------------
def _subparsers():
    import argparse

    from engram.cli import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", ["build", "import", "convert"])
def test_dtype_choices_are_the_row_dtypes(command):
    import engram.dtypes

    dtype = next(a for a in _subparsers()[command]._actions if a.dest == "dtype")
    assert tuple(dtype.choices) == tuple(engram.dtypes.ROW_DTYPES)
    assert {"int8", "float8_e4m3"} <= set(dtype.choices)


def test_help_states_each_default_once(capsys):
    for command in ["", *_subparsers()]:
        code, out, _ = run(capsys, *([command] if command else []), "--help")
        assert code == 0 and "(default: None)" not in out and "(default: False)" not in out
        entries = re.split(r"\n(?=  -)", out.split("options:", 1)[1])
        for entry in entries:
            assert entry.count("default") <= 1, (command, entry)
    code, out, _ = run(capsys, "import", "--help")
    assert "'layers.{layer_id}.engram.multi_head_embedding.embedding.weight')" in out
    code, out, _ = run(capsys, "bench", "--help")
    assert "(default: ram mmap direct)" in out and "(default: 8)" in out


def test_dry_run_refuses_a_spec_that_does_not_fit_the_compression(capsys, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, "compressed_vocab_size": 500}))
    code, _, err = run(capsys, "build", str(tmp_path / "t"), "--spec", str(spec), "--vocab-size", "300", "--dry-run")
    assert code == 3 and "compressed_vocab_size=300 but spec.compressed_vocab_size=500" in err


def test_dry_run_refuses_an_existing_target_without_overwrite(capsys, built, spec_file, tmp_path):
    path, _ = built
    code, _, err = run(capsys, "build", path, "--spec", spec_file, "--vocab-size", "300", "--dry-run")
    assert code == 3 and "already exists: pass --overwrite to replace" in err
    code, out, _ = run(capsys, "build", path, "--spec", spec_file, "--vocab-size", "300", "--dry-run", "--overwrite")
    assert code == 0 and "would build" in out
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "build", str(tmp_path / "notes.txt"), "--spec", spec_file, "--vocab-size", "300",
                       "--dry-run", "--overwrite")
    assert code == 3 and "exists and is not an engram table" in err


def test_spec_file_that_is_not_text_exits_3(capsys, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_bytes(b"\xff\xfe{")
    code, _, err = run(capsys, "hash", "--spec", str(spec), "--tokenizer", TOKENIZER, "--text", "x")
    assert code == 3 and "is not UTF-8 text ('utf-8' codec can't decode byte 0xff" in err


# -- quantized tables: int8 and float8_e4m3 --------------------------------------------------------
def _disk_bytes(table, layer_id):
    """Bytes of the layer's chunk files on disk, scale and block digest arrays included."""
    files = table.chunk_files(layer_id) + (table.chunk_files(layer_id, scales=True) if table.spec.quantized else [])
    files += list((table.path / f"layer_{layer_id}_blocks" / "c").glob("*/0"))
    return sum(f.stat().st_size for f in files)


@pytest.mark.parametrize("dtype, extra, stored", [
    ("int8", [], 8 + 4),                               # D=8 int8 values + one float32 scale
    ("float8_e4m3", ["--scale-block", "4"], 8 + 2),    # D=8 E4M3 values + two E8M0 scales
])
def test_build_quantized_table_verifies_and_inspects(capsys, spec_file, tmp_path, dtype, extra, stored):
    path = tmp_path / f"{dtype}.engram"
    argv = ["build", str(path), "--spec", spec_file, "--vocab-size", "300", "--dtype", dtype, *extra]
    code, out, err = run(capsys, *argv, "--dry-run", "--json")
    assert code == 0, err
    dry = json.loads(out)
    spec = engram.TableSpec.from_dict(dry["spec"])
    assert spec.dtype == dtype and spec.stored_row_bytes == stored == dry["encoding"]["stored_row_bytes"]
    assert dry["bytes"] == spec.total_bytes
    for lid in spec.layer_ids:
        assert dry["layers"][str(lid)]["bytes"] == spec.layer_bytes(lid) == spec.rows(lid) * stored
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    built = json.loads(out)
    assert built["layers"] == dry["layers"]

    code, out, _ = run(capsys, "verify", str(path))
    assert code == 0 and "6 chunk file(s) match" in out       # values, scales and block digests of 2 layers
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["format_version"] == 2 and payload["encoding"] == dry["encoding"]
    assert payload["encoding"]["scale_block"] == (4 if dtype == "float8_e4m3" else None)
    with engram.open(path) as table:
        for lid in spec.layer_ids:
            layer = payload["layers"][str(lid)]
            assert layer["bytes"] == spec.layer_bytes(lid)
            assert layer["disk_bytes"] == _disk_bytes(table, lid) == dry["layers"][str(lid)]["disk_bytes"]
            assert layer["scales"]["array"] == f"layer_{lid}_scales" and layer["scales"]["checksums"] == 1
        assert payload["disk_bytes"] == sum(_disk_bytes(table, lid) for lid in spec.layer_ids)
    sample = payload["layers"]["1"]["sample"]       # decoded rows: N(0, 0.02^2) up to the quantization error
    assert sample["all_zero_rows"] == 0 and abs(sample["value_std"] - 0.02) < 0.003
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0 and f"{dtype} rows of D=8" in out and f"{stored} B stored per row" in out
    assert "scales in layer_1_scales" in out and "rows, decoded: norm" in out


def test_float_table_inspect_reports_its_chunk_files(capsys, built):
    path, _ = built
    code, out, _ = run(capsys, "inspect", path, "--json", "--sample-rows", "0")
    payload = json.loads(out)
    assert payload["encoding"]["quantized"] is False and payload["encoding"]["stored_row_bytes"] == 32
    with engram.open(path) as table:
        assert payload["layers"]["4"]["disk_bytes"] == _disk_bytes(table, 4)
    assert payload["layers"]["4"]["scales"] is None


def test_fp8_scale_block_must_divide_d(capsys, spec_file, tmp_path):
    base = ["build", str(tmp_path / "t"), "--spec", spec_file, "--vocab-size", "300", "--dry-run"]
    code, _, err = run(capsys, *base, "--dtype", "float8_e4m3")                  # D=8, default block 32
    assert code == 3 and "TableSpec.scale_block=32 is invalid" in err and "pass --scale-block B" in err
    assert "a divisor of D=8" in err and "Traceback" not in err
    code, _, err = run(capsys, *base, "--dtype", "float8_e4m3", "--scale-block", "3")
    assert code == 3 and "TableSpec.scale_block=3 is invalid" in err and "--scale-block" in err
    code, _, err = run(capsys, *base, "--dtype", "int8", "--scale-block", "4")
    assert code == 3 and "--scale-block 4 applies to float8_e4m3, int4, int2 rows only" in err
    code, _, err = run(capsys, *base, "--dtype", "float8_e4m3", "--scale-block", "0")
    assert code == 2 and "argument --scale-block: 0 is invalid" in err
    fp8 = tmp_path / "fp8.json"                       # the spec file's own dtype takes --scale-block too
    fp8.write_text(json.dumps({**SPEC, "dtype": "float8_e4m3"}))
    code, out, err = run(capsys, "build", str(tmp_path / "t"), "--spec", str(fp8), "--vocab-size", "300",
                         "--dry-run", "--scale-block", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["spec"]["scale_block"] == 8 and not (tmp_path / "t").exists()
    code, _, err = run(capsys, "build", str(tmp_path / "t"), "--spec", str(fp8), "--vocab-size", "300", "--dry-run")
    assert code == 3 and "pass --scale-block B" in err


def test_the_spec_files_scale_block_is_kept_unless_a_flag_overrides_it(capsys, tmp_path):
    fp8 = tmp_path / "fp8.json"
    fp8.write_text(json.dumps({**SPEC, "dtype": "float8_e4m3", "scale_block": 4}))          # D=8: two blocks
    base = ["build", str(tmp_path / "t"), "--spec", str(fp8), "--vocab-size", "300", "--dry-run", "--json"]
    code, out, err = run(capsys, *base)
    assert code == 0, err
    assert json.loads(out)["spec"]["scale_block"] == 4 and json.loads(out)["encoding"]["scales_per_row"] == 2
    code, out, err = run(capsys, *base, "--scale-block", "8")
    assert code == 0 and json.loads(out)["spec"]["scale_block"] == 8
    fp8.write_text(json.dumps({**SPEC, "dtype": "float8_e4m3", "scale_block": 3}))
    code, _, err = run(capsys, *base)
    assert code == 3 and "TableSpec.scale_block=3 is invalid" in err
    code, out, err = run(capsys, *base, "--dtype", "float32")                 # blocks mean nothing to float rows
    assert code == 0 and "scale_block" not in json.loads(out)["spec"]


def test_import_fp8_checkpoint_into_an_fp8_table_keeps_the_bytes(capsys, tmp_path):
    spec, q = _v41_checkpoint(tmp_path)
    base = ["import", "--spec", str(tmp_path / "spec.json"), "--vocab-size", "300", "--weights",
            str(tmp_path / "v41.safetensors"), "--dtype", "float8_e4m3", "--json"]
    code, out, err = run(capsys, *base[:1], str(tmp_path / "a.engram"), *base[1:])
    assert code == 0, err
    assert json.loads(out)["layers"]["1"]["bytes"] == spec.rows(1) * (32 + 1)
    with engram.open(tmp_path / "a.engram") as table:
        stored = table.stored_rows(1, np.arange(spec.rows(1)))
    np.testing.assert_array_equal(stored.values, q.values)
    np.testing.assert_array_equal(stored.scales, q.scales)
    code, out, err = run(capsys, *base[:1], str(tmp_path / "b.engram"), *base[1:], "--scale-block", "16")
    assert code == 0, err
    assert json.loads(out)["encoding"]["scales_per_row"] == 2


# -- engram convert ---------------------------------------------------------------------------------
def test_convert_reports_what_the_library_reports(capsys, built, tmp_path):
    path, _ = built
    dst = tmp_path / "int8.engram"
    code, out, err = run(capsys, "convert", path, str(dst), "--dtype", "int8", "--sample-rows", "3000", "--seed", "5",
                         "--json")
    assert code == 0, err
    payload = json.loads(out)
    same = engram.convert(path, tmp_path / "lib.engram", dtype="int8", sample_rows=3000, seed=5).to_dict()
    for key in ("src_dtype", "dst_dtype", "scale_block", "copied", "sample_rows", "seed", "bytes_before",
                "bytes_after", "max_rel_error"):
        assert payload[key] == same[key], key
    assert payload["layers"] == same["layers"] and payload["dry_run"] is False
    spec = engram.TableSpec.from_dict({**SPEC, "compressed_vocab_size": 300})
    layer = payload["layers"]["4"]
    assert layer["sampled_rows"] == 3000 and 0 < layer["rms_rel_error"] <= layer["max_rel_error"] < 0.05
    assert layer["bytes_before"] == spec.layer_bytes(4) and layer["bytes_after"] == spec.rows(4) * (8 + 4)
    with engram.open(dst) as table:
        assert table.spec.dtype == "int8" and payload["disk_bytes_after"] == sum(
            _disk_bytes(table, lid) for lid in spec.layer_ids)
    code, _, _ = run(capsys, "verify", str(dst))
    assert code == 0


def test_convert_human_summary_and_dry_run(capsys, built, tmp_path):
    path, _ = built
    dst = tmp_path / "fp8.engram"
    argv = ["convert", path, str(dst), "--dtype", "float8_e4m3", "--scale-block", "8", "--sample-rows", "100"]
    code, out, _ = run(capsys, *argv, "--dry-run", "--json")
    assert code == 0 and not dst.exists()
    dry = json.loads(out)
    spec = engram.TableSpec.from_dict({**SPEC, "compressed_vocab_size": 300, "dtype": "float8_e4m3",
                                       "scale_block": 8})
    assert dry["layers"]["1"]["bytes_after"] == spec.layer_bytes(1) and dry["fits"] is True
    code, out, _ = run(capsys, *argv, "--dry-run")
    assert code == 0 and "would convert" in out and "free" in out and not dst.exists()
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "(float32) -> " in out and "float8_e4m3, scale_block 8" in out
    assert "max error" in out and "RMS error" in out and "sample of up to 100 rows" in out
    code, out, _ = run(capsys, "convert", str(dst), str(tmp_path / "copy.engram"), "--dtype", "float8_e4m3",
                       "--scale-block", "8", "--sample-rows", "0")
    assert code == 0 and "stored bytes copied unchanged" in out
    code, out, _ = run(capsys, "convert", str(dst), str(dst), "--dtype", "bfloat16", "--overwrite", "--json")
    assert code == 0 and json.loads(out)["src_dtype"] == "float8_e4m3"
    with engram.open(dst) as table:
        assert table.spec.dtype == "bfloat16"


def test_convert_refuses_bad_input(capsys, built, tmp_path):
    path, _ = built
    code, _, err = run(capsys, "convert", str(tmp_path / "nope"), str(tmp_path / "out"), "--dtype", "int8")
    assert code == 3 and "nope" in err
    code, _, err = run(capsys, "convert", path, path, "--dtype", "int8")
    assert code == 3 and "already exists" in err
    code, _, err = run(capsys, "convert", path, path, "--dtype", "int8", "--dry-run")
    assert code == 3 and "already exists" in err
    code, _, err = run(capsys, "convert", path, str(tmp_path / "out"), "--dtype", "int3")
    assert code == 2 and "argument --dtype: invalid choice: 'int3'" in err
    code, _, err = run(capsys, "convert", path, str(tmp_path / "out"))
    assert code == 2 and "--dtype" in err and "required" in err
    code, _, err = run(capsys, "convert", path, str(tmp_path / "out"), "--dtype", "float8_e4m3")      # D=8
    assert code == 3 and "pass --scale-block B with B a divisor of D=8" in err
    code, _, err = run(capsys, "convert", path, str(tmp_path / "out"), "--dtype", "int8", "--scale-block", "4")
    assert code == 3 and "applies to float8_e4m3, int4, int2 rows only" in err
    code, _, err = run(capsys, "convert", path, str(tmp_path / "out"), "--dtype", "int8", "--sample-rows", "-1")
    assert code == 2 and "argument --sample-rows" in err
    assert not (tmp_path / "out").exists()


def test_bench_on_an_int8_table(capsys, spec_file, tmp_path):
    path = str(tmp_path / "int8.engram")
    code, _, err = run(capsys, "build", path, "--spec", spec_file, "--vocab-size", "300", "--dtype", "int8")
    assert code == 0, err
    code, out, _ = run(capsys, "bench", path, "--tier", "ram", "mmap", "--batch", "1", "--seq", "16", "--repeats", "1",
                       "--json")
    assert code == 0
    r = json.loads(out)
    w = r["workload"]
    assert w["dtype"] == "int8" and w["quantized"] is True and w["row_bytes"] == 8 + 4
    assert w["decoded_dtype"] == "float32" and w["baseline_row_bytes"] == 8 * 4 and w["baselines_skipped"] is False
    spec = engram.TableSpec.from_dict({**SPEC, "compressed_vocab_size": 300, "dtype": "int8"})
    assert w["layer_bytes"] == spec.layer_bytes(1) and w["baseline_bytes"] == spec.rows(1) * 32
    assert set(r["baselines"]) == {"index_select", "embedding"} and set(r["tiers"]) == {"ram", "mmap"}
    code, out, _ = run(capsys, "bench", path, "--tier", "ram", "--batch", "1", "--seq", "16", "--repeats", "1")
    assert code == 0 and "int8 rows of 12 B (scales included, decoded to float32)" in out
    assert "decoded once to float32 in RAM (32 B per row)" in out


def test_errors_under_json_are_one_json_object_too(capsys, tmp_path):
    code, out, err = run(capsys, "inspect", str(tmp_path / "nothere.engram"), "--json")
    assert code == 3 and "no table at" in err
    d = json.loads(out)
    assert d["exit_code"] == 3 and d["error_type"] == "TableNotFoundError" and "no table at" in d["error"]


def test_a_closed_pipe_ends_output_quietly(spec_file):
    import subprocess
    import sys

    script = "import sys; from engram.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", script, "hash", "--spec", spec_file, "--tokenizer", TOKENIZER,
            "--text", "word " * 5000, "--json"]                       # far more output than a pipe buffers
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO) as writer:
        assert len(writer.stdout.read(10)) == 10
        writer.stdout.close()                                         # the reader goes away
        err = writer.stderr.read().decode()
        assert writer.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err


def test_usage_errors_under_json_are_one_json_object_too(capsys, spec_file, tmp_path):
    code, out, err = run(capsys, "build", str(tmp_path / "x"), "--spec", spec_file, "--vocab-size", "-3", "--json")
    assert code == 2 and "argument --vocab-size: -3 is invalid" in err and "usage: engram build" in err
    d = json.loads(out)
    assert d == {"error": "argument --vocab-size: -3 is invalid: pass an int >= 1", "error_type": "UsageError",
                 "exit_code": 2}
    for flag, value in (("--seed", "-1"), ("--std", "-0.5"), ("--std", "nan")):
        code, _, err = run(capsys, "build", str(tmp_path / "x"), "--spec", spec_file, "--vocab-size", "3",
                           flag, value)
        assert code == 2 and f"argument {flag}: {value} is invalid" in err


def test_an_error_into_a_closed_pipe_still_exits_with_its_code(tmp_path):
    import subprocess
    import sys

    script = "import sys; from engram.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", script, "inspect", str(tmp_path / "none.engram"), "--json"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO) as proc:
        proc.stdout.close()                                           # nobody reads the JSON error
        err = proc.stderr.read().decode()
        assert proc.wait() == 3 and "Traceback" not in err


def test_inspect_a_v41_checkpoint_directory(capsys, v41_release):
    ck = v41_release(naming="hf")
    code, out, err = run(capsys, "inspect", str(ck.path), "--probe-reads", "64", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["kind"] == "deepseek-v4.1 checkpoint" and d["naming"] == "model."
    assert engram.TableSpec.from_dict(d["spec"]) == ck.spec and d["bytes"] == ck.spec.total_bytes
    layer = d["layers"]["14"]
    assert (layer["rows"], layer["bytes"]) == (ck.spec.rows(14), ck.spec.layer_bytes(14))
    names = [t["name"] for t in layer["tensors"]]
    assert names == ["model.layers.14.engram." + n for n in ("embed.weight", "embed.scale", "k_weight", "q_weight",
                                                             "wkv.weight", "wkv.weight_scale_inv")]
    assert all(t["file"] == "model-00002-of-00002.safetensors" for t in layer["tensors"])
    where = d["placement"]
    assert where["fits_in_ram"] and where["suggested_tier"] == "ram" and where["rows_per_token"] == 8
    assert where["cold_reads_per_s"] > 0 and where["cold_tokens_per_s"] == where["cold_reads_per_s"] / 8
    code, out, err = run(capsys, "inspect", str(ck.path), "--probe-reads", "0")
    assert code == 0, err
    assert "DeepSeek-V4.1 checkpoint, rows served in place" in out and "suggested tier: 'ram'" in out
    assert "model.layers.1.engram.embed.weight  F8_E4M3 [" in out and "direct reads" not in out


def test_verify_a_v41_checkpoint_directory(capsys, v41_release):
    ck = v41_release()
    code, out, err = run(capsys, "verify", str(ck.path))
    assert code == 0, err
    assert "ok, 4 row and scale tensor(s): headers unchanged, no NaN codes" in out
    shard = ck.path / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    with engram.open(ck.path) as table:
        data[table.tensors(1).scales.offset] = 0xFF                                # an E8M0 NaN scale
    shard.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", str(ck.path), "--json")
    assert code == 1 and "tensor 'layers.1.engram.embed.scale' row 0 holds a NaN code" in json.loads(out)["error"]


def test_import_finds_the_v41_release_names_unaided(capsys, v41_release, tmp_path):
    import torch

    ck = v41_release(naming="hf")
    (tmp_path / "spec.json").write_text(json.dumps(ck.spec.to_dict()))
    path = tmp_path / "v41.engram"
    code, _, err = run(capsys, "import", str(path), "--spec", str(tmp_path / "spec.json"),
                       "--tokenizer", str(ck.path / "tokenizer.json"), "--weights", str(ck.path))
    assert code == 0, err
    ids = np.random.default_rng(0).integers(0, ck.comp.vocab_size, (2, 30))
    with engram.open(path) as imported, engram.open(ck.path) as in_place:
        assert imported.spec == in_place.spec
        for lid in ck.spec.layer_ids:
            assert torch.equal(imported.lookup(ids, lid), in_place.lookup(ids, lid))


def test_version_prints_the_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"engram {engram.__version__}"


def test_a_released_config_json_is_a_spec_for_import_build_hash_and_stats(capsys, v41_release, tmp_path, corpus):
    import torch

    ck = v41_release(naming="hf")
    config, tok = str(ck.path / "config.json"), str(ck.path / "tokenizer.json")
    path = tmp_path / "v41.engram"
    code, _, err = run(capsys, "import", str(path), "--spec", config, "--tokenizer", tok, "--weights", str(ck.path))
    assert code == 0, err
    ids = np.random.default_rng(0).integers(0, ck.comp.vocab_size, (2, 30))
    with engram.open(path) as imported, engram.open(ck.path) as in_place:
        assert imported.spec == ck.spec == engram.TableSpec.from_hf_config(config)
        assert torch.equal(imported.lookup(ids, 14), in_place.lookup(ids, 14))
    code, out, err = run(capsys, "build", str(tmp_path / "b.engram"), "--spec", config, "--tokenizer", tok,
                         "--dry-run", "--json")
    assert code == 0, err
    assert engram.TableSpec.from_dict(json.loads(out)["spec"]) == ck.spec
    code, out, err = run(capsys, "hash", "--spec", config, "--tokenizer", tok, "--text", "Hello world", "--json")
    assert code == 0, err
    word = json.loads(out)
    assert word["layers"]["14"][0]["rows"] == engram.NgramHasher(ck.spec, ck.comp).hash(np.array([word["ids"]]), 14)[
        0, :, 0].tolist()
    code, _, err = run(capsys, "stats", "--spec", config, "--tokenizer", tok, corpus, "--json")
    assert code == 0, err


def test_a_config_json_is_checked_as_from_hf_config_checks_it(capsys, v41_release, tmp_path):
    ck = v41_release()
    text = ck.config["text_config"]
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({**ck.config, "text_config": {**text, "engram_num_embeddings": [5, 7]}}))
    code, out, err = run(capsys, "build", str(tmp_path / "t.engram"), "--spec", str(bad), "--tokenizer",
                         str(ck.path / "tokenizer.json"), "--dry-run")
    assert code == 3 and re.search(r"engram_num_embeddings\[0\]=5 \(layer 1\) differs from the \d+ rows", err)
    code, out, err = run(capsys, "hash", "--spec", str(ck.path / "config.json"), "--tokenizer", TOKENIZER,
                         "--text", "hi")
    assert code == 0, err                                     # the same tokenizer: the same compressed vocabulary
    code, out, err = run(capsys, "build", str(tmp_path / "t.engram"), "--spec", str(ck.path / "config.json"),
                         "--vocab-size", "5000", "--dry-run")
    assert code == 3 and "engram_compressed_vocab_size=2693 differs from the compression's" in err


def test_inspect_on_a_release_folder_prints_the_spec_its_config_implies(capsys, v41_release):
    ck = v41_release()
    code, out, err = run(capsys, "inspect", str(ck.path), "--probe-reads", "0")
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.strip().startswith("spec (what config.json implies"))
    assert engram.TableSpec.from_dict(json.loads(line[line.index("{"):])) == ck.spec
