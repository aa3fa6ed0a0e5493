"""Edges of the API and the command line: each bad input is a typed error (and a JSON error with
exit 3 on the command line), never a traceback or a wrong result."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import engram
from engram.cli import main
from engram.storage import metadata

TOKENIZER = str(Path(engram.__file__).parent / "data" / "bpe_bytelevel_4k.tokenizer.json")
COMP = engram.Compression.identity(400)
SPEC = {"engram_vocab_size": [1000, 1000], "max_ngram_size": 3, "n_head_per_ngram": 2, "n_embed_per_ngram": 16,
        "layer_ids": [1]}


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("edges") / "t.engram"
    spec = engram.TableSpec.from_dict({**SPEC, "compressed_vocab_size": COMP.compressed_vocab_size})
    engram.build_table(path, spec, COMP, seed=1).close()
    return path


def run_json(capsys, *argv):
    code = main([*argv, "--json"])
    out, _ = capsys.readouterr()
    return code, json.loads(out)


# -- token ids ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ids, error, message", [
    (torch.zeros(1, 3, dtype=torch.long, device="meta"), engram.InputError, r"token_ids is on the meta device"),
    ([[1, 2], [3]], engram.InputError, r"token_ids is a ragged list \(rows of different lengths\)"),
    (torch.tensor([[1, 2]]).to_sparse(), engram.InputError, r"token_ids is a torch.sparse_coo tensor: pass dense"),
    ([[1, 2**64 - 1]], engram.TokenIdError, r"token_ids holds id 18446744073709551615, beyond every vocabulary"),
    ([[1, -2**70]], engram.TokenIdError, r"token_ids holds id -1180591620717411303424, beyond every vocabulary"),
])
def test_bad_ids_are_typed_errors(table_path, ids, error, message):
    with engram.open(table_path) as table, pytest.raises(error, match=message):
        table.lookup(ids, 1)


def test_an_empty_row_of_ids_is_an_empty_lookup(table_path):
    with engram.open(table_path) as table:
        out = table.lookup([[]], 1)
        assert out.shape == (1, 0, table.spec.embed_dim) and out.dtype == torch.float32
        assert table.rows(1, []).shape == (0, table.spec.head_dim)


@pytest.mark.parametrize("path, message", [
    (None, r"path=None is invalid: expected a str or os.PathLike"),
    ("ta\0ble", r"path='ta\\x00ble' is invalid: expected a non-empty text path without NUL"),
    (b"table", r"path=b'table' is invalid"),
    ("", r"path='' is invalid"),
])
def test_open_refuses_paths_that_name_nothing(path, message):
    with pytest.raises(engram.InputError, match=message):
        engram.open(path)


def test_a_spec_past_the_limits_is_refused_when_made():
    with pytest.raises(engram.SpecError, match=r"engram_vocab_size=\(1208925819614629174706176, "
                                               r"1208925819614629174706176\) is invalid: expected 2 ints in \[2, "):
        engram.TableSpec(engram_vocab_size=(2**80,) * 2, max_ngram_size=3, n_head_per_ngram=1, n_embed_per_ngram=8,
                         layer_ids=(1,), compressed_vocab_size=10)
    with pytest.raises(engram.SpecError, match=r"rows of D=1073741824 values are over the limit of 65536"):
        engram.TableSpec.from_dict({**SPEC, "n_head_per_ngram": 1, "n_embed_per_ngram": 2**30,
                                    "compressed_vocab_size": 10})
    with pytest.raises(engram.SpecError, match=r"2 layers x 2 orders x 1024 heads = 4096 hash heads|"
                                               r"= 8192 hash heads, over the limit of 4096"):
        engram.TableSpec.from_dict({**SPEC, "layer_ids": [1, 2, 3, 4], "n_head_per_ngram": 1024,
                                    "n_embed_per_ngram": 1024, "compressed_vocab_size": 10})
    with pytest.raises(engram.SpecError, match=r"vocab_size=1099511627776 is invalid: expected at most 134217728"):
        engram.Compression.identity(2**40)


# -- the command line -----------------------------------------------------------------------------------
def test_cli_deeply_nested_spec_is_a_json_error(capsys, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text("[" * 100_000 + "]" * 100_000)
    code, error = run_json(capsys, "build", str(tmp_path / "t.engram"), "--spec", str(spec), "--vocab-size", "10")
    assert code == 3 and error["error_type"] == "SpecError"
    assert "nests JSON arrays or objects more than 64 deep: pass a JSON file of TableSpec fields" in error["error"]


def test_cli_huge_vocab_size_is_a_json_error(capsys, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    code, error = run_json(capsys, "build", str(tmp_path / "t.engram"), "--spec", str(spec), "--vocab-size",
                           "1099511627776", "--dry-run")
    assert code == 3 and error["error_type"] == "SpecError"
    assert "vocab_size=1099511627776 is invalid: expected at most" in error["error"]


def test_cli_huge_row_width_is_a_json_error(capsys, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, "n_head_per_ngram": 1, "n_embed_per_ngram": 2**30}))
    code, error = run_json(capsys, "build", str(tmp_path / "t.engram"), "--spec", str(spec), "--vocab-size", "10")
    assert code == 3 and error["error_type"] == "SpecError"
    assert "rows of D=1073741824 values are over the limit" in error["error"]
    assert not (tmp_path / "t.engram").exists()


@pytest.mark.parametrize("command", ["hash", "stats"])
def test_cli_refuses_a_tokenizer_other_than_the_tables(capsys, table_path, tmp_path, command):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\n")
    extra = ["--text", "the cat"] if command == "hash" else [str(corpus), "--hot-rows", str(tmp_path / "hot.npz")]
    code, error = run_json(capsys, command, "--table", str(table_path), "--tokenizer", TOKENIZER, *extra)
    assert code == 3 and error["error_type"] == "SpecMismatchError"
    assert re.search(r"--tokenizer '.*' gives a compression of \d+ ids \(fingerprint \w+\), but the table '.*' was "
                     r"built with one of 400 ids", error["error"])
    assert not (tmp_path / "hot.npz").exists()


def test_cli_accepts_the_tables_own_tokenizer(capsys, tmp_path):
    comp = engram.Compression.from_tokenizer_file(TOKENIZER)
    spec = engram.TableSpec.from_dict({**SPEC, "compressed_vocab_size": comp.compressed_vocab_size})
    engram.build_table(tmp_path / "t.engram", spec, comp, seed=1).close()
    code, payload = run_json(capsys, "hash", "--table", str(tmp_path / "t.engram"), "--tokenizer", TOKENIZER,
                             "--text", "the cat")
    assert code == 0 and payload["compressed_ids"] == comp(np.array([payload["ids"]]))[0].tolist()


def test_a_full_disk_names_the_table(tmp_path, disk_full_at_third_chunk):
    spec = engram.TableSpec.from_dict({**SPEC, "layer_ids": [1, 2], "compressed_vocab_size": 400})
    path = tmp_path / "t.engram"
    with pytest.raises(OSError, match=r"No space left on device while writing the table '.*t.engram': free space") \
            as info:
        engram.build_table(path, spec, COMP, chunk_rows=2048)
    assert info.value.errno == errno.ENOSPC
    assert not path.exists() and os.listdir(tmp_path) == []


# -- a table replaced while it is opened ------------------------------------------------------------------
def test_open_during_a_replacement_opens_the_new_table(table_path, tmp_path, monkeypatch):
    """A table swapped out and deleted while open reads it looks incomplete: open retries and reads
    the new one, never telling the user to rebuild a healthy table."""
    path, new = tmp_path / "t.engram", tmp_path / "new.engram"
    shutil.copytree(table_path, path)
    spec = engram.TableSpec.from_dict({**SPEC, "compressed_vocab_size": COMP.compressed_vocab_size})
    engram.build_table(new, spec, COMP, seed=7).close()
    with engram.open(new) as t:
        expected = t.rows(1, np.arange(spec.rows(1)))
    real, calls = metadata.read_metadata, []

    def replaced_while_reading(tdir):
        calls.append(tdir)
        if len(calls) == 1:          # what overwrite=True does: swap the directories, then delete the old one
            os.rename(path, tmp_path / "old.engram")
            os.rename(new, path)
            shutil.rmtree(tmp_path / "old.engram")
        return real(tdir)

    monkeypatch.setattr(metadata, "read_metadata", replaced_while_reading)
    with engram.open(path, tier="ram") as table:
        assert torch.equal(table.rows(1, np.arange(spec.rows(1))), expected)
    assert len(calls) == 2


def test_a_damaged_table_that_was_not_replaced_is_still_refused(table_path, tmp_path, monkeypatch):
    path = tmp_path / "t.engram"
    shutil.copytree(table_path, path)
    os.remove(path / "layer_1" / "zarr.json")
    with pytest.raises(engram.CorruptTableError, match=r"layer 1 array metadata .* is missing"):
        engram.open(path)

