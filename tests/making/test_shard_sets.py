"""Shard sets: `engram shard` publishes its parts with a manifest written last, parts carry the whole table's
id, and a split killed at any moment leaves the old set, the new set, or parts refused with a typed error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import engram
from engram.distributed.agreement import check_parts, describe_part
from engram.making.sharding import shard_path, shard_table
from engram.storage.shard_set import manifest_path

VOCAB = 300
SPEC = engram.TableSpec(engram_vocab_size=(1000, 1000), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=32,
                        layer_ids=(1, 2), compressed_vocab_size=VOCAB)
COMP = engram.Compression.identity(VOCAB)
REFUSED = (engram.ShardMismatchError, engram.CorruptTableError, engram.TableNotFoundError)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two tables of one spec (two trainings, say): only their ids and rows differ."""
    root = tmp_path_factory.mktemp("sets")
    for name, seed in (("A", 1), ("B", 2)):
        engram.build_table(root / name, SPEC, COMP, seed=seed).close()
    return root


def _stored(table, layer_id, rows):
    return table.stored_rows(layer_id, rows).values


def open_set(prefix, sources, parts=2) -> str:
    """Open every part and check them as ShardedTable does: the source whose rows they all hold ("A" or
    "B"), or "refused" for a typed refusal. A mix of both sources' rows fails the test."""
    tables = []
    try:
        try:
            tables = [engram.open(shard_path(prefix, r, parts)) for r in range(parts)]
            check_parts([describe_part(t, t.path) for t in tables])
        except REFUSED:
            return "refused"
        held = set()
        for t in tables:
            for name in ("A", "B"):
                with engram.open(sources / name) as src:
                    spans = {lid: np.arange(*t.shard.ranges[lid]) for lid in SPEC.layer_ids}
                    if all(np.array_equal(_stored(t, i, rows), _stored(src, i, rows)) for i, rows in spans.items()):
                        held.add(name)
        assert len(held) == 1, f"the parts hold rows of {held or 'neither source'}"
        return held.pop()
    finally:
        for t in tables:
            t.close()


def test_a_split_writes_a_manifest_naming_every_part_and_the_source_id(sources, tmp_path):
    paths = shard_table(sources / "A", tmp_path / "s", 2)
    doc = json.loads(manifest_path(tmp_path / "s", 2).read_text())
    table_id = engram.open(sources / "A").table_id
    assert doc["table_id"] == table_id and doc["parts"] == 2
    assert [m["name"] for m in doc["members"]] == [p.name for p in paths]
    assert open_set(tmp_path / "s", sources) == "A"


def test_a_part_of_another_table_is_refused_by_open_and_by_the_ranks_check(sources, tmp_path):
    shard_table(sources / "A", tmp_path / "a", 2)
    shard_table(sources / "B", tmp_path / "b", 2)
    ids = {n: engram.open(sources / n).table_id for n in "AB"}
    foreign = shard_path(tmp_path / "a", 1, 2)
    shutil.rmtree(foreign)
    shutil.copytree(shard_path(tmp_path / "b", 1, 2), foreign)         # A-1-of-2 replaced by B's part 1
    with pytest.raises(engram.ShardMismatchError, match=rf"part .*a-1-of-2' \(part 1 of 2 .*table id {ids['B']}.* is "
                                                        rf"not the part that the shard set manifest .*a-set-of-2.json' "
                                                        rf"published \(table id {ids['A']}"):
        engram.open(foreign)
    os.unlink(manifest_path(tmp_path / "a", 2))        # no manifest (parts copied elsewhere): the ranks' check
    with engram.open(shard_path(tmp_path / "a", 0, 2)) as p0, engram.open(foreign) as p1:
        match = rf"parts of different tables .*rank 0: .*a-0-of-2' \(table id {ids['A']}\); rank 1: .*a-1-of-2' " \
                rf"\(table id {ids['B']}"
        with pytest.raises(engram.ShardMismatchError, match=match):
            check_parts([describe_part(p0, p0.path), describe_part(p1, p1.path)])


