"""Table identity: an id fixed when a table is written, under the metadata checksum; what the checksum covers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import engram
from engram.making.sharding import shard_table
from engram.storage.format import METADATA_CHECKSUM, metadata_checksum
from engram.storage.identity import is_table_id

VOCAB = 300
SPEC = engram.TableSpec(engram_vocab_size=(1000, 1000), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=32,
                        layer_ids=(1, 2), compressed_vocab_size=VOCAB)
COMP = engram.Compression.identity(VOCAB)


def _attrs(path):
    return json.loads((path / "zarr.json").read_text())["attributes"]["engram"]


def _edit(path, edit, reseal: bool) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    attrs = doc["attributes"]["engram"]
    edit(attrs)
    if reseal:
        attrs[METADATA_CHECKSUM] = metadata_checksum(attrs)
    (path / "zarr.json").chmod(0o644)
    (path / "zarr.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    path = tmp_path_factory.mktemp("identity") / "t.engram"
    engram.build_table(path, SPEC, COMP, seed=1).close()
    return path


def test_every_table_records_an_id_that_opens_with_it(seeded):
    with engram.open(seeded) as t:
        assert is_table_id(t.table_id) and t.source_id is None
        assert _attrs(seeded)["table_id"] == t.table_id


def test_seeded_builds_derive_their_id_from_the_recipe_and_others_get_a_new_one(seeded, tmp_path):
    first = engram.open(seeded).table_id
    with engram.build_table(tmp_path / "again", SPEC, COMP, seed=1, chunk_rows=2048) as again, \
            engram.build_table(tmp_path / "seed2", SPEC, COMP, seed=2) as other, \
            engram.build_table(tmp_path / "zeros", SPEC, COMP, init="zeros", seed=1) as zeros:
        assert again.table_id == first                       # the same rows: the same table
        assert len({first, other.table_id, zeros.table_id}) == 3
    weights = {1: np.zeros((SPEC.rows(1), SPEC.head_dim), np.float32)}
    ids = {engram.build_table(tmp_path / f"w{i}", SPEC, COMP, weights=weights).table_id for i in range(2)}
    assert len(ids) == 2 and all(map(is_table_id, ids))     # trained rows: a new id each time
    given = "0123456789abcdef" * 2
    assert engram.build_table(tmp_path / "given", SPEC, COMP, weights=weights, table_id=given).table_id == given


def test_bad_ids_and_parts_from_weights_without_one_are_refused(tmp_path):
    with pytest.raises(engram.InputError, match=r"table_id='XYZ' is invalid: expected 32 lowercase hex digits"):
        engram.build_table(tmp_path / "a", SPEC, COMP, table_id="XYZ")
    weights = {1: np.zeros((SPEC.rows(1), SPEC.head_dim), np.float32)}
    with pytest.raises(engram.InputError, match=r"shard=\(0, 2\) with weights= needs table_id="):
        engram.build_table(tmp_path / "b", SPEC, COMP, weights=weights, shard=(0, 2))
    assert not list(tmp_path.iterdir())


def test_convert_gives_a_new_id_linked_to_its_source(seeded, tmp_path):
    engram.convert(seeded, tmp_path / "c", dtype="int8", sample_rows=0)
    with engram.open(seeded) as src, engram.open(tmp_path / "c") as dst:
        assert is_table_id(dst.table_id) and dst.table_id != src.table_id and dst.source_id == src.table_id


def test_parts_of_a_split_and_parts_built_alone_name_the_whole_tables_id(seeded, tmp_path):
    whole = engram.open(seeded).table_id
    for path in shard_table(seeded, tmp_path / "s", 2):
        assert engram.open(path).table_id == whole
    for r in range(2):
        assert engram.build_table(tmp_path / f"b{r}", SPEC, COMP, seed=1, shard=(r, 2)).table_id == whole


@pytest.mark.parametrize("edit, what", [
    (lambda a: a.update(table_id="f" * 32), "table_id"),
    (lambda a: a.update(source_id="e" * 32), "source_id"),
    (lambda a: a.update(format_version=2), "format_version"),
    (lambda a: a["shard"].update(rank=1), "shard rank"),
    (lambda a: a["shard"].update(parts=3), "shard parts"),
])
def test_the_metadata_checksum_covers_the_id_the_version_and_the_shard_range(seeded, tmp_path, edit, what):
    """An edit left unsealed is refused: the checksum covers every field, not only the spec."""
    part = shard_table(seeded, tmp_path / "p", 2)[0]
    edited = tmp_path / "edited"
    shutil.copytree(part, edited)
    _edit(edited, edit, reseal=False)
    with pytest.raises(engram.CorruptTableError, match=r"has metadata with xxh3 \w+, recorded '\w+': zarr.json was "
                                                       "edited or damaged"):
        engram.open(edited)


def test_a_malformed_id_is_refused_and_a_table_without_ids_still_opens(seeded, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(seeded, bad)
    _edit(bad, lambda a: a.update(table_id="not-hex"), reseal=True)
    with pytest.raises(engram.CorruptTableError, match=r"has table_id='not-hex', not 32 lowercase hex digits"):
        engram.open(bad)
    old = tmp_path / "old"                            # as written before ids (and before the checksum)
    shutil.copytree(seeded, old)
    _edit(old, lambda a: (a.pop("table_id"), a.pop(METADATA_CHECKSUM)), reseal=False)
    with engram.open(old) as t, engram.open(seeded) as ref:
        assert t.table_id is None
        ids = np.arange(12).reshape(2, 6)
        assert np.array_equal(t.lookup(ids, 1).numpy(), ref.lookup(ids, 1).numpy())
        t.verify(progress=False)
