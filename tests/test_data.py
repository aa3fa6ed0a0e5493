"""The files shipped in the package are found from any working directory, not relative to a checkout."""

import subprocess
import sys
from pathlib import Path

import pytest

import engram
from engram import MissingFileError

GOLDEN_TOKENIZER = Path(__file__).parent / "golden" / "bpe_bytelevel_4k.tokenizer.json"


def test_tokenizer_path_is_the_shipped_tokenizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = engram.data.tokenizer_path()
    assert path.is_absolute() and path.name == "bpe_bytelevel_4k.tokenizer.json"
    assert path.read_bytes() == GOLDEN_TOKENIZER.read_bytes()
    assert engram.Compression.from_tokenizer_file(path).vocab_size == 4000


def test_tokenizer_path_works_from_another_directory_in_a_fresh_process(tmp_path):
    code = "import engram; print(engram.data.tokenizer_path())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).is_file()


def test_a_missing_shipped_file_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(engram.data, "TOKENIZER_NAME", "gone.tokenizer.json")
    with pytest.raises(MissingFileError, match=r"shipped tokenizer '.*gone\.tokenizer\.json' is missing; reinstall"):
        engram.data.tokenizer_path()
