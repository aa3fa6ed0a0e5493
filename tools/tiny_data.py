"""Text corpora for the tiny example model: files on disk, tokenized with the shipped tokenizer."""

from __future__ import annotations

import sysconfig
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

import engram

TOKENIZER = engram.data.tokenizer_path()
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}


def stdlib_files() -> list[Path]:
    """The Python standard library's own .py files (tests and installed packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, and every file below a given directory, in sorted order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--data {str(path)!r} is neither a file nor a directory")
    return files


def read_texts(files: list[Path], max_chars: int, seed: int = 0) -> list[str]:
    """File contents (invalid UTF-8 dropped), files in a seeded random order, up to `max_chars`."""
    texts, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(files)):
        path = files[i]
        text = path.read_text(encoding="utf-8", errors="ignore")
        if text:
            texts.append(text[: max_chars - total])
            total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


def tokenize(texts: list[str], tokenizer_path: str | Path = TOKENIZER) -> np.ndarray:
    """One int64 token stream: every text encoded, in order."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    encodings = tokenizer.encode_batch(texts)
    return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings])


def split_tokens(texts: list[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation token streams: every k-th text held out (k = 1/val_fraction) when
    there are enough texts, else the last `val_fraction` of the tokens."""
    every = max(2, round(1 / val_fraction))
    if len(texts) >= 2 * every:
        held_out = set(range(every - 1, len(texts), every))
        train = [t for i, t in enumerate(texts) if i not in held_out]
        return tokenize(train), tokenize([texts[i] for i in sorted(held_out)])
    tokens = tokenize(texts)
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


def held_out_texts(texts: list[str], val_fraction: float) -> list[str]:
    """The texts `split_tokens` holds out for validation (with too few texts: the last `val_fraction`
    of their characters, about the tokens it holds out then)."""
    every = max(2, round(1 / val_fraction))
    if len(texts) >= 2 * every:
        return [texts[i] for i in range(every - 1, len(texts), every)]
    joined = "".join(texts)
    return [joined[len(joined) - int(len(joined) * val_fraction):]]


def random_batch(tokens: np.ndarray, batch_size: int, block_size: int,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows: inputs [B, T] and next-token targets [B, T]."""
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    window = np.stack([tokens[s: s + block_size + 1] for s in starts])    # [B, T+1]
    window = torch.from_numpy(window)
    return window[:, :-1], window[:, 1:]
