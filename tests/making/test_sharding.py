"""Shards of a table: balanced row ranges, `shard_table` / `engram shard`, `build_table(shard=)` /
`engram build --shard`, and the range each part records and `engram.open` reports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import engram
from engram.cli import main
from engram.making.sharding import shard_path, shard_table
from engram.storage.format import METADATA_CHECKSUM, metadata_checksum
from engram.storage.shards import check_ranges, parse_shard, plan_shards

VOCAB = 1000
SPEC = dict(engram_vocab_size=(3000, 3000), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=64,
            layer_ids=(1, 4), compressed_vocab_size=VOCAB)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    engram.build_table(root / "full", engram.TableSpec(**SPEC), engram.Compression.identity(VOCAB), seed=3).close()
    shard_table(root / "full", root / "full", 4)
    return root / "full"


def _stored(table, layer_id, rows):
    q = table.stored_rows(layer_id, rows)
    return q.values, q.scales


def test_shard_ranges_are_balanced_and_stored_with_each_part(full):
    spec = engram.TableSpec(**SPEC)
    parts = [engram.open(shard_path(full, r, 4)) for r in range(4)]
    assert [p.shard for p in parts] == plan_shards(spec, 4) and check_ranges(spec, plan_shards(spec, 4)) is None
    for lid in spec.layer_ids:
        sizes = [p.shard.rows(lid) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == spec.rows(lid)
    with engram.open(full) as whole, parts[2] as part:
        lo, hi = part.shard.ranges[4]
        assert part.format_version == 3 and "part 2 of 4" in repr(part) and whole.shard is None
        assert torch.equal(part.rows(4, [lo, hi - 1]), whole.rows(4, [lo, hi - 1]))
        with pytest.raises(engram.InputError, match=r"part 2 of 4 .* engram.distributed.ShardedTable"):
            part.lookup(np.zeros((1, 2), np.int64), 4)
        with pytest.raises(engram.InputError, match=rf"outside \[{lo}, {hi}\)"):
            part.rows(4, [hi])
    for p in parts:
        p.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3", "int8"])
def test_parts_split_or_built_hold_the_whole_tables_stored_bytes(tmp_path, dtype):
    spec, comp = engram.TableSpec(**{**SPEC, "dtype": dtype}), engram.Compression.identity(VOCAB)
    whole = engram.build_table(tmp_path / "whole", spec, comp, seed=5)
    paths = shard_table(whole, tmp_path / "p", 3)
    for r, path in enumerate(paths):
        with engram.open(path) as part, engram.build_table(tmp_path / f"b{r}", spec, comp, seed=5, shard=(r, 3)) as b:
            part.verify()
            for lid in spec.layer_ids:
                rows = np.arange(*part.shard.ranges[lid])
                for got in (_stored(part, lid, rows), _stored(b, lid, rows)):
                    for a, e in zip(got, _stored(whole, lid, rows), strict=True):
                        assert (a is None and e is None) or np.array_equal(a, e)
    whole.close()


def test_bad_parts_are_refused(full, tmp_path):
    spec = engram.TableSpec(**SPEC)
    with pytest.raises(engram.InputError, match=r"parts=0 is invalid: expected an int from 1 to 12054"):
        plan_shards(spec, 0)
    with pytest.raises(engram.InputError, match=r"shard='2/2' is invalid: expected RANK/PARTS"):
        parse_shard("2/2")
    with pytest.raises(engram.InputError, match=r"shard=\(1, 1\) is invalid"):
        engram.build_table(tmp_path / "x", spec, engram.Compression.identity(VOCAB), shard=(1, 1))
    with pytest.raises(engram.InputError, match=r"already part 0 of 4 \(.*\) of a sharded table: split the whole"):
        shard_table(shard_path(full, 0, 4), tmp_path / "again", 2)
    assert not list(tmp_path.iterdir())


def _edit_attributes(path, edit) -> None:
    """Edit a part's metadata and reseal its checksum (as a deliberate editor would), so the
    shard checks themselves are what refuse it."""
    doc = json.loads((path / "zarr.json").read_text())
    attrs = doc["attributes"]["engram"]
    edit(attrs)
    attrs[METADATA_CHECKSUM] = metadata_checksum(attrs)
    (path / "zarr.json").chmod(0o644)
    (path / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("edit, match", [
    (lambda a: a.pop("shard"), "format_version=3 without a shard range"),
    (lambda a: a.update(format_version=1), "format_version=1 with a shard range"),
    (lambda a: a["shard"]["ranges"][0].__setitem__(2, 10**9), r"invalid shard range .* not inside a layer"),
    (lambda a: a["shard"].update(rank=4), r"invalid shard range \(shard rank=4 of parts=4"),
    (lambda a: a["shard"]["ranges"][0].__setitem__(1, 1), r"array 'layer_1' has shape=\[\d+, 32\], expected"),
])
def test_damaged_shard_metadata_is_refused(full, tmp_path, edit, match):
    part = tmp_path / "part"
    shutil.copytree(shard_path(full, 1, 4), part)
    _edit_attributes(part, edit)
    with pytest.raises(engram.CorruptTableError, match=match):
        engram.open(part)


def test_cli_shard_build_shard_and_inspect(full, tmp_path, capsys):
    prefix = tmp_path / "cli"
    assert main(["shard", str(full), str(prefix), "--parts", "2", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [p["ranges"]["1"] for p in plan["parts"]] == [[0, 6027], [6027, 12054]] and not list(tmp_path.iterdir())
    assert main(["shard", str(full), str(prefix), "--parts", "2"]) == 0
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({k: v for k, v in SPEC.items() if k != "compressed_vocab_size"}))
    built = tmp_path / "built"
    assert main(["build", str(built), "--spec", str(spec_file), "--vocab-size", str(VOCAB), "--seed", "3",
                 "--shard", "1/2"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(built), "--json", "--sample-rows", "4"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == 3 and info["shard"]["rank"] == 1 and info["layers"]["1"]["rows"] == 6027
    with engram.open(built) as b, engram.open(shard_path(prefix, 1, 2)) as p:
        rows = np.arange(*b.shard.ranges[4])
        assert b.shard == p.shard and torch.equal(b.rows(4, rows), p.rows(4, rows))
    assert main(["build", str(tmp_path / "y"), "--spec", str(spec_file), "--vocab-size", "10", "--shard", "2/2"]) == 2
    assert "'2/2' is invalid: pass RANK/PARTS" in capsys.readouterr().err
    assert main(["bench", str(built)]) == 3
    assert "part 1 of 2" in capsys.readouterr().err


def test_a_part_is_not_converted_alone(full, tmp_path, capsys):
    with pytest.raises(engram.InputError, match=r"part 1 of 4 .* convert the whole table, then split it again"):
        engram.convert(shard_path(full, 1, 4), tmp_path / "int8", dtype="int8")
    assert main(["convert", str(shard_path(full, 1, 4)), str(tmp_path / "int8"), "--dtype", "int8", "--dry-run"]) == 3
    assert "convert the whole table" in capsys.readouterr().err and not list(tmp_path.iterdir())
