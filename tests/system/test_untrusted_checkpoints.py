"""Checkpoint folders and input files from elsewhere: lying safetensors headers, FIFOs, device links,
oversized or deeply nested JSON, NUL characters. Each is refused with a typed error, by the API
and the command line alike, and nothing hangs.

The folders are the synthetic DeepSeek-V4.1 release of the `v41_release` fixture (conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import subprocess
import sys

import pytest

import engram
from engram.cli import main
from engram.limits import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, MAX_TOKENIZER_BYTES
from engram.storage.checkpoint_files import read_index

TIERS = ("ram", "mmap", "direct")
SHARD1 = "model-00001-of-00002.safetensors"


def writable(path):
    for p in [path, *path.rglob("*")]:
        os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
    return path


def edit_header(path, edit):
    """Rewrite a safetensors file's header: `edit(header dict) -> header text`; the data stays as it is."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = edit(json.loads(data[8:8 + n]))
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def run(capsys, *argv):
    code = main([*map(str, argv), "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out)


# -- headers that lie: checked as the safetensors library checks them ------------------------------
def shifted_rows(h):               # the rows moved two bytes into the tensor after them
    begin, end = h["layers.1.engram.embed.weight"]["data_offsets"]
    h["layers.1.engram.embed.weight"]["data_offsets"] = [begin + 2, end + 2]
    return json.dumps(h)


def aliased_scales(h):             # the scales pointed at the first bytes of the rows
    begin, _ = h["layers.1.engram.embed.weight"]["data_offsets"]
    s_begin, s_end = h["layers.1.engram.embed.scale"]["data_offsets"]
    h["layers.1.engram.embed.scale"]["data_offsets"] = [begin, begin + s_end - s_begin]
    return json.dumps(h)


def duplicated_key(h):             # the rows named twice: Python's JSON keeps the last, other readers the first
    text = json.dumps(h)
    entry = json.dumps({"layers.1.engram.embed.weight": h["layers.1.engram.embed.scale"]})[1:-1]
    return text[:-1] + ", " + entry + "}"


TILING = r"tensor 'layers.1.[\w.]+' (leaves a gap|overlaps the bytes of another tensor).*must tile the data section"
LIES = {"shifted rows": (shifted_rows, TILING), "aliased scales": (aliased_scales, TILING),
        "duplicated key": (duplicated_key, r"holds the key 'layers.1.engram.embed.weight' twice in one object")}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_lying_header_is_refused_on_every_tier_and_by_inspect_and_verify(v41_release, capsys, lie):
    from safetensors import SafetensorError, safe_open

    edit, message = LIES[lie]
    ck = v41_release()
    shard = writable(ck.path) / SHARD1
    edit_header(shard, edit)
    if lie != "duplicated key":                          # the library accepts a key twice (it keeps the last)
        with pytest.raises(SafetensorError, match="invalid offset for tensor"), safe_open(shard, framework="pt"):
            pass
    for tier in TIERS:
        with pytest.raises(engram.CorruptTableError, match=rf"safetensors file '.*{SHARD1}'.*{message}"):
            engram.open(ck.path, tier=tier)
    code, error = run(capsys, "inspect", ck.path, "--probe-reads", "0")
    assert code == 3 and error["error_type"] == "CorruptTableError" and re.search(message, error["error"])
    code, result = run(capsys, "verify", ck.path)
    assert code == 1 and result["ok"] is False and re.search(message, result["error"])
    assert (result["error_type"], result["exit_code"]) == ("CorruptTableError", 1)


def test_verify_json_of_a_damaged_table_names_the_error_type_and_exit_code(tmp_path, capsys):
    comp = engram.Compression.identity(50)
    spec = engram.TableSpec(engram_vocab_size=(300,), max_ngram_size=2, n_head_per_ngram=1, n_embed_per_ngram=8,
                            layer_ids=(0,), compressed_vocab_size=50)
    with engram.build_table(tmp_path / "t.engram", spec, comp) as table:
        chunk = table.chunk_files(0)[0]
    os.chmod(chunk, 0o644)
    with open(chunk, "r+b") as f:
        f.seek(5)
        f.write(b"\x55")
    code, result = run(capsys, "verify", tmp_path / "t.engram")
    assert code == 1 and result["ok"] is False
    assert (result["error_type"], result["exit_code"]) == ("CorruptTableError", 1) and "chunk" in result["error"]


# -- FIFOs, devices and links in a checkpoint folder, and as input files --------------------------------
EACH_IN_A_CHILD = """
import contextlib, io, json, sys
from engram.cli import main
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv + ["--json"])
    print(json.dumps([code, json.loads(out.getvalue())]), flush=True)
try:
    import engram
    engram.open(sys.argv[2])
except Exception as exc:
    print(json.dumps([type(exc).__name__, str(exc)]), flush=True)
"""


def test_fifos_in_a_checkpoint_folder_and_as_input_files_are_refused_without_hanging(v41_release, tmp_path):
    cases = []
    for name in ("tokenizer.json", "config.json", "model.safetensors.index.json", SHARD1):
        ck = v41_release(root=tmp_path / f"ck-{name}")
        os.remove(writable(ck.path) / name)
        os.mkfifo(ck.path / name)
        cases.append((["inspect", str(ck.path), "--probe-reads", "0"], name))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"engram_vocab_size": [50], "max_ngram_size": 2, "n_head_per_ngram": 1,
                                "n_embed_per_ngram": 8, "layer_ids": [0]}))
    cases += [(["build", str(tmp_path / "t.engram"), "--spec", str(spec), "--tokenizer", str(fifo)], "--tokenizer"),
              (["build", str(tmp_path / "t.engram"), "--spec", str(fifo), "--vocab-size", "10"], "--spec"),
              (["hash", "--spec", str(spec), "--tokenizer", str(fifo), "--text", "x"], "--tokenizer")]
    # In a child, so a regression hangs only it: each of these blocked in open() before.
    proc = subprocess.run([sys.executable, "-c", EACH_IN_A_CHILD, json.dumps([argv for argv, _ in cases]),
                           str(tmp_path / "ck-tokenizer.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    *results, opened = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(cases)
    for (code, error), (_, what) in zip(results, cases, strict=True):
        assert code == 3, (what, error)
        assert "is not a regular file (a FIFO" in error["error"], (what, error)
        assert "does not exist" not in error["error"], (what, error)
        assert error["error_type"] == {"--tokenizer": "InputError", "--spec": "SpecError"}.get(what,
                                                                                             "CorruptTableError")
    assert opened[0] == "CorruptTableError" and "tokenizer.json' is not a regular file (a FIFO" in opened[1]


def test_a_tokenizer_linked_to_dev_zero_is_refused_in_the_folder_and_as_a_file(v41_release):
    ck = v41_release()
    os.remove(writable(ck.path) / "tokenizer.json")
    os.symlink("/dev/zero", ck.path / "tokenizer.json")
    with pytest.raises(engram.CorruptTableError, match=r"tokenizer.json' is not a plain file of the checkpoint \(a "
                                                       r"symbolic link.*copy the folder without links \(cp -rL: a "
                                                       r"Hugging Face cache snapshot links every file"):
        engram.open(ck.path)
    with pytest.raises(engram.InputError, match=r"tokenizer file '/dev/zero' is not a regular file \(a FIFO, socket "
                                                r"or device\)"):
        engram.Compression.from_tokenizer_file("/dev/zero")
    with pytest.raises(engram.InputError, match=r"is not a regular file"):
        engram.TableSpec.from_hf_config(ck.path / "tokenizer.json")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", SHARD1])
def test_no_file_of_a_checkpoint_folder_is_read_through_a_link(v41_release, tmp_path, name):
    ck = v41_release()
    elsewhere = tmp_path / "elsewhere"
    os.rename(writable(ck.path) / name, elsewhere)          # the same bytes, reached through a link
    os.symlink(elsewhere, ck.path / name)
    with pytest.raises(engram.CorruptTableError, match=rf"{re.escape(name)}' is not a plain file of the checkpoint "
                                                       r"\(a symbolic link"):
        engram.open(ck.path)


# -- sizes, nesting, NULs and caps -----------------------------------------------------------------
@pytest.mark.parametrize("name, cap", [("config.json", MAX_CONFIG_BYTES), ("model.safetensors.index.json",
                                                                            MAX_INDEX_BYTES),
                                       ("tokenizer.json", MAX_TOKENIZER_BYTES)])
def test_oversized_folder_files_are_refused_before_they_are_read(v41_release, name, cap):
    ck = v41_release()
    with open(writable(ck.path) / name, "r+b") as f:
        f.truncate(cap + 1)                                 # sparse: no disk used
    with pytest.raises(engram.CorruptTableError, match=rf"{re.escape(name)}' has {cap + 1} bytes, more than the "
                                                       rf"{cap} a checkpoint's file of this kind can have"):
        engram.open(ck.path)
    if name == "config.json":
        with pytest.raises(engram.InputError, match=rf"has {cap + 1} bytes, more than the {cap} a config file"):
            engram.TableSpec.from_hf_config(ck.path / name)


NESTED = "[" * 50_000 + "]" * 50_000


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", SHARD1])
def test_deeply_nested_json_is_a_typed_error_from_the_api(v41_release, name):
    ck = v41_release()
    path = writable(ck.path) / name
    if name == SHARD1:
        edit_header(path, lambda h: NESTED)
    else:
        path.write_text(NESTED)
    with pytest.raises(engram.CorruptTableError, match=r"nests JSON arrays or objects more than 64 deep"):
        engram.open(ck.path)
    if name == "config.json":
        with pytest.raises(engram.InputError, match=r"config file .* nests JSON arrays or objects more than 64 deep"):
            engram.TableSpec.from_hf_config(path)
    if name == "model.safetensors.index.json":
        with pytest.raises(engram.CorruptTableError, match=r"nests JSON arrays or objects more than 64 deep"):
            read_index(path)


def test_a_config_key_twice_or_a_huge_ngram_size_is_refused_before_any_work(v41_release):
    ck = v41_release()
    config = writable(ck.path) / "config.json"
    text = json.dumps(ck.config)
    config.write_text(text[:-1] + ', "text_config": {}}')
    with pytest.raises(engram.CorruptTableError, match=r"config file '.*config.json' is ambiguous JSON: it holds the "
                                                       r"key 'text_config' twice"):
        engram.open(ck.path)
    config.write_text(json.dumps({**ck.config, "text_config": {**ck.config["text_config"],
                                                               "engram_max_ngram_size": 2**62}}))
    for call in (lambda: engram.open(ck.path), lambda: engram.TableSpec.from_hf_config(config)):
        with pytest.raises(engram.SpecError, match=r"engram_max_ngram_size=4611686018427387904 is invalid: expected "
                                                   r"an int in \[2, 32\]"):
            call()


def test_a_nul_in_an_index_shard_name_or_a_path_is_a_typed_error(v41_release, tmp_path):
    ck = v41_release()
    index = writable(ck.path) / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["layers.1.engram.embed.weight"] = "model-00001\0.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(engram.CorruptTableError, match=r"names shard 'model-00001\\x00.safetensors', not a file name "
                                                       r"inside the checkpoint directory"):
        engram.open(ck.path)
    with pytest.raises(engram.CorruptTableError, match=r"maps 'layers.1.engram.embed.weight' to "
                                                       r"'model-00001\\x00.safetensors', outside the index's folder"):
        read_index(index)
    spec = engram.TableSpec(engram_vocab_size=(50,), max_ngram_size=2, n_head_per_ngram=1, n_embed_per_ngram=8,
                            layer_ids=(0,), compressed_vocab_size=10)
    with pytest.raises(engram.InputError, match=r"path='.*x\\x00y' is invalid: expected a non-empty text path "
                                                r"without NUL characters"):
        engram.build_table(str(tmp_path / "x\0y"), spec, engram.Compression.identity(10))
    with pytest.raises(engram.InputError, match=r"tokenizer file 'a\\x00b' is not a valid path"):
        engram.Compression.from_tokenizer_file("a\0b")
