"""The command line refuses a --tokenizer that is not the table's, even one of the same vocabulary size:
the compression (which raw id maps to which row key), not the count of ids, must be the table's."""

from __future__ import annotations

import json

import pytest

import engram
from engram.cli import main


def word_tokenizer(path, words: list[str]) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


@pytest.fixture
def table_and_tokenizers(tmp_path):
    built_with = word_tokenizer(tmp_path / "a.json", ["[UNK]", "cat", "Cat", "dog", "Dog", "sat"])
    other = word_tokenizer(tmp_path / "b.json", ["[UNK]", "cat", "dog", "Dog", "Cat", "sat"])   # ids 2 and 4 swap
    comp, comp_b = (engram.Compression.from_tokenizer_file(t) for t in (built_with, other))
    assert (comp.vocab_size, comp.compressed_vocab_size) == (comp_b.vocab_size, comp_b.compressed_vocab_size) == (6, 4)
    assert comp.lookup.tolist() != comp_b.lookup.tolist()
    spec = engram.TableSpec(engram_vocab_size=(101,), max_ngram_size=2, n_head_per_ngram=1, n_embed_per_ngram=8,
                            layer_ids=(0,), compressed_vocab_size=comp.compressed_vocab_size)
    engram.build_table(tmp_path / "t.engram", spec, comp).close()
    return str(tmp_path / "t.engram"), built_with, other


@pytest.mark.parametrize("command", ["hash", "stats"])
def test_a_tokenizer_of_the_same_size_but_another_mapping_is_refused(capsys, tmp_path, table_and_tokenizers,
                                                                    command):
    table, built_with, other = table_and_tokenizers
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("cat sat dog\n" * 20)
    tail = ["--text", "cat sat"] if command == "hash" else [str(corpus)]
    assert main([command, "--table", table, "--tokenizer", built_with, *tail, "--json"]) == 0
    capsys.readouterr()
    code = main([command, "--table", table, "--tokenizer", other, *tail, "--json"])
    out, err = capsys.readouterr()
    error = json.loads(out)
    assert code == 3 and error["error_type"] == "SpecMismatchError"
    assert f"--tokenizer {other!r} gives a compression of 6 ids (fingerprint " in error["error"]
    assert "but the table" in error["error"] and "was built with one of 6 ids" in error["error"]
