"""Fault injection: files changed under an open reader, builds and conversions killed with SIGKILL
at random points, a table rebuilt while other processes open and read it. Each runs in child
processes whose exit status is checked, so a crash (SIGBUS, SIGSEGV) fails the test instead of
the test run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import engram

REPO = Path(__file__).resolve().parents[2]
COMP = engram.Compression.identity(100)
SPEC = engram.TableSpec(engram_vocab_size=(6000, 6000), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=16,
                        layer_ids=(1, 2), compressed_vocab_size=100)
SPEC_SOURCE = ("engram.TableSpec(engram_vocab_size=(6000, 6000), max_ngram_size=3, n_head_per_ngram=2, "
               "n_embed_per_ngram=16, layer_ids=(1, 2), compressed_vocab_size=100)")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fault injection uses Linux process semantics")


def child(code: str, *args: str, **kw) -> subprocess.Popen:
    script = "import sys, json, os\nimport numpy as np\nimport engram\n" + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit status {proc.returncode} ({err[-2000:]})"
    return out


# -- files changed under an open reader ----------------------------------------------------------------
UNDER_A_READER = """
    import shutil
    source, work = sys.argv[1], sys.argv[2]
    for tier, prefault in (("mmap", False), ("mmap", True), ("direct", False), ("ram", False)):
        for change in ("truncate", "rewrite", "touch", "replace"):
            path = os.path.join(work, f"{tier}-{prefault}-{change}.engram")
            shutil.copytree(source, path)
            table = engram.open(path, tier=tier, prefault=prefault)
            before = table.rows(1, np.arange(table.spec.rows(1)))
            chunk = table.chunk_files(1)[1]
            if change == "truncate":                  # cp over a served table starts with this
                os.chmod(chunk, 0o644)
                os.truncate(chunk, 0)
            elif change == "rewrite":                 # rsync --inplace: same size, other bytes
                os.chmod(chunk, 0o644)
                with open(chunk, "r+b") as f:
                    f.write(b"\\x7f" * 4096)
            elif change == "touch":                   # a backup tool: a new modification time, the same bytes
                os.utime(chunk, ns=(1, 1))
            else:                                     # engram's own atomic publish
                engram.build_table(path, table.spec, table.compression, seed=9, chunk_rows=2048,
                                   overwrite=True).close()
            try:
                after = table.rows(1, np.arange(table.spec.rows(1)))
                outcome = "same rows" if bool((after == before).all()) else "OTHER ROWS"
            except engram.CorruptTableError as exc:
                changed = "changed after the table was opened" in str(exc) or "its contents changed" in str(exc)
                outcome = "refused" if changed else f"other error: {exc}"
            print(json.dumps([tier, prefault, change, outcome]), flush=True)
            table.close()
"""


def test_files_changed_under_an_open_reader_are_refused_not_read(tmp_path):
    source = tmp_path / "source.engram"
    engram.build_table(source, SPEC, COMP, seed=1, chunk_rows=2048).close()
    work = tmp_path / "work"
    work.mkdir()
    out = finish(child(UNDER_A_READER, str(source), str(work)))
    lines = [json.loads(line) for line in out.splitlines()]
    outcomes = {(tier, prefault, change): outcome for tier, prefault, change, outcome in lines}
    for (tier, _, change), outcome in outcomes.items():
        if tier == "ram" or change in ("replace", "touch"):
            assert outcome == "same rows", (tier, change)    # rows in memory, unlinked files kept whole, same bytes
        else:
            assert outcome == "refused", (tier, change)
    assert len(outcomes) == 16


# -- SIGKILL at random points -----------------------------------------------------------------------------
KEEPS_BUILDING = f"""
    path, action = sys.argv[1], sys.argv[2]
    spec, comp = {SPEC_SOURCE}, engram.Compression.identity(100)
    print("ready", flush=True)
    seed = 10
    while True:
        seed += 1
        if action == "convert":
            engram.convert(path, path + ".int8", dtype="int8", sample_rows=0, overwrite=True, progress=False)
        else:
            engram.build_table(path, spec, comp, seed=seed, chunk_rows=2048, overwrite=True, progress=False).close()
"""


def _killed_at_random(path: Path, action: str, rng: np.random.Generator) -> None:
    proc = child(KEEPS_BUILDING, str(path), action)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(float(rng.uniform(0.05, 0.6)))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("action", ["build", "convert"])
def test_a_build_or_conversion_killed_at_any_point_leaves_a_whole_table(tmp_path, action):
    rng = np.random.default_rng(len(action))
    path = tmp_path / "t.engram"
    engram.build_table(path, SPEC, COMP, seed=1, chunk_rows=2048).close()
    target = path if action == "build" else Path(f"{path}.int8")
    for _ in range(3):
        _killed_at_random(path, action, rng)
        if target.exists():                       # the old table or a new one, whole: never a mix
            with engram.open(target, tier="ram") as table:
                table.verify(progress=False)
        else:
            assert action == "convert"            # killed before its first conversion was published
    # The next build or conversion cleans up what the killed ones left, and publishes.
    if action == "build":
        engram.build_table(path, SPEC, COMP, seed=3, chunk_rows=2048, overwrite=True).close()
    else:
        engram.convert(path, target, dtype="int8", sample_rows=0, overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == sorted({path.name, target.name})
    engram.open(target, tier="ram").close()


# -- a rebuild while other processes open and read ------------------------------------------------------------
READS_WHILE_REBUILT = """
    path, expected_file, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    expected = np.load(expected_file)                  # [2, rows]: layer 1 rows of seeds 1 and 2
    pick = np.random.default_rng(os.getpid()).integers(0, expected.shape[1], (rounds, 64))
    opened = 0
    for r in range(rounds):
        with engram.open(path, tier=("mmap", "direct", "ram")[r % 3]) as table:
            rows = table.rows(1, pick[r]).numpy()
        assert any((rows == e[pick[r]]).all() for e in expected), "rows of neither table"
        opened += 1
    print(opened, flush=True)
"""

REBUILDS = f"""
    path, rounds = sys.argv[1], int(sys.argv[2])
    spec, comp = {SPEC_SOURCE}, engram.Compression.identity(100)
    for r in range(rounds):
        engram.build_table(path, spec, comp, seed=1 + r % 2, chunk_rows=2048, overwrite=True, progress=False).close()
"""


def test_readers_see_the_old_or_the_new_table_during_rebuilds(tmp_path):
    path = tmp_path / "t.engram"
    expected = []
    for seed in (1, 2):
        engram.build_table(path, SPEC, COMP, seed=seed, chunk_rows=2048, overwrite=True).close()
        with engram.open(path) as table:
            expected.append(table.rows(1, np.arange(SPEC.rows(1))).numpy())
    np.save(tmp_path / "expected.npy", np.stack(expected))
    writer = child(REBUILDS, str(path), "6")
    readers = [child(READS_WHILE_REBUILT, str(path), str(tmp_path / "expected.npy"), "24") for _ in range(2)]
    finish(writer)
    assert [int(finish(r)) for r in readers] == [24, 24]
