"""Files shipped inside the package, found wherever engram is installed (not relative to a checkout).

    comp = engram.Compression.from_tokenizer_file(engram.data.tokenizer_path())
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from engram.errors import MissingFileError

__all__ = ["TOKENIZER_NAME", "tokenizer_path"]

#: The shipped tokenizer: byte-level BPE, 4,000 ids, Hugging Face `tokenizers` JSON (see README.md beside it).
TOKENIZER_NAME = "bpe_bytelevel_4k.tokenizer.json"


def tokenizer_path() -> Path:
    """The path of the tokenizer shipped with engram, for examples, the demo and tests.

    It is a small byte-level BPE tokenizer (4,000 ids) in Hugging Face `tokenizers` format, found
    through `importlib.resources`, so it works from any working directory once engram is installed.

    Returns:
        The absolute path of `bpe_bytelevel_4k.tokenizer.json` inside the installed package.

    Raises:
        MissingFileError: the installed package lacks the file (an install that left out package data).
    """
    path = Path(str(files(__name__) / TOKENIZER_NAME))
    if not path.is_file():
        raise MissingFileError(f"the shipped tokenizer {str(path)!r} is missing; reinstall engram with its package "
                               f"data (`pip install -e .` from the repository)")
    return path
