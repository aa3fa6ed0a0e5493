from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from engram import Compression, InputError, NgramHasher, SpecMismatchError, TableSpec
from engram.errors import CorruptTableError, MissingFileError
from engram.making.corpus import corpus_stats, count_ngrams, coverage_rows, tokenize_files, zipf_exponent
from engram.serving.hotrows import HotRowPlan

COMP = Compression([0, 1, 2, 3, 4, 5, 6, 7, 8, 8])  # raw 8 and 9 merge
SPEC = TableSpec(engram_vocab_size=(13, 17), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=4,
                 layer_ids=(0, 3), compressed_vocab_size=9, pad_id=0)


def _python_counts(seqs, n, pad=0):
    counter = Counter()
    for s in seqs:
        x = [pad] * (n - 1) + [int(COMP.lookup[i]) for i in s]
        for t in range(n - 1, len(x)):
            counter[tuple(x[t - n + 1: t + 1])] += 1
    return counter


def test_counts_match_a_python_count():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 10, size) for size in (1, 2, 30, 200)] + [np.zeros(0, np.int64)]
    counts = count_ngrams(seqs, SPEC, COMP)
    for n in (2, 3):
        expected = _python_counts(seqs, n)
        got = {tuple(g): int(c) for g, c in zip(counts[n].grams.tolist(), counts[n].counts, strict=True)}
        assert got == dict(expected)
        assert counts[n].total == 233 and list(counts[n].counts) == sorted(counts[n].counts, reverse=True)


def test_row_usage_matches_hashing_every_position():
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 10, 300), rng.integers(0, 10, 77)]
    stats = corpus_stats(seqs, SPEC, COMP, families=["multiplicative-xor", "xxh64", "murmur3"])
    hasher = NgramHasher(SPEC, COMP)
    for layer_id in SPEC.layer_ids:
        offsets = np.array(SPEC.head_offsets(layer_id))
        rows = np.concatenate([(hasher.hash(s[None], layer_id)[0] + offsets).ravel() for s in seqs])
        expected = Counter(rows.tolist())
        got_rows, got_lookups = stats.layer_rows[layer_id]
        assert dict(zip(got_rows.tolist(), got_lookups.tolist(), strict=True)) == dict(expected)
        d = stats.to_dict()["layers"][layer_id]
        assert d["rows_touched"] == len(expected) and d["rows"] == SPEC.rows(layer_id)
        assert set(d["families"]) == {"multiplicative-xor", "xxh64", "murmur3"}
        for head in d["families"]["xxh64"]["heads"]:
            assert 0 < head["share_touched"] <= 1 and 0 <= head["collision_rate"] <= 1


def test_collision_rate_counts_ngrams_that_share_a_row():
    # Every distinct bigram lands in one of 13 rows of the first head: with 81+ distinct bigrams
    # (pad included) most must share; with two distinct bigrams in a roomy table, none should.
    roomy = SPEC.replace(engram_vocab_size=(1_000_003, 1_000_003), layer_ids=(0,))
    stats = corpus_stats([np.array([1, 2])], roomy, COMP)
    heads = stats.to_dict()["layers"][0]["families"]["multiplicative-xor"]["heads"]
    assert all(h["collision_rate"] == 0.0 for h in heads)
    assert heads[0]["rows_touched"] == 2 and heads[0]["share_touched"] == 2 / 1_000_003
    crowded = corpus_stats([np.arange(10).repeat(3)[np.random.default_rng(0).permutation(30)]] * 3, SPEC, COMP)
    assert crowded.to_dict()["layers"][0]["families"]["multiplicative-xor"]["collision_rate"] > 0.3


def test_zipf_exponent_recovers_a_power_law():
    ranks = np.arange(1, 2001)
    assert zipf_exponent(np.round(1e6 * ranks ** -1.2).astype(np.int64)) == pytest.approx(1.2, abs=0.02)
    assert np.isnan(zipf_exponent(np.array([5, 1, 1])))


def test_coverage_rows():
    assert coverage_rows(np.array([50, 30, 10, 5, 5])) == {0.5: 1, 0.9: 3, 0.99: 5}
    assert coverage_rows(np.array([], np.int64)) == {0.5: 0, 0.9: 0, 0.99: 0}


def test_bad_input():
    with pytest.raises(InputError, match=r"each sequence must be 1-D token ids, got shape \(1, 2\)"):
        count_ngrams([np.array([[1, 2]])], SPEC, COMP)
    with pytest.raises(InputError, match=r"families holds 'crc'"):
        corpus_stats([np.array([1])], SPEC, COMP, families=["crc"])