def test_a_linked_fifo_or_loose_json_manifest_is_refused_with_a_typed_error(sources, tmp_path):
    shard_table(sources / "A", tmp_path / "a", 2)
    manifest = manifest_path(tmp_path / "a", 2)
    good = manifest.read_text()
    part = shard_path(tmp_path / "a", 0, 2)
    os.replace(manifest, tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", manifest)              # the same manifest, through a link
    with pytest.raises(engram.CorruptTableError, match=r"shard set manifest .*a-set-of-2.json' cannot be opened "
                                                       r"\(.*; a symbolic link is refused\)"):
        engram.open(part)
    os.unlink(manifest)
    os.mkfifo(manifest)                                            # would block a blocking open forever
    with pytest.raises(engram.CorruptTableError, match=r"a-set-of-2.json' is not a regular file"):
        engram.open(part)
    os.unlink(manifest)
    manifest.write_text(good[:-1] + ', "parts": 2}')               # a key twice: read two ways by two readers
    with pytest.raises(engram.CorruptTableError, match=r"a-set-of-2.json' is ambiguous JSON"):
        engram.open(part)
    manifest.write_text(good)
    engram.open(part).close()


def test_parts_built_alone_combine_and_parts_without_ids_combine_only_with_each_other(sources, tmp_path):
    built = [engram.build_table(tmp_path / f"b-{r}-of-2", SPEC, COMP, seed=1, shard=(r, 2)) for r in range(2)]
    assert len(check_parts([describe_part(t, t.path) for t in built])) == 2
    other = engram.build_table(tmp_path / "c-1-of-2", SPEC, COMP, seed=2, shard=(1, 2))
    with pytest.raises(engram.ShardMismatchError, match="parts of different tables"):
        check_parts([describe_part(built[0], built[0].path), describe_part(other, other.path)])
    old = [{**describe_part(t, t.path), "table_id": None} for t in built]       # as written before ids
    assert len(check_parts(old)) == 2
    with pytest.raises(engram.ShardMismatchError, match=r"table id none: written before ids"):
        check_parts([old[0], describe_part(built[1], built[1].path)])
    for t in (*built, other):
        t.close()


# A helper process that imports engram once and forks a child per split: the child dies of SIGKILL at
# a chosen step of publishing ("at": 0 and 1 before publishing part 0 and part 1, 2 before the manifest)
# or after a chosen delay ("after"), running `engram shard --overwrite` (the command's main). The helper
# runs no torch work itself, so each child starts clean; it prints how each child ended.
_FORKER = """
import os, signal, sys, time
from engram.cli import main
import engram.making.sharding as sharding

def dies_at(at, real, step):
    def call(*args, **kwargs):
        if step[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        step[0] += 1
        return real(*args, **kwargs)
    return call

for line in sys.stdin:
    how, value, src, prefix = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            if how == "at":
                step = [0]
                sharding.publish_table = dies_at(int(value), sharding.publish_table, step)
                sharding.write_manifest = dies_at(int(value), sharding.write_manifest, step)
            main(["shard", src, prefix, "--parts", "2", "--overwrite"])
        finally:
            os._exit(0)
    start = time.perf_counter()
    done, status = os.waitpid(pid, os.WNOHANG)
    while not done and how == "after" and time.perf_counter() - start < float(value):
        time.sleep(0.002)
        done, status = os.waitpid(pid, os.WNOHANG)
    if not done:
        if how == "after":
            os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status),
          time.perf_counter() - start, flush=True)
"""


@pytest.fixture(scope="module")
def forker():
    proc = subprocess.Popen([sys.executable, "-c", _FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def split(how: str, value: float, src, prefix) -> tuple[int, float]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{how} {value} {src} {prefix}\n")
        proc.stdin.flush()
        status, seconds = proc.stdout.readline().split()
        return int(status), float(seconds)

    yield split
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(timeout=60)
    proc.stdout.close()


@pytest.mark.parametrize("at, expected", [(0, "A"), (1, "refused"), (2, "refused")])
def test_a_split_killed_at_each_step_of_publishing_leaves_old_new_or_refused(sources, tmp_path, forker, at, expected):
    prefix = tmp_path / "s"
    shard_table(sources / "A", prefix, 2)
    assert forker("at", at, sources / "B", prefix)[0] == -signal.SIGKILL
    assert open_set(prefix, sources) == expected
    if at == 1:                                    # part 0 is B's, part 1 still A's: each refused where it must be
        with pytest.raises(engram.ShardMismatchError, match="is not the part that the shard set manifest"):
            engram.open(shard_path(prefix, 0, 2))
        engram.open(shard_path(prefix, 1, 2)).close()
    shard_table(sources / "B", prefix, 2, overwrite=True)        # split again: the new set, whole
    assert open_set(prefix, sources) == "B"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_kill_9_at_random_moments_of_engram_shard_overwrite_never_serves_a_mix(sources, tmp_path, forker):
    prefix = tmp_path / "s"
    shard_table(sources / "A", prefix, 2)
    status, whole = forker("after", 1000, sources / "B", prefix)         # not killed: how long a split takes
    assert status == 0 and open_set(prefix, sources) == "B"
    rng = np.random.default_rng(0)
    seen = []
    for trial in range(8):                           # from early in the work to past its end
        forker("after", float(rng.uniform(0.3, 1.2)) * whole, sources / "AB"[trial % 2], prefix)
        seen.append(open_set(prefix, sources))       # A, B or refused: never a mix (open_set fails on one)
    assert forker("after", 1000, sources / "A", prefix)[0] == 0
    assert open_set(prefix, sources) == "A", seen
