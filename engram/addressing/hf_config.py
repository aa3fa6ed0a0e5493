"""DeepSeek-V4.1's config.json: the Engram fields, and the TableSpec they fix.

The released config nests the language model's fields under "text_config"::

    engram_layer_ids [1, 14]          engram_num_embeddings [384006168, 384016682]
    engram_max_ngram_size 4           engram_n_heads 8 (K, per n-gram order)
    engram_head_dim 256 (D)           engram_vocab_size 16000000 (one base for every order)
    engram_pad_token_id 2             engram_compressed_vocab_size 99092
    hidden_size 5120 (C)              hc_mult 4 (G)          rms_norm_eps

(`engram_pad_id` is read where a conversion names the pad id so.) Rows are FP8 E4M3 with one
E8M0 scale per 32 values; the hash is the reference's multiplicative-xor with seed 0 (multipliers
from `default_rng(10007 * layer_id)`), primes by the reference rule: the `TableSpec` fields.
`engram_num_embeddings` is not an input but a check: the row counts the primes give must equal it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engram.args import is_int, is_real
from engram.dtypes import BLOCK_DTYPE, DEFAULT_SCALE_BLOCK
from engram.errors import InputError, SpecError, SpecMismatchError
from engram.limits import MAX_CONFIG_BYTES, MAX_NGRAM_SIZE
from engram.untrusted import loads, read_file

__all__ = ["CONFIG_NAME", "read_hf_config", "config_from_json", "text_config", "spec_fields", "check_spec",
           "model_dims"]

CONFIG_NAME = "config.json"
PAD_FIELDS = ("engram_pad_token_id", "engram_pad_id")


def read_hf_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """The config as a dict: `source` is a config.json, the directory holding one, or a mapping.

    A file is read as an input from elsewhere (`engram.untrusted`): a regular file (a FIFO or
    device is refused, not waited on), at most `engram.limits.MAX_CONFIG_BYTES`, strict JSON
    (no key twice, nesting at most `engram.limits.MAX_JSON_DEPTH` deep).

    Raises:
        MissingFileError: no config.json there.
        InputError: the file is not a regular file, too large, or not a JSON object.
    """
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / CONFIG_NAME
    fix = "pass the model's config.json or the checkpoint directory holding it"
    raw = read_file(path, "config file", MAX_CONFIG_BYTES, fix)
    return config_from_json(raw, os.fspath(path))


def config_from_json(raw: bytes, where: str, error: type[Exception] = InputError) -> dict[str, Any]:
    """A config.json's bytes as a dict, read from `where` (named in errors).

    Raises:
        error: not strict JSON (see `read_hf_config`), or not a JSON object.
    """
    fix = "pass the model's config.json"
    doc = loads(raw, f"config file {where!r}", error, fix)
    if not isinstance(doc, dict):
        raise error(f"config file {where!r} is not a JSON object: {fix}")
    return doc


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's fields: `config["text_config"]` where present, else the config itself."""
    inner = config.get("text_config")
    return dict(inner) if isinstance(inner, Mapping) else dict(config)


def _field(cfg: Mapping[str, Any], name: str) -> Any:
    if name not in cfg:
        raise SpecError(f"config has no field {name!r}: expected a DeepSeek-V4.1 config.json (text_config with "
                        "engram_layer_ids, engram_num_embeddings, engram_max_ngram_size, engram_n_heads, "
                        "engram_head_dim, engram_vocab_size, engram_pad_token_id, engram_compressed_vocab_size)")
    return cfg[name]


def _int(cfg: Mapping[str, Any], name: str) -> int:
    value = _field(cfg, name)
    if not is_int(value):
        raise SpecError(f"config field {name}={value!r} is invalid: expected an int")
    return int(value)


def _ints(cfg: Mapping[str, Any], name: str) -> tuple[int, ...]:
    value = _field(cfg, name)
    if not isinstance(value, list) or not all(is_int(v) for v in value):
        raise SpecError(f"config field {name}={value!r} is invalid: expected a list of ints")
    return tuple(value)


