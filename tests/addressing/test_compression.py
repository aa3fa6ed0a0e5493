from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import engram
from engram import Compression, SpecError, TokenIdError

GOLDEN = Path(__file__).parents[1] / "golden"


def test_tokenizer_file_matches_reference_id_for_id():
    expected = json.loads((GOLDEN / "bpe_bytelevel_4k.compression.json").read_text())
    comp = Compression.from_tokenizer_file(GOLDEN / "bpe_bytelevel_4k.tokenizer.json")
    assert comp.vocab_size == expected["vocab_size"] == 4000
    assert comp.compressed_vocab_size == expected["compressed_vocab_size"] == 2693
    np.testing.assert_array_equal(comp.lookup, np.array(expected["lookup"]))


def test_shipped_tokenizer_is_the_golden_one():
    shipped = Path(engram.__file__).parent / "data" / "bpe_bytelevel_4k.tokenizer.json"
    assert shipped.read_bytes() == (GOLDEN / "bpe_bytelevel_4k.tokenizer.json").read_bytes()


def test_missing_tokenizer_file():
    with pytest.raises(engram.MissingFileError, match="tokenizer file 'nope.json' does not exist: pass the"):
        Compression.from_tokenizer_file("nope.json")


@pytest.mark.parametrize("content, match", [
    ("{not json", r"cannot be loaded \(.*line 1.*\): pass the tokenizer.json"),
    ('{"model": 1}', r"cannot be loaded \(.*\): pass the tokenizer.json"),
    (None, r"is a folder: pass the tokenizer.json"),
])
def test_damaged_tokenizer_file_is_an_input_error(tmp_path, content, match):
    path = tmp_path / "tok.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.raises(engram.InputError, match=rf"tokenizer file '.*tok\.json' {match}"):
        Compression.from_tokenizer_file(path)


def test_identity_and_lookup():
    comp = Compression.identity(5)
    assert (comp.vocab_size, comp.compressed_vocab_size) == (5, 5)
    np.testing.assert_array_equal(comp(np.array([[4, 0]])), [[4, 0]])
    comp = Compression([0, 1, 1, 2, 0])
    assert (comp.vocab_size, comp.compressed_vocab_size) == (5, 3)
    assert comp.lookup.dtype == np.int64 and not comp.lookup.flags.writeable
    assert comp == Compression(np.array([0, 1, 1, 2, 0], dtype=np.int32))
    assert comp != Compression.identity(5)
    assert comp.fingerprint == Compression([0, 1, 1, 2, 0]).fingerprint != Compression.identity(5).fingerprint


@pytest.mark.parametrize(
    "lookup, message",
    [
        ([], r"non-empty 1-D integer array, got dtype=float64 shape=\(0,\)"),
        ([[0, 1]], r"non-empty 1-D integer array, got dtype=int64 shape=\(1, 2\)"),
        ([0.5, 1.0], "integer array, got dtype=float64"),
        ([0, -1], "negative compressed id -1"),
        ([0, 2], r"compressed ids must be 0..2 without gaps, but only 2 distinct ids are used"),
    ],
)
def test_bad_lookup(lookup, message):
    with pytest.raises(SpecError, match=message):
        Compression(lookup)


def test_bad_identity_size():
    with pytest.raises(SpecError, match="vocab_size=0 is invalid: expected an int >= 1"):
        Compression.identity(0)


def test_numpy_and_torch_keep_their_kind_and_shape():
    comp = Compression([2, 0, 1, 1])
    ids = np.array([[3, 0], [1, 2]], dtype=np.int32)
    out = comp(ids)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64
    np.testing.assert_array_equal(out, [[1, 2], [0, 1]])
    tout = comp(torch.from_numpy(ids))
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.int64
    assert tout.tolist() == [[1, 2], [0, 1]]
    assert comp(torch.tensor([3])).tolist() == [1]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("bad", [-1, 4, 1 << 40])
def test_ids_out_of_range_are_refused(kind, bad):
    # The reference passes negative ids through and crashes on large ones; engram refuses both.
    comp = Compression.identity(4)
    ids = np.array([[0, bad]])
    ids = torch.from_numpy(ids) if kind == "torch" else ids
    with pytest.raises(TokenIdError, match=rf"token_ids holds id {bad}, outside \[0, 4\) for this compression"):
        comp(ids)


@pytest.mark.parametrize("ids", [np.array([0.0, 1.0]), torch.tensor([0.0]), np.array([True])])
def test_non_integer_ids_are_refused(ids):
    with pytest.raises(engram.InputError, match="token_ids must be integers"):
        Compression.identity(4)(ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_cuda_ids_stay_on_device():
    comp = Compression([2, 0, 1, 1])
    out = comp(torch.tensor([[3, 0]], device="cuda"))
    assert out.device.type == "cuda" and out.tolist() == [[1, 2]]
