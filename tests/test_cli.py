from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import engram
from engram.cli import main
from engram.hotrows import HotRowPlan

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
