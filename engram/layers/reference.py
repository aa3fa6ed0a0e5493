"""State dicts under the reference's key names (deepseek-ai/Engram `engram_demo_v1.py` `Engram`).

The reference keeps one Linear / RMSNorm per branch; EngramMemory stacks them (key_proj holds
the G key projections row-wise, key_norm / query_norm / short_conv.norm hold [G, C] weights).
Each reference key maps to a view of one EngramMemory parameter, so loading is a checked copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from engram.errors import InputError, SpecMismatchError

if TYPE_CHECKING:
    from engram.layers.memory import EngramMemory

__all__ = ["reference_state_dict", "load_reference_state_dict", "OFFSETS_KEY", "ROWS_KEY"]

ROWS_KEY = "multi_head_embedding.embedding.weight"
OFFSETS_KEY = "multi_head_embedding.offsets"


def _views(mem: EngramMemory) -> dict[str, torch.Tensor]:
    """Reference key -> the view of mem's parameter that holds it (offsets excluded)."""
    C = mem.hidden_size
    views: dict[str, torch.Tensor] = {} if mem.rows is None else {ROWS_KEY: mem.rows}
    views["short_conv.conv.weight"] = mem.short_conv.weight
    views["value_proj.weight"] = mem.value_proj.weight
    views["value_proj.bias"] = mem.value_proj.bias
    for g in range(mem.hc_mult):
        views[f"short_conv.norms.{g}.weight"] = mem.short_conv.norm.weight[g]
        views[f"key_projs.{g}.weight"] = mem.key_proj.weight[g * C:(g + 1) * C]
        views[f"key_projs.{g}.bias"] = mem.key_proj.bias[g * C:(g + 1) * C]
        views[f"norm1.{g}.weight"] = mem.key_norm.weight[g]
        views[f"norm2.{g}.weight"] = mem.query_norm.weight[g]
    return views


def _offsets(mem: EngramMemory) -> torch.Tensor:
    return torch.tensor(mem.spec.head_offsets(mem.layer_id), dtype=torch.int64)


def reference_state_dict(mem: EngramMemory) -> dict[str, torch.Tensor]:
    """mem's weights under the reference's names, as detached CPU copies."""
    sd = {key: view.detach().to("cpu", copy=True) for key, view in _views(mem).items()}
    sd[OFFSETS_KEY] = _offsets(mem)
    return dict(sorted(sd.items()))


def load_reference_state_dict(mem: EngramMemory, state_dict: Any) -> None:
    """Check `state_dict` against mem (keys, shapes, offsets), then copy it in."""
    if not hasattr(state_dict, "keys"):
        raise InputError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    views = _views(mem)
    expected = set(views) | {OFFSETS_KEY}
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        fix = "pass the state_dict of one reference Engram module (strip any prefix such as 'engram.')"
        if ROWS_KEY in unexpected and mem.rows is None:
            fix = (f"this module reads rows from a table: build one with "
                   f"engram.build_table(path, spec, comp, weights={{{mem.layer_id}: "
                   f"state_dict[{ROWS_KEY!r}]}}) and leave {ROWS_KEY!r} out")
        raise InputError(f"reference state_dict has missing keys {missing} and unexpected keys "
                         f"{unexpected}: {fix}")
    tensors = {key: torch.as_tensor(state_dict[key]) for key in sorted(expected)}
    for key, view in views.items():
        if tuple(tensors[key].shape) != tuple(view.shape):
            raise SpecMismatchError(
                f"reference state_dict[{key!r}] has shape {tuple(tensors[key].shape)}, this EngramMemory "
                f"expects {tuple(view.shape)}: build the module with the reference's spec, hidden_size "
                f"and hc_mult ({mem.extra_repr()})")
    offsets = tensors[OFFSETS_KEY]
    if offsets.shape != _offsets(mem).shape or not torch.equal(offsets.cpu().long(), _offsets(mem)):
        raise SpecMismatchError(
            f"reference state_dict[{OFFSETS_KEY!r}]={offsets.tolist()!r} differs from "
            f"spec.head_offsets({mem.layer_id})={list(mem.spec.head_offsets(mem.layer_id))!r}: the "
            "checkpoint was made for other table sizes; build the spec with its engram_vocab_size, "
            "n_head_per_ngram and layer_ids")
    with torch.no_grad():
        for key, view in views.items():
            view.copy_(tensors[key])
