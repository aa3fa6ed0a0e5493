"""Every refusal of OffloadedRows is a typed error naming the value and the fix; damage is refused, never read."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import engram
from engram.making.sharding import shard_path, shard_table
from tests.offload.common import COMP, LAYERS, batch, cache_for, make_spec, make_table


@pytest.fixture
def made(tmp_path):
    table = make_table(tmp_path / "t.engram")
    rows = engram.OffloadedRows.create(table.path, tmp_path / "work", cache_bytes=cache_for(200, table.spec), lr=0.1)
    return table, rows


def test_a_cache_smaller_than_a_batch_names_the_size_needed(made, tmp_path):
    table, rows = made
    with pytest.raises(engram.InputError, match=r"cache_bytes=\d+ holds 200 rows, but \d+ more .* raise cache_bytes "
                                                r"to at least \d+"):
        rows.lookup(batch(0, (4, 30)), 1)
    rows.close()
    with pytest.raises(engram.InputError, match=r"cache_bytes=100 holds no row: .* needs cache_bytes >= \d+"):
        engram.OffloadedRows(tmp_path / "work", cache_bytes=100)
    with pytest.raises(engram.InputError, match=r"cache_bytes=0 is invalid: expected an int >= 1"):
        engram.OffloadedRows(tmp_path / "work", cache_bytes=0)


def test_a_prefetch_too_large_raises_from_its_handle_and_the_next_call(made):
    _, rows = made
    handle = rows.prefetch(batch(0, (4, 30)))
    with pytest.raises(engram.InputError, match="raise cache_bytes"):
        handle.result()
    with pytest.raises(engram.InputError, match="raise cache_bytes"):
        rows.lookup(batch(1), 1)
    rows.lookup(batch(1), 1)                        # raised once; the rows still work
    rows.close()


def test_a_workdir_of_another_table_is_refused(made, tmp_path):
    _, rows = made
    rows.close()
    other = make_spec(base=2500)
    with pytest.raises(engram.SpecMismatchError, match=r"holds the rows of another table \(engram_vocab_size="):
        engram.OffloadedRows(tmp_path / "work", cache_bytes=1 << 20, spec=other)
    with pytest.raises(engram.SpecMismatchError, match="another compression"):
        engram.OffloadedRows(tmp_path / "work", cache_bytes=1 << 20, compression=engram.Compression.identity(VOCAB2))
    with engram.OffloadedRows(tmp_path / "work", cache_bytes=1 << 20, spec=make_spec("int8"), compression=COMP) as ok:
        assert ok.steps == dict.fromkeys(LAYERS, 0)     # the row encoding aside, the same table


VOCAB2 = 301


def test_create_refuses_what_is_at_the_workdir_unless_overwrite(made, tmp_path):
    table, rows = made
    with pytest.raises(engram.InputError, match="is open already"):
        engram.OffloadedRows(tmp_path / "work", cache_bytes=1 << 20)
    with pytest.raises(engram.InputError, match="is open already"):
        engram.OffloadedRows.create(table.path, tmp_path / "work", cache_bytes=1 << 20, lr=0.1, overwrite=True)
    rows.close()
    with pytest.raises(engram.TableExistsError, match="holds a working copy already: reopen it"):
        engram.OffloadedRows.create(table.path, tmp_path / "work", cache_bytes=1 << 20, lr=0.1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(engram.TableExistsError, match="exists and is not a working copy"):
        engram.OffloadedRows.create(table.path, tmp_path / "other", cache_bytes=1 << 20, lr=0.1, overwrite=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    with engram.OffloadedRows.create(table.path, tmp_path / "work", cache_bytes=1 << 20, lr=0.3, overwrite=True) as new:
        assert new.settings.lr == 0.3


def test_bad_arguments_are_named(tmp_path):
    table = make_table(tmp_path / "t.engram")
    for kwargs, match in (({"lr": -1.0}, r"lr=-1.0 is invalid"), ({"lr": 0.1, "betas": (0.9, 1.0)}, r"betas=.*"),
                          ({"lr": 0.1, "dtype": "int8"}, r"dtype='int8' is not a working-copy row dtype"),
                          ({"lr": 0.1, "io_threads": 0}, r"io_threads=0 is invalid")):
        with pytest.raises(engram.InputError, match=match):
            engram.OffloadedRows.create(table.path, tmp_path / "w", cache_bytes=1 << 20, **kwargs)
    assert not (tmp_path / "w").exists()
    with pytest.raises(engram.TableNotFoundError):
        engram.OffloadedRows.create(tmp_path / "nowhere", tmp_path / "w", cache_bytes=1 << 20, lr=0.1)
    with pytest.raises(engram.MissingFileError, match="does not exist: make one with"):
        engram.OffloadedRows(tmp_path / "w", cache_bytes=1 << 20)


def test_a_part_of_a_sharded_table_is_refused_with_the_way_to_train_it(tmp_path):
    table = make_table(tmp_path / "t.engram")
    shard_table(table.path, table.path, 2)
    with pytest.raises(engram.InputError, match=r"is part 1 of 2 .* engram.distributed.ShardedRows\(part, offload="):
        engram.OffloadedRows.create(shard_path(table.path, 1, 2), tmp_path / "w", cache_bytes=1 << 20, lr=0.1)


def test_a_v41_release_folder_is_a_source(v41_release, tmp_path):
    release = v41_release()
    with engram.OffloadedRows.create(release.path, tmp_path / "w", cache_bytes=1 << 22, lr=0.1) as rows, \
            engram.open(release.path) as table:
        assert rows.rows_dtype == "float32" and rows.spec == table.spec
        ids = np.random.default_rng(0).integers(0, release.comp.vocab_size, (2, 7))
        with torch.no_grad():
            assert torch.equal(rows.lookup(ids, 14), table.lookup(ids, 14, dtype=torch.float32))


def test_snapshot_over_a_table_needs_overwrite(made, tmp_path):
    table, rows = made
    with pytest.raises(engram.TableExistsError, match="already exists: pass overwrite=True"):
        rows.snapshot(table.path)
    with pytest.raises(engram.InputError, match="dtype='int3' is not a row dtype"):
        rows.snapshot(tmp_path / "s.engram", dtype="int3")
    rows.snapshot(table.path, overwrite=True)             # replaced atomically
    rows.close()
    with pytest.raises(engram.InputError, match="is closed: open it again"):
        rows.lookup(batch(0), 1)


@pytest.mark.parametrize("damage, match", [
    ("state", r"state.json' \(the working copy's commit record\) is damaged \(its checksum does not match"),
    ("identity", r"offload.json' \(the working copy's identity\) is damaged"),
    ("rows", r"rows.bin' holds \d+ bytes, expected \d+"),
    ("undo", r"undo.log': the undo batch at byte 0 is damaged \(its contents do not match their digest\)"),
])
def test_a_damaged_working_copy_is_refused_naming_the_damage(made, tmp_path, damage, match):
    _, rows = made
    work = tmp_path / "work"
    for step in range(3):                               # rows written back: the undo log holds batches
        (rows.lookup(batch(step), 1) ** 2).sum().backward()
        rows.step()
    for step in range(3, 40):
        with torch.no_grad():
            rows.lookup(batch(step), 1)
    undo_bytes = os.path.getsize(work / "undo.log")
    rows.close(flush=False)
    if damage == "state":
        d = json.loads((work / "state.json").read_text())
        d["generation"] += 1
        (work / "state.json").write_text(json.dumps(d))
    elif damage == "identity":
        (work / "offload.json").write_text("{")
    elif damage == "rows":
        with open(work / "rows.bin", "ab") as f:
            f.write(b"x")
    else:
        assert undo_bytes > 200                         # two batches or more; spoil the first
        with open(work / "undo.log", "r+b") as f:
            f.seek(100)
            f.write(b"\xff" * 8)
    with pytest.raises(engram.CorruptTableError, match=match):
        engram.OffloadedRows(work, cache_bytes=1 << 20)
