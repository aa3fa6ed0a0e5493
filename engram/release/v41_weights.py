"""The weights of a DeepSeek-V4.1 Engram layer, read from its checkpoint: wkv, q_weight, k_weight.

`wkv.weight` is FP8 E4M3 [C*(G+1), H*D] with one E8M0 scale per 32x32 block (`wkv.scale`,
[C*(G+1)/32, H*D/32]; Hugging Face conversions call it `wkv.weight_scale_inv`): the dequantized
weight is `fp8(w[i, j]) * 2**(e[i // 32, j // 32] - 127)`, computed exactly in float32 and rounded
once to the module's dtype. A float32 or bfloat16 scale tensor of the same shape (what some
conversions store) multiplies directly. `q_weight` and `k_weight` are BF16 [G, C].
"""

from __future__ import annotations

import os

import numpy as np
import torch

from engram.errors import CorruptTableError
from engram.release.folder import ReleaseCheckpoint
from engram.storage.safetensors_header import TensorRange
from engram.storage.tabledir import TableDir

__all__ = ["read_tensor", "dequantize_blocks", "read_layer_weights", "WKV_BLOCK"]

WKV_BLOCK = 32    # rows and columns per E8M0 scale of wkv
_TORCH = {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.uint8, "U8": torch.uint8, "BF16": torch.bfloat16,
          "F16": torch.float16, "F32": torch.float32}


def read_tensor(directory: str | os.PathLike[str], t: TensorRange) -> torch.Tensor:
    """One tensor, read from its byte range (E8M0 scales as uint8 exponent bytes)."""
    if t.dtype not in _TORCH:
        raise CorruptTableError(f"tensor {t.name!r} in {t.file!r} has dtype {t.dtype}: expected one of "
                                f"{sorted(_TORCH)}")
    path = os.path.join(directory, t.file)
    buf = np.empty(t.nbytes, np.uint8)                   # read once, straight into the tensor's memory
    with TableDir(directory, checkpoint=True) as tdir:
        fd = tdir.open(t.file)                           # as every file of the folder: no link, no FIFO
    try:
        got = 0
        while got < t.nbytes:
            n = os.preadv(fd, [buf.data[got:]], t.offset + got)
            if n == 0:
                break
            got += n
    finally:
        os.close(fd)
    if got != t.nbytes:
        raise CorruptTableError(f"checkpoint shard {path!r} ended inside tensor {t.name!r}: the file was truncated; "
                                "download it again")
    return torch.from_numpy(buf).view(_TORCH[t.dtype]).view(t.shape)


def dequantize_blocks(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                      block: int = WKV_BLOCK) -> torch.Tensor:
    """FP8 values [R, K] times one scale per `block` x `block` block ([ceil(R/block), ceil(K/block)]).

    Scales are E8M0 exponent bytes (uint8: 2**(e - 127)) or float multipliers. The product is
    exact in float32 and rounded once to `dtype`.
    """
    R, K = values.shape
    if scales.dtype == torch.uint8:
        if bool((scales == 255).any()):
            raise CorruptTableError("an E8M0 block scale is 255 (NaN): the checkpoint is damaged; download it again")
        factor = torch.exp2(scales.to(torch.float32) - 127.0)
    else:
        factor = scales.to(torch.float32)
    full = factor.repeat_interleave(block, 0)[:R].repeat_interleave(block, 1)[:, :K]     # [R, K]
    return (values.to(torch.float32) * full).to(dtype)


def _shape(t: TensorRange, shape: tuple[int, ...], where: str) -> TensorRange:
    if t.shape != shape:
        raise CorruptTableError(f"checkpoint {where!r}: tensor {t.name!r} in {t.file!r} has shape {list(t.shape)}, "
                                f"but config.json gives {list(shape)}: the shard or config.json is altered or from "
                                "another model; download them again")
    return t


def read_layer_weights(release: ReleaseCheckpoint, layer_id: int, hidden_size: int, hc_mult: int,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{"wkv.weight", "q_weight", "k_weight"} of one layer, in `dtype` (wkv dequantized).

    Raises:
        CorruptTableError: a missing tensor, or one whose shape does not fit the config.
    """
    where, C, G, E = os.fspath(release.path), hidden_size, hc_mult, release.spec.embed_dim
    blocks = (-(-C * (G + 1) // WKV_BLOCK), -(-E // WKV_BLOCK))
    wkv = read_tensor(release.path, _shape(release.tensor(layer_id, "wkv.weight"), (C * (G + 1), E), where))
    if wkv.dtype == torch.float8_e4m3fn:                   # as released; conversions may store it widened
        scale = read_tensor(release.path, _shape(release.scale_of(layer_id, "wkv.weight"), blocks, where))
        wkv = dequantize_blocks(wkv, scale, dtype)
    out = {"wkv.weight": wkv.to(dtype)}
    for name in ("q_weight", "k_weight"):
        out[name] = read_tensor(release.path, _shape(release.tensor(layer_id, name), (G, C), where)).to(dtype)
    return out
