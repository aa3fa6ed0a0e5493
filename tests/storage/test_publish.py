"""Publishing over an existing table where the filesystem cannot swap directories in one step."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engram.storage import publish

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_exchange(monkeypatch):
    monkeypatch.setattr(publish, "_exchange", lambda a, b: False)


def make_table(path: Path, text: str) -> None:
    path.mkdir()
    (path / "zarr.json").write_text(text)


def failing_rename(monkeypatch, fails):
    """os.rename that raises EIO for the (src, dst) pairs `fails(src, dst)` picks."""
    real = os.rename

    def rename(src, dst):
        if fails(Path(src), Path(dst)):
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def test_replace_by_renames(tmp_path, no_exchange):
    target = tmp_path / "t"
    make_table(target, "old")
    with publish.partial_dir(target) as new:
        (new / "zarr.json").write_text("new")
        publish.publish(new, target, overwrite=True)
    assert (target / "zarr.json").read_text() == "new"
    assert os.listdir(tmp_path) == ["t"]


def test_old_table_is_restored_when_the_new_one_cannot_be_renamed_in(tmp_path, no_exchange, monkeypatch):
    target = tmp_path / "t"
    make_table(target, "old")
    failing_rename(monkeypatch, lambda src, dst: dst == target and src.name != "old")
    with pytest.raises(OSError, match="Input/output error"):
        with publish.partial_dir(target) as new:
            (new / "zarr.json").write_text("new")
            publish.publish(new, target, overwrite=True)
    assert (target / "zarr.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["t"]          # no aside, no partial left behind


def test_old_table_that_cannot_be_moved_back_is_kept_and_named(tmp_path, no_exchange, monkeypatch):
    target = tmp_path / "t"
    make_table(target, "old")
    failing_rename(monkeypatch, lambda src, dst: dst == target)
    moved = r"could not be moved back .* it is at '.*/\.t\.partial-.*/old'; the next build of .* moves it back"
    with pytest.raises(OSError, match=moved):
        with publish.partial_dir(target) as new:
            publish.publish(new, target, overwrite=True)
    (aside,) = tmp_path.iterdir()
    assert (aside / "old" / "zarr.json").read_text() == "old"
    monkeypatch.undo()                                # renames work again
    assert publish.clean_stale(target) == [aside]     # unlocked once publish gave up: the next build restores it
    assert list(tmp_path.iterdir()) == [target]
    assert (target / "zarr.json").read_text() == "old"


def test_a_concurrent_clean_leaves_the_moved_aside_table_alone(tmp_path, no_exchange, monkeypatch):
    target = tmp_path / "t"
    make_table(target, "old")
    real, removed = os.rename, []

    def rename(src, dst):
        if Path(dst) == target:                        # between the two renames
            removed.extend(publish.clean_stale(target))
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with publish.partial_dir(target) as new:
        (new / "zarr.json").write_text("new")
        publish.publish(new, target, overwrite=True)
    assert removed == []
    assert (target / "zarr.json").read_text() == "new"


CRASH = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from engram.storage import publish

    target = Path(sys.argv[1])
    publish._exchange = lambda a, b: False
    real = os.rename
    def rename(src, dst):
        if Path(dst) == target:
            os._exit(9)                              # killed between the two renames
        real(src, dst)
    os.rename = rename
    with publish.partial_dir(target) as new:
        (new / "zarr.json").write_text("new")
        publish.publish(new, target, overwrite=True)
""")


def test_a_build_killed_between_the_renames_gets_the_old_table_back_at_the_next_clean(tmp_path):
    target = tmp_path / "t"
    make_table(target, "old")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, "-c", CRASH, str(target)], env=env).returncode == 9
    left = sorted(tmp_path.iterdir())
    assert len(left) == 2 and all(p.name.startswith(".t.partial-") for p in left)    # the new table and the old
    assert not target.exists()
    assert sorted(publish.clean_stale(target)) == left
    assert list(tmp_path.iterdir()) == [target]
    assert (target / "zarr.json").read_text() == "old"


def test_clean_never_moves_an_aside_table_over_an_existing_one(tmp_path):
    target = tmp_path / "t"
    make_table(target, "current")
    stale = tmp_path / ".t.partial-dead"
    stale.mkdir()
    make_table(stale / "old", "older")
    assert publish.clean_stale(target) == [stale]
    assert list(tmp_path.iterdir()) == [target]
    assert (target / "zarr.json").read_text() == "current"


