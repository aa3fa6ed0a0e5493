"""build_table: seeded and imported rows, streaming memory, atomic publication."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import engram
from engram.making import build
from engram.making.build import INIT_BLOCK_ROWS
from engram.storage import chunks, publish, quant, writer

VOCAB = 600
COMP = engram.Compression(np.arange(VOCAB) // 2)


def make_spec(dtype: str = "float32", **changes) -> engram.TableSpec:
    spec = engram.TableSpec(engram_vocab_size=(2000, 2100), max_ngram_size=3, n_head_per_ngram=2,
                            n_embed_per_ngram=32, layer_ids=(1, 5),
                            compressed_vocab_size=COMP.compressed_vocab_size, dtype=dtype)
    return spec.replace(**changes) if changes else spec


def all_rows(table, layer_id: int) -> torch.Tensor:
    return table.rows(layer_id, np.arange(table.spec.rows(layer_id)))


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


# -- rows ---------------------------------------------------------------------------------
def test_returns_the_open_table(tmp_path):
    with engram.build_table(tmp_path / "t", make_spec(), COMP) as table:
        assert isinstance(table, engram.Table) and table.tier == "mmap" and not table.closed
        assert table.spec == make_spec() and table.compression == COMP
    assert leftovers(tmp_path) == []


def test_plan_layout_is_what_gets_built(tmp_path):
    spec = make_spec()
    plan = build.plan_layout(spec, chunk_rows=2048)
    assert [(lay.rows, lay.chunk_rows, lay.n_chunks) for lay in plan.values()] == [(8238, 2048, 5), (8304, 2048, 5)]
    assert build.plan_layout(spec)[1].n_chunks == 1          # a small layer: one chunk, little padding
    with engram.build_table(tmp_path / "t", spec, COMP, chunk_rows=2048) as table:
        assert [table.layout(lid).n_chunks for lid in spec.layer_ids] == [5, 5]


def test_normal_init_follows_the_documented_formula(tmp_path):
    spec = make_spec()
    with engram.build_table(tmp_path / "t", spec, COMP, std=0.5, seed=11, chunk_rows=1024) as table:
        for layer_id in spec.layer_ids:
            rows = all_rows(table, layer_id).numpy()
            for r in (0, 1, 1023, 1024, 5000, spec.rows(layer_id) - 1):
                z = np.random.default_rng([11, layer_id, r // INIT_BLOCK_ROWS]).standard_normal(
                    (INIT_BLOCK_ROWS, spec.head_dim), dtype=np.float32)
                np.testing.assert_array_equal(rows[r], np.float32(0.5) * z[r % INIT_BLOCK_ROWS])
        assert 0.45 < float(rows.std()) < 0.55


def test_rows_depend_on_seed_only_not_on_chunking(tmp_path):
    spec = make_spec()
    a = engram.build_table(tmp_path / "a", spec, COMP, seed=1, chunk_rows=1024)
    b = engram.build_table(tmp_path / "b", spec, COMP, seed=1, chunk_rows=3072)
    c = engram.build_table(tmp_path / "c", spec, COMP, seed=2, chunk_rows=1024)
    d = engram.build_table(tmp_path / "d", spec, COMP, seed=1, chunk_rows=1024)
    with a, b, c, d:
        assert a.checksums(1) == d.checksums(1) and a.checksums(5) == d.checksums(5)
        assert torch.equal(all_rows(a, 1), all_rows(b, 1))
        assert not torch.equal(all_rows(a, 1), all_rows(c, 1))
        assert not torch.equal(all_rows(a, 1)[:100], all_rows(a, 5)[:100])   # layers differ


def test_bf16_init_rounds_the_float32_draws(tmp_path):
    with engram.build_table(tmp_path / "f32", make_spec(), COMP, seed=4) as f32, \
            engram.build_table(tmp_path / "bf16", make_spec("bfloat16"), COMP, seed=4) as bf16:
        assert bf16.dtype == torch.bfloat16
        assert torch.equal(all_rows(bf16, 5), all_rows(f32, 5).to(torch.bfloat16))


def test_zeros_init(tmp_path):
    with engram.build_table(tmp_path / "t", make_spec("float16"), COMP, init="zeros") as table:
        assert not all_rows(table, 1).any()


@pytest.mark.parametrize("kind", ["numpy-f64", "torch-bf16", "torch-f32-grad", "memmap"])
def test_weights_import(tmp_path, kind):
    spec = make_spec("bfloat16" if kind == "torch-f32-grad" else "float32")
    rows = torch.randn(spec.rows(1), spec.head_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if kind == "numpy-f64":
        source = rows.numpy()
    elif kind == "torch-bf16":
        source = rows.to(torch.bfloat16)
    elif kind == "torch-f32-grad":
        source = rows.float().requires_grad_()
    else:
        np.save(tmp_path / "rows.npy", rows.float().numpy())
        source = np.load(tmp_path / "rows.npy", mmap_mode="r")      # read-only np.memmap
    with engram.build_table(tmp_path / "t", spec, COMP, weights={1: source}, seed=9, chunk_rows=4096) as table:
        expected = (source.detach() if isinstance(source, torch.Tensor) else torch.from_numpy(np.array(source)))
        assert torch.equal(all_rows(table, 1), expected.to(table.dtype))
        with engram.build_table(tmp_path / "init", spec, COMP, seed=9) as init_only:   # layer 5: the init
            assert torch.equal(all_rows(table, 5), all_rows(init_only, 5))


def test_weights_are_checked(tmp_path):
    spec = make_spec()
    good = np.zeros((spec.rows(1), 16), np.float32)
    with pytest.raises(engram.InputError, match=r"weights\[1\] has shape \(10, 16\), expected \(8238, 16\) = "
                       r"\(spec.rows\(1\), spec.head_dim\) for layer 1"):
        engram.build_table(tmp_path / "t", spec, COMP, weights={1: good[:10]})
    with pytest.raises(engram.InputError, match=r"weights has layer_id=2, but the spec's layer_ids are \(1, 5\)"):
        engram.build_table(tmp_path / "t", spec, COMP, weights={2: good})
    with pytest.raises(engram.InputError, match=r"weights\[1\] has dtype int32, expected floating point"):
        engram.build_table(tmp_path / "t", spec, COMP, weights={1: good.astype(np.int32)})
    with pytest.raises(engram.InputError, match=r"weights\[1\] must be a numpy array, a torch tensor or "
                       r"checkpoint rows \(Checkpoint.rows\(layer_id\)\), got list"):
        engram.build_table(tmp_path / "t", spec, COMP, weights={1: good.tolist()})
    with pytest.raises(engram.InputError, match="weights must be a mapping"):
        engram.build_table(tmp_path / "t", spec, COMP, weights=[good])
    assert not (tmp_path / "t").exists()


# -- quantized rows -------------------------------------------------------------------------
QUANT = {"int8": {}, "float8_e4m3": {"scale_block": 4}}      # D = 16: 4 bytes of scales a row for both


def quant_spec(dtype: str, **changes) -> engram.TableSpec:
    return make_spec().replace(dtype=dtype, **QUANT[dtype], **changes)


def stored(table, layer_id: int):
    return table.stored_rows(layer_id, np.arange(table.spec.rows(layer_id)))


@pytest.mark.parametrize("dtype", list(QUANT))
def test_quantized_init_encodes_the_float32_draws(tmp_path, dtype, monkeypatch):
    monkeypatch.setattr(writer, "ENCODE_VALUES", 5000)        # pieces of 312 rows: not aligned to anything
    spec = quant_spec(dtype)
    with engram.build_table(tmp_path / "f32", make_spec(), COMP, seed=4) as f32, \
            engram.build_table(tmp_path / "q", spec, COMP, seed=4, chunk_rows=16384) as q, \
            engram.build_table(tmp_path / "z", spec, COMP, init="zeros") as zeros:
        assert q.format_version == 2 and q.dtype == torch.float32
        for layer_id in spec.layer_ids:
            want = quant.encode(all_rows(f32, layer_id), dtype, spec.scale_block)
            got = stored(q, layer_id)
            np.testing.assert_array_equal(got.values, want.values)
            np.testing.assert_array_equal(got.scales, want.scales)
            assert torch.equal(all_rows(q, layer_id), quant.decode(want.values, want.scales, dtype,
                                                                   block=spec.scale_block))
        assert not all_rows(zeros, 1).any() and not stored(zeros, 5).scales.any()
        q.verify()


@pytest.mark.parametrize("kind", ["numpy-f64", "torch-bf16", "memmap"])
@pytest.mark.parametrize("dtype", list(QUANT))
def test_quantized_weights_import(tmp_path, dtype, kind, monkeypatch):
    monkeypatch.setattr(writer, "ENCODE_VALUES", 40000)
    spec = quant_spec(dtype)
    rows = torch.randn(spec.rows(1), spec.head_dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows[5] = 0
    if kind == "numpy-f64":
        source = rows.numpy()
    elif kind == "torch-bf16":
        source = rows.to(torch.bfloat16)
    else:
        np.save(tmp_path / "rows.npy", rows.float().numpy())
        source = np.load(tmp_path / "rows.npy", mmap_mode="r")
    as_float32 = (source if isinstance(source, torch.Tensor) else torch.from_numpy(np.array(source))).float()
    want = quant.encode(as_float32, dtype, spec.scale_block)
    with engram.build_table(tmp_path / "t", spec, COMP, weights={1: source}) as table:
        got = stored(table, 1)
        np.testing.assert_array_equal(got.values, want.values)
        np.testing.assert_array_equal(got.scales, want.scales)
        assert not all_rows(table, 1)[5].any()


def test_non_finite_rows_are_refused_by_quantized_tables(tmp_path):
    spec = quant_spec("float8_e4m3")
    rows = np.zeros((spec.rows(1), 16), np.float32)
    rows[7000, 3] = np.inf
    with pytest.raises(engram.InputError, match=r"weights\[1\] row 7000 contains NaN or inf .*: float8_e4m3 rows "
                       r"must be finite"):
        engram.build_table(tmp_path / "t", spec, COMP, weights={1: rows})
    rows64 = np.zeros((spec.rows(1), 16), np.float64)
    rows64[7000, 3] = 1e39                             # finite in float64, inf in float32
    with pytest.raises(engram.InputError, match=r"row 7000 contains NaN or inf \(after conversion to float32\)"):
        engram.build_table(tmp_path / "t", spec, COMP, weights={1: rows64})
    assert not (tmp_path / "t").exists() and leftovers(tmp_path) == []


def test_quantized_chunks_hold_whole_blocks_of_scales(tmp_path):
    spec = quant_spec("int8")                          # 16-byte rows, 4 bytes of scales a row
    assert build.plan_layout(spec)[1].chunk_rows == 16384
    plan = build.plan_layout(spec, chunk_rows=16384)[1]
    # values, scales, and one 8-byte digest per 4 KiB block of the values
    assert plan.scales.array == "layer_1_scales" and plan.disk_bytes == 16384 * (16 + 4) + 16384 * 16 // 4096 * 8
    with pytest.raises(engram.InputError, match=r"chunk_rows=4096 is invalid: .* with 16-byte rows and 4 bytes of "
                       r"scales use a positive multiple of 16384"):
        engram.build_table(tmp_path / "t", spec, COMP, chunk_rows=4096)


def test_bad_arguments(tmp_path):
    path = tmp_path / "t"
    with pytest.raises(engram.InputError, match=r"chunk_rows=1000 is invalid: .* use a positive multiple of 1024"):
        engram.build_table(path, make_spec(), COMP, chunk_rows=1000)
    with pytest.raises(engram.InputError, match=r"init='uniform' is not an initializer: expected one of "
                       r"\('normal', 'zeros'\)"):
        engram.build_table(path, make_spec(), COMP, init="uniform")
    with pytest.raises(engram.InputError, match="std=-1.0 is invalid"):
        engram.build_table(path, make_spec(), COMP, std=-1.0)
    with pytest.raises(engram.InputError, match="seed=-3 is invalid"):
        engram.build_table(path, make_spec(), COMP, seed=-3)
    with pytest.raises(engram.InputError, match="comp must be an engram.Compression, got ndarray"):
        engram.build_table(path, make_spec(), COMP.lookup)
    with pytest.raises(engram.SpecMismatchError, match="compressed_vocab_size=600 but spec.compressed_vocab_size=300"):
        engram.build_table(path, make_spec(), engram.Compression.identity(600))
    assert not path.exists()


def test_no_progress_output_off_a_terminal(tmp_path, capsys):
    engram.build_table(tmp_path / "t", make_spec(), COMP).close()
    assert capsys.readouterr() == ("", "")


# -- publication --------------------------------------------------------------------------
def test_existing_tables_are_replaced_only_with_overwrite(tmp_path):
    path = tmp_path / "t"
    old = engram.build_table(path, make_spec(), COMP, seed=1)
    old_rows = all_rows(old, 1)
    with pytest.raises(engram.TableExistsError, match=r"path=.* already exists: pass overwrite=True"):
        engram.build_table(path, make_spec(), COMP, seed=2)
    with engram.build_table(path, make_spec(), COMP, seed=2, overwrite=True) as new:
        assert not torch.equal(all_rows(new, 1), old_rows)
        assert torch.equal(all_rows(old, 1), old_rows)     # the old mapping still reads the old rows
    old.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_overwrite_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    path = tmp_path / "t"
    engram.build_table(path, make_spec(), COMP, seed=1).close()
    engram.build_table(path, make_spec(), COMP, seed=2, overwrite=True).close()
    with engram.build_table(tmp_path / "ref", make_spec(), COMP, seed=2) as ref, engram.open(path) as table:
        assert table.checksums(1) == ref.checksums(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "t"]


def test_overwrite_replaces_only_tables(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for name in ("notes", "file"):
        with pytest.raises(engram.TableExistsError, match="exists and is not an engram table"):
            engram.build_table(tmp_path / name, make_spec(), COMP, overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    engram.build_table(tmp_path / "empty", make_spec(), COMP).close()    # an empty directory is taken


def test_a_failed_build_leaves_nothing(tmp_path, disk_full_at_third_chunk):
    with pytest.raises(OSError, match="No space left"):
        engram.build_table(tmp_path / "t", make_spec(), COMP, chunk_rows=1024)
    assert list(tmp_path.iterdir()) == []


def test_stale_partials_are_removed_but_live_ones_kept(tmp_path):
    target = tmp_path / "t"
    stale = tmp_path / ".t.partial-dead"
    stale.mkdir()
    (stale / "zarr.json").write_text("{}")
    with publish.partial_dir(target) as live:
        assert publish.clean_stale(target) == [stale]
        assert live.exists() and not stale.exists()


CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    import engram
    from engram.storage import chunks

    real = chunks.write_chunk
    def slow(path, block, bar):
        digest = real(path, block, bar)
        print("chunk", flush=True)
        time.sleep(0.2)
        return digest
    chunks.write_chunk = slow
    comp = engram.Compression(np.arange(600) // 2)
    spec = engram.TableSpec(engram_vocab_size=(2000, 2100), max_ngram_size=3, n_head_per_ngram=2,
                            n_embed_per_ngram=32, layer_ids=(1, 5), compressed_vocab_size=300)
    engram.build_table(sys.argv[1], spec, comp, seed=int(sys.argv[2]), chunk_rows=4096,
                       overwrite=sys.argv[3] == "1").close()
    print("done", flush=True)
""")
CHUNKS = 6   # 2 layers x 3 chunks of 4096 rows