def test_hot_row_plan_round_trip(tmp_path):
    stats = corpus_stats([np.random.default_rng(2).integers(0, 10, 500)], SPEC, COMP)
    plan = stats.hot_row_plan()
    path = tmp_path / "hot.npz"
    plan.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["hot.npz"]  # no temporary left behind
    back = HotRowPlan.load(path)
    assert back.spec == SPEC and back.tokens == 500 and back.compression_fingerprint == COMP.fingerprint
    for layer_id in SPEC.layer_ids:
        np.testing.assert_array_equal(back.rows[layer_id], stats.layer_rows[layer_id][0])
        np.testing.assert_array_equal(back.lookups[layer_id], stats.layer_rows[layer_id][1])
    top = back.top(0, fraction=0.1)
    assert top.size == round(0.1 * back.rows[0].size)
    np.testing.assert_array_equal(back.top(0, count=3), back.rows[0][:3])
    back.check_matches(SPEC, COMP)
    with pytest.raises(SpecMismatchError, match=r"counted for another spec \(seed=0 \(table: 1\)\)"):
        back.check_matches(SPEC.replace(seed=1), COMP)
    back.check_matches(SPEC.replace(dtype="int8"), COMP)          # same rows, another encoding
    with pytest.raises(SpecMismatchError, match="counted with another compression"):
        back.check_matches(SPEC, Compression.identity(9))
    with pytest.raises(InputError, match="exactly one of fraction= or count="):
        back.top(0)


def test_hot_row_plan_refuses_missing_and_damaged_files(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist: write one with `engram stats --hot-rows`"):
        HotRowPlan.load(tmp_path / "none.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CorruptTableError, match="is unreadable: it is not a .npz"):
        HotRowPlan.load(bad)


def _saved_plan(tmp_path):
    path = tmp_path / "hot.npz"
    corpus_stats([np.random.default_rng(2).integers(0, 10, 500)], SPEC, COMP).hot_row_plan().save(path)
    return path


def _rewrite(path, fields=None, **members):
    """Rewrite the archive at `path`: meta `fields` updated, members replaced (None: removed)."""
    with np.load(path) as z:
        arrays = {name: z[name] for name in z.files}
    if fields:
        arrays["meta"] = np.array(json.dumps({**json.loads(str(arrays["meta"])), **fields}))
    for name, value in members.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    np.savez(path, **arrays)


@pytest.mark.parametrize("changes, match", [
    (dict(meta=np.array("[1, 2]")), r"its meta is a JSON list, not an object"),
    (dict(meta=np.array("{not json")), r"is unreadable: Expecting property name"),
    (dict(meta=None), r"it has no 'meta' member"),
    (dict(fields={"format_version": 2}), r"has format_version=2; this engram reads version 1"),
    (dict(fields={"tokens": "500"}), r"its meta field 'tokens' is '500', expected an integer"),
    (dict(fields={"layer_ids": [0, 9]}), r"layer_ids holds 9, which is not a layer of its spec"),
    (dict(fields={"spec": {"max_ngram_size": 1}}), r"is unreadable: spec is missing required fields"),
    (dict(rows_3=None), r"it has no 'rows_3' member"),
    (dict(rows_0=np.zeros(4)), r"rows_0 is float64 of shape \(4,\), expected 1-D int64"),
    (dict(lookups_3=np.zeros((2, 2), np.int64)), r"lookups_3 is int64 of shape \(2, 2\), expected 1-D int64"),
    (dict(rows_0=np.array([0, 10**6])), r"rows_0 holds values outside \[0, \d+\)"),
    (dict(lookups_0=np.array([5, -1])), r"lookups_0 holds values outside >= 0"),
    (dict(lookups_0=np.array([5])), r"rows_0 and lookups_0 differ in length"),
])
def test_hot_row_plan_refuses_damaged_contents(tmp_path, changes, match):
    path = _saved_plan(tmp_path)
    _rewrite(path, **changes)
    with pytest.raises(CorruptTableError, match=rf"hot-row plan '.*hot\.npz' .*{match}"):
        HotRowPlan.load(path)


def test_hot_row_plan_refuses_truncated_and_altered_archives(tmp_path):
    path = _saved_plan(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptTableError, match="is unreadable: it is not a .npz"):
        HotRowPlan.load(path)
    altered = bytearray(data)
    start = data.index(b"\x93NUMPY", data.index(b"rows_0.npy"))     # the member's .npy header
    altered[start + 200] ^= 0xFF                                       # a byte of its rows
    path.write_bytes(bytes(altered))
    with pytest.raises(CorruptTableError, match=r"is unreadable: Bad CRC-32 for file 'rows_0.npy'"):
        HotRowPlan.load(path)


def test_tokenize_files_refuses_missing_and_damaged_inputs(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello world\n")
    bad = tmp_path / "tok.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=r"tokenizer file '.*tok\.json' cannot be loaded \(.*\): pass the"):
        tokenize_files([text], bad)
    with pytest.raises(MissingFileError, match=r"tokenizer file '.*none\.json' does not exist"):
        tokenize_files([text], tmp_path / "none.json")
    with pytest.raises(MissingFileError, match=r"corpus file '.*b\.txt' does not exist: pass paths of text"):
        tokenize_files([text, tmp_path / "b.txt"], bad)
    with pytest.raises(InputError, match=r"corpus file '.*' is a folder: pass the text files in it"):
        tokenize_files([tmp_path], bad)


def test_a_folder_is_not_a_hot_row_plan(tmp_path):
    from engram import InputError

    with pytest.raises(InputError, match=r"hot-row plan '.*' is a folder: pass the .npz file"):
        HotRowPlan.load(tmp_path)