def test_the_checks_before_a_build_count_a_table_left_aside_and_move_nothing(tmp_path):
    import engram
    from engram.making.build import check_build

    target = tmp_path / "t"
    make_table(target, "old")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, "-c", CRASH, str(target)], env=env).returncode == 9
    assert not target.exists()
    comp = engram.Compression.identity(10)
    spec = engram.TableSpec(engram_vocab_size=(20, 20), max_ngram_size=3, n_head_per_ngram=1, n_embed_per_ngram=4,
                            layer_ids=(0,), compressed_vocab_size=10)
    with pytest.raises(engram.TableExistsError, match="already exists"):     # refused up front, not after writing
        check_build(target, spec, comp)
    assert not target.exists()                                               # a dry run changes nothing on disk
    with pytest.raises(engram.TableExistsError, match="already exists"):     # the build puts it back, then refuses
        engram.build_table(target, spec, comp)
    assert (target / "zarr.json").read_text() == "old"


def test_published_tables_get_the_usual_directory_mode(tmp_path):
    import stat

    import engram

    comp = engram.Compression.identity(10)
    spec = engram.TableSpec(engram_vocab_size=(20, 20), max_ngram_size=3, n_head_per_ngram=1, n_embed_per_ngram=4,
                            layer_ids=(0,), compressed_vocab_size=10)
    old = os.umask(0o027)
    try:
        engram.build_table(tmp_path / "t", spec, comp).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) == 0o750           # not mkdtemp's 0700


# -- durability: what is fsynced, and when --------------------------------------------------------
@pytest.fixture
def io_log(monkeypatch):
    """Every fsync (by the path of its file), rename and directory swap, in order."""
    log: list[tuple[str, ...]] = []
    real_fsync, real_rename, real_exchange = os.fsync, os.rename, publish._exchange

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, **kw):
        log.append(("rename", os.fspath(src), os.fspath(dst)))
        return real_rename(src, dst, **kw)

    def exchange(a, b):
        done = real_exchange(a, b)
        if done:
            log.append(("exchange", os.fspath(a), os.fspath(b)))
        return done

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(publish, "_exchange", exchange)
    return log


def _check_published_durably(log, target: Path) -> None:
    """Every file and folder of the new table fsynced before the publishing rename (or swap), then
    the parent folder after it."""
    published = [i for i, e in enumerate(log) if e[0] in ("rename", "exchange") and os.fspath(target) in e[1:]]
    assert published, log
    at = published[-1]
    partial = log[at][1]
    synced_before = {e[1] for e in log[:at] if e[0] == "fsync"}
    for dirpath, _, filenames in os.walk(target):
        rel = os.path.relpath(dirpath, target)
        for name in [*filenames, "."]:
            assert os.path.normpath(os.path.join(partial, rel, name)) in synced_before, (rel, name)
    assert ("fsync", os.fspath(target.parent)) in log[at + 1:]


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc/self/fd")
def test_build_convert_and_overwrite_fsync_everything_before_the_rename_and_the_parent_after(tmp_path, io_log):
    import engram

    comp = engram.Compression.identity(100)
    spec = engram.TableSpec(engram_vocab_size=(3000, 3000), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=16,
                            layer_ids=(1,), compressed_vocab_size=100)
    target = tmp_path / "t.engram"
    engram.build_table(target, spec, comp, chunk_rows=2048).close()
    _check_published_durably(io_log, target)
    io_log.clear()
    engram.build_table(target, spec, comp, seed=5, chunk_rows=2048, overwrite=True).close()
    _check_published_durably(io_log, target)
    io_log.clear()
    engram.convert(target, tmp_path / "c.engram", dtype="int8", sample_rows=0, progress=False)
    _check_published_durably(io_log, tmp_path / "c.engram")
    assert sorted(os.listdir(tmp_path)) == ["c.engram", "t.engram"]            # nothing partial left behind
    assert {oct(os.stat(os.path.join(d, f)).st_mode & 0o777) for d, _, fs in os.walk(target) for f in fs} == {"0o444"}