def build_and_kill(path, seed: int, overwrite: bool, after_chunks: int) -> None:
    """Run a build in a child process and SIGKILL it once `after_chunks` chunk files are written."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(seed), "1" if overwrite else "0"],
                             stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(after_chunks):
            assert child.stdout.readline() == "chunk\n"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("after_chunks", [1, CHUNKS])
def test_a_killed_build_leaves_nothing_and_the_next_build_cleans_up(tmp_path, after_chunks):
    path = tmp_path / "t"
    build_and_kill(path, seed=1, overwrite=False, after_chunks=after_chunks)
    assert not path.exists() and len(leftovers(tmp_path)) == 1
    with engram.build_table(path, make_spec(), COMP, seed=1, chunk_rows=4096) as table:
        table.verify()
    assert leftovers(tmp_path) == []


def test_a_killed_overwrite_keeps_the_old_table(tmp_path):
    path = tmp_path / "t"
    with engram.build_table(path, make_spec(), COMP, seed=1, chunk_rows=4096) as table:
        before = all_rows(table, 5)
    build_and_kill(path, seed=2, overwrite=True, after_chunks=CHUNKS)
    with engram.open(path) as table:
        table.verify()
        assert torch.equal(all_rows(table, 5), before)


# -- memory -------------------------------------------------------------------------------
RSS_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import engram

    def status(key):   # kB values of /proc/self/status
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    comp = engram.Compression.identity(1000)
    def spec(base, dtype="float32"):
        return engram.TableSpec(engram_vocab_size=(base, base), max_ngram_size=3, n_head_per_ngram=8,
                                n_embed_per_ngram=512, layer_ids=(1,), compressed_vocab_size=1000, dtype=dtype)
    # float32: 16 heads x ~8192 rows x 256 B = 32 MiB, 128 chunks of 256 KiB;
    # float8_e4m3: 16 heads x ~32768 rows x (64 + 2) B = 34 MiB, 16 chunks of 2 MiB + 64 KiB
    big = spec(8192) if sys.argv[4] == "float32" else spec(32768, sys.argv[4])
    source = None
    if sys.argv[2] == "memmap":
        source = {1: np.load(sys.argv[1] + "/rows.npy", mmap_mode="r")}
    engram.build_table(sys.argv[1] + "/warm", spec(600, sys.argv[4]), comp).close()   # imports, caches
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                      # reset the peak (VmHWM) to the current resident set
    before = status("VmRSS")
    with engram.build_table(sys.argv[1] + "/big", big, comp, chunk_rows=int(sys.argv[3]), weights=source) as table:
        peak = status("VmHWM")
        assert big.total_bytes > 32 << 20 and table.layout(1).n_chunks >= 16
        if source is not None:
            rows = [0, 70000, big.rows(1) - 1]
            assert np.array_equal(table.rows(1, rows).numpy(), source[1][rows])
    print(peak - before)
""")