def pad_id(cfg: Mapping[str, Any]) -> int:
    """The raw pad token id (`engram_pad_token_id`, or `engram_pad_id`)."""
    for name in PAD_FIELDS:
        if name in cfg:
            return _int(cfg, name)
    raise SpecError(f"config has neither {PAD_FIELDS[0]!r} nor {PAD_FIELDS[1]!r}: expected a DeepSeek-V4.1 "
                    "config.json")


def spec_fields(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """The TableSpec fields a DeepSeek-V4.1 config fixes, and its Engram fields (see `TableSpec.from_hf_config`)."""
    cfg = text_config(read_hf_config(source))
    layer_ids = _ints(cfg, "engram_layer_ids")
    N = _int(cfg, "engram_max_ngram_size")
    if not 2 <= N <= MAX_NGRAM_SIZE:        # before one base size per order is repeated N-1 times
        raise SpecError(f"config field engram_max_ngram_size={N!r} is invalid: expected an int in "
                        f"[2, {MAX_NGRAM_SIZE}] (the largest n-gram order N; engram.limits.MAX_NGRAM_SIZE)")
    K, D = _int(cfg, "engram_n_heads"), _int(cfg, "engram_head_dim")
    base = _field(cfg, "engram_vocab_size")
    bases = (int(base),) * (N - 1) if is_int(base) else _ints(cfg, "engram_vocab_size")
    fields = dict(engram_vocab_size=bases, max_ngram_size=N, n_head_per_ngram=K, n_embed_per_ngram=K * D,
                  layer_ids=layer_ids, compressed_vocab_size=_int(cfg, "engram_compressed_vocab_size"),
                  pad_id=pad_id(cfg), seed=0, hash="multiplicative-xor", dtype=BLOCK_DTYPE,
                  scale_block=DEFAULT_SCALE_BLOCK)
    return fields, cfg


def check_spec(cfg: Mapping[str, Any], spec: Any, compression: Any = None) -> None:
    """Raise unless the row counts and compressed vocabulary `cfg` states agree with `spec` (a TableSpec)."""
    layer_ids, N, K = spec.layer_ids, spec.max_ngram_size, spec.n_head_per_ngram
    base = _field(cfg, "engram_vocab_size")
    rows = _ints(cfg, "engram_num_embeddings")
    if len(rows) != len(layer_ids):
        raise SpecError(f"config field engram_num_embeddings={list(rows)} has {len(rows)} entries but "
                        f"engram_layer_ids={list(layer_ids)} has {len(layer_ids)}: expected one row count per layer")
    for i, (layer_id, want) in enumerate(zip(layer_ids, rows, strict=True)):
        got = spec.rows(layer_id)
        if got != want:
            raise SpecMismatchError(
                f"config field engram_num_embeddings[{i}]={want} (layer {layer_id}) differs from the {got} rows that "
                f"engram_vocab_size={base!r}, engram_max_ngram_size={N}, engram_n_heads={K} give by the reference "
                "prime rule: every n-gram would land in the wrong row; fix the config (or report a changed rule)")
    if compression is not None:
        have = compression.compressed_vocab_size
        if have != spec.compressed_vocab_size:
            raise SpecMismatchError(
                f"config field engram_compressed_vocab_size={spec.compressed_vocab_size} differs from the "
                f"compression's compressed_vocab_size={have}: every hash multiplier depends on it, so every n-gram "
                "would land in the wrong row; pass the compression of the checkpoint's own tokenizer.json")



def model_dims(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[int, int, float]:
    """(hidden_size C, hc_mult G, rms_norm_eps) of a DeepSeek-V4.1 config."""
    cfg = text_config(read_hf_config(source))
    eps = _field(cfg, "rms_norm_eps")
    if not is_real(eps) or not float(eps) > 0:
        raise SpecError(f"config field rms_norm_eps={eps!r} is invalid: expected a float > 0")
    return _int(cfg, "hidden_size"), _int(cfg, "hc_mult"), float(eps)
