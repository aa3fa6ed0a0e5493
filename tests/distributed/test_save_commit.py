"""ShardedRows saves commit once every rank's file is in: a save interrupted between ranks never loads as a mix.

The record and file checks run without a process group (`committed_files` on files written here); one
two-rank gloo run covers the real failure: rank 1 dies before its save of step 2, rank 0's save then
fails without committing, and loading refuses the incomplete save (naming ranks and steps) or, asked
to fall back, loads step 1.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import engram
from engram.distributed.commit import committed_files, record_path, save_folder, write_record
from engram.making.sharding import shard_path, shard_table

VOCAB = 200
SPEC = engram.TableSpec(engram_vocab_size=(1000, 1000), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=16,
                        layer_ids=(1, 4), compressed_vocab_size=VOCAB)


# ------------------------------------------------------------------------------------------
# records and files, without a process group
# ------------------------------------------------------------------------------------------
def _file(path: Path, save_id: str, rank: int, steps: int, world: int = 2) -> str:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"save_id": save_id, "rank": rank, "world": world, "steps": [[1, steps], [4, steps]]}
    save_file({"x": torch.zeros(1)}, os.fspath(path), metadata={"engram": json.dumps(meta)})
    return f"{path.parent.name}/{path.name}"


def _save(prefix: Path, save_id: str, steps: int, ranks=(0, 1), commit: bool = True) -> None:
    files = [_file(save_folder(prefix, save_id) / f"rank-{r}-of-2.safetensors", save_id, r, steps) for r in ranks]
    if commit:
        write_record(prefix, {"save_id": save_id, "world": 2, "steps": [[1, steps], [4, steps]], "table_id": None,
                              "files": files})


def test_an_interrupted_later_save_is_refused_naming_ranks_and_steps_unless_falling_back(tmp_path):
    prefix = tmp_path / "rows"
    _save(prefix, "run-1", steps=1)
    _save(prefix, "run-2", steps=2, ranks=(0,), commit=False)      # rank 1 died before its file of step 2
    match = (r"the last save at prefix=.* is incomplete: save run-2: rank 0 of 2 wrote its file \(at steps \{1: 2, "
             r"4: 2\}\), rank 1 did not: .* The last complete save is run-1 \(2 ranks at steps \{1: 1, 4: 1\}\): "
             r"pass fallback=True")
    with pytest.raises(engram.IncompleteSaveError, match=match):
        committed_files(prefix, fallback=False)
    files = committed_files(prefix, fallback=True)
    assert [m["save_id"] for _, m in files] == ["run-1", "run-1"] and [m["rank"] for _, m in files] == [0, 1]


def test_a_record_whose_files_belong_to_another_save_is_refused_as_mixed(tmp_path):
    prefix = tmp_path / "rows"
    _save(prefix, "run-1", steps=1)
    _file(save_folder(prefix, "run-1") / "rank-1-of-2.safetensors", "run-0", 1, steps=0)   # rank 1's file replaced
    with pytest.raises(engram.IncompleteSaveError, match=r"is mixed: rank 1's file .* holds save run-0 at steps "
                                                         r"\{1: 0, 4: 0\}, but the record names save run-1 at steps "
                                                         r"\{1: 1, 4: 1\}"):
        committed_files(prefix, fallback=True)
    os.unlink(save_folder(prefix, "run-1") / "rank-1-of-2.safetensors")
    with pytest.raises(engram.IncompleteSaveError, match=r"the committed save run-1 .* lacks rank 1's file"):
        committed_files(prefix, fallback=True)


def test_no_committed_save_and_a_damaged_record_are_refused(tmp_path):
    prefix = tmp_path / "rows"
    _save(prefix, "run-1", steps=1, ranks=(1,), commit=False)
    with pytest.raises(engram.IncompleteSaveError, match=r"has no complete save: save run-1: rank 1 of 2 wrote its "
                                                         r"file .*, rank 0 did not: every save there was interrupted"):
        committed_files(prefix, fallback=True)
    record_path(prefix).write_text('{"engram_rows_save": 1, "save_id": "x", "world": 1, "files": ["../../etc/x"]}')
    with pytest.raises(engram.CorruptTableError, match=r"save record .*rows.json' is damaged"):
        committed_files(prefix, fallback=True)
    with pytest.raises(engram.MissingFileError, match=r"has no complete save"):
        committed_files(tmp_path / "nothing", fallback=True)


def test_a_linked_fifo_or_loose_json_record_is_refused_with_a_typed_error(tmp_path):
    prefix = tmp_path / "rows"
    _save(prefix, "run-1", steps=1)
    record = record_path(prefix)
    good = record.read_text()
    os.replace(record, tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", record)                # the same record, through a link
    with pytest.raises(engram.CorruptTableError, match=r"save record .*rows.json' cannot be opened \(.*; a "
                                                       r"symbolic link is refused\)"):
        committed_files(prefix, fallback=True)
    os.unlink(record)
    os.mkfifo(record)                                              # would block a blocking open forever
    with pytest.raises(engram.CorruptTableError, match=r"save record .*rows.json' is not a regular file"):
        committed_files(prefix, fallback=True)
    os.unlink(record)
    record.write_text(good[:-1] + ', "world": 2}')                 # a key twice: read two ways by two readers
    with pytest.raises(engram.CorruptTableError, match=r"save record .*rows.json' is ambiguous JSON"):
        committed_files(prefix, fallback=True)
    record.write_text(good)
    assert len(committed_files(prefix, fallback=True)) == 2


def test_saves_written_before_records_load_only_at_one_step(tmp_path):
    prefix = tmp_path / "old"
    for r, steps in ((0, 2), (1, 1)):                   # rank 0 replaced its file at step 2, rank 1 did not
        _file(tmp_path / f"old-{r}-of-2.safetensors", "", r, steps)
    with pytest.raises(engram.IncompleteSaveError, match=r"are not one save: rank 0 at steps \{1: 2, 4: 2\}; rank 1 "
                                                         r"at steps \{1: 1, 4: 1\}: a save was interrupted"):
        committed_files(prefix, fallback=True)
    _file(tmp_path / "old-1-of-2.safetensors", "", 1, 2)
    assert len(committed_files(prefix, fallback=False)) == 2


# ------------------------------------------------------------------------------------------
# two ranks: rank 1 dies before its save of step 2
# ------------------------------------------------------------------------------------------
TIMEOUT = datetime.timedelta(seconds=20)


def _train_step(rows, rank: int, step: int) -> None:
    ids = np.random.default_rng([rank, step]).integers(0, VOCAB, (2, 5))
    (rows.lookup(ids, 1) ** 2).sum().backward()
    rows.step()


def _rank_main(rank: int, port: int, root: str) -> None:
    import torch.distributed as dist

    from engram.distributed import ShardedRows

    torch.set_num_threads(1)
    root_path, out = Path(root), {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=TIMEOUT)
        rows = ShardedRows(shard_path(root_path / "full", rank, 2), lr=1e-2, timeout=TIMEOUT)
        _train_step(rows, rank, 0)
        rows.save(root_path / "ckpt" / "rows")                                   # step 1, committed
        torch.save({lid: rows.local[lid].detach().clone() for lid in (1, 4)}, root_path / f"step1-{rank}.pt")
        _train_step(rows, rank, 1)
        if rank == 1:
            os._exit(0)                                                          # dies before its save of step 2
        try:
            rows.save(root_path / "ckpt" / "rows")
            out["save2"] = "committed"
        except Exception as exc:                                                 # the group lost rank 1
            out["save2"] = type(exc).__name__
        out["steps2"] = rows.steps
        dist.destroy_process_group()
        dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=0, world_size=1)
        try:
            ShardedRows.load(root_path / "ckpt" / "rows", timeout=TIMEOUT)
            out["load"] = "loaded"
        except engram.IncompleteSaveError as exc:
            out["load"] = str(exc)
        loaded = ShardedRows.load(root_path / "ckpt" / "rows", fallback=True, timeout=TIMEOUT)
        expect = [torch.load(root_path / f"step1-{r}.pt") for r in range(2)]
        out["fallback_steps"] = loaded.steps
        out["fallback_rows_equal"] = all(torch.equal(loaded.local[lid].detach(), torch.cat([e[lid] for e in expect]))
                                         for lid in (1, 4))
        dist.destroy_process_group()
    except Exception:
        out["error"] = traceback.format_exc()
    Path(root, f"out-{rank}.json").write_text(json.dumps(out))


def test_a_rank_dying_before_its_save_leaves_the_last_save_loadable_only_by_falling_back(tmp_path):
    import torch.multiprocessing as mp

    full = engram.build_table(tmp_path / "full", SPEC, engram.Compression.identity(VOCAB), seed=0)
    shard_table(full, tmp_path / "full", 2)
    full.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank_main, args=(port, os.fspath(tmp_path)), nprocs=2, join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=180)
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
    out = json.loads((tmp_path / "out-0.json").read_text())
    assert "error" not in out, out.get("error")
    assert out["save2"] != "committed" and out["steps2"] == {"1": 2, "4": 0}          # layer 1 trained only
    assert "the last save at prefix=" in out["load"] and "rank 0 of 2 wrote its file (at steps {1: 2, 4: 0}), " \
        "rank 1 did not" in out["load"] and "(2 ranks at steps {1: 1, 4: 0}): pass fallback=True" in out["load"]
    assert out["fallback_steps"] == {"1": 1, "4": 0} and out["fallback_rows_equal"]