@pytest.mark.parametrize(("source", "dtype", "chunk_rows"), [("init", "float32", 1024), ("memmap", "float32", 1024),
                                                             ("init", "float8_e4m3", 32768)])
def test_memory_does_not_grow_with_the_table(tmp_path, source, dtype, chunk_rows):
    if source == "memmap":   # 32 MiB of trained rows in a .npy file, written in pieces
        rows = engram.TableSpec(engram_vocab_size=(8192, 8192), max_ngram_size=3, n_head_per_ngram=8,
                                n_embed_per_ngram=512, layer_ids=(1,), compressed_vocab_size=1000).rows(1)
        out = np.lib.format.open_memmap(tmp_path / "rows.npy", mode="w+", dtype=np.float32, shape=(rows, 64))
        for start in range(0, rows, 8192):
            out[start: start + 8192] = start
        out.flush()
        del out
    result = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path), source, str(chunk_rows), dtype],
                            capture_output=True, text=True, check=True)
    shutil.rmtree(tmp_path / "big")                     # keep the test run's disk footprint small
    (tmp_path / "rows.npy").unlink(missing_ok=True)
    growth = int(result.stdout.split()[-1])
    assert growth < 8 << 20, f"peak RSS grew by {growth / 2**20:.1f} MiB while building a 32 MiB table"


@pytest.mark.parametrize("can_swap", [True, False])
def test_overwrite_never_deletes_what_appears_at_the_path_during_the_build(tmp_path, monkeypatch, can_swap):
    target = tmp_path / "t"
    real = chunks.write_chunk

    def write_and_race(path, block, bar):                  # someone else's files land at the target
        if not target.exists():
            target.mkdir()
            (target / "precious.txt").write_text("mine")
        return real(path, block, bar)

    monkeypatch.setattr(chunks, "write_chunk", write_and_race)
    if not can_swap:
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    with pytest.raises(engram.TableExistsError, match=r"holds something other than an engram table \(it appeared "
                       r"while the table was written\)"):
        engram.build_table(target, make_spec(), COMP, overwrite=True)
    assert (target / "precious.txt").read_text() == "mine" and sorted(os.listdir(target)) == ["precious.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["t"]                     # the new table went away


def test_a_path_under_a_file_is_refused_before_writing(tmp_path):
    (tmp_path / "spec.json").write_text("{}")
    with pytest.raises(engram.InputError, match=r"path='.*spec.json/t' cannot be created: '.*spec.json' is not a "
                       r"folder; choose another path"):
        engram.build_table(tmp_path / "spec.json" / "t", make_spec(), COMP)
