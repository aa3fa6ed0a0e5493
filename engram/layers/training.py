"""Training helpers: optimizer parameter groups and the export of trained rows.

The paper trains Engram table rows with Adam at 5x the base learning rate and no weight decay
(DESIGN.md "The algorithm", step 6). The multiplier assumes an adaptive optimizer (Adam/AdamW),
whose step size does not scale with the gradient: rows are touched only by the n-grams present
in a batch, so their gradients are sparse and small, and a larger step lets them keep up.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engram.args import check_real
from engram.errors import InputError
from engram.layers.memory import EngramMemoryBase

__all__ = ["param_groups", "export_rows", "ENGRAM_LR_MULT"]

ENGRAM_LR_MULT = 5.0
# Modules whose weights are scales, not projections: no weight decay by default.
_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, *,
                 engram_lr_mult: float = ENGRAM_LR_MULT,
                 decay_norms_and_biases: bool = False) -> list[dict[str, Any]]:
    """Optimizer parameter groups with Engram rows apart, for torch.optim.Adam / AdamW.

    Groups (each a dict with "name", "params", "lr", "weight_decay"; empty groups left out):
    - "engram_rows": the `rows` of every Engram layer in `model` (EngramMemory, EngramMemoryV41):
      lr * engram_lr_mult, no decay.
    - "decay": every other trainable parameter: lr, weight_decay.
    - "no_decay": biases and normalization weights (nn.LayerNorm, nn.RMSNorm, GroupNorm,
      BatchNorm, Engram's own norms and gate weights): lr, no decay (as nanoGPT/GPT-2). With
      `decay_norms_and_biases=True` they join "decay" instead.
    Frozen parameters (requires_grad=False) are left out; shared parameters appear once.

    Args:
        model: any nn.Module holding zero or more Engram layers.
        lr: the base learning rate.
        weight_decay: decoupled weight decay of the "decay" group (AdamW's meaning).
        engram_lr_mult: learning-rate multiplier of the Engram rows (5 in the paper).
        decay_norms_and_biases: put biases and norm weights in "decay" too.

    Example:
        >>> opt = torch.optim.AdamW(engram.param_groups(model, lr=3e-4, weight_decay=0.1),
        ...                         betas=(0.9, 0.95))
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("engram_lr_mult", engram_lr_mult)):
        check_real(name, value, 0)
    groups: dict[str, list[nn.Parameter]] = {"engram_rows": [], "decay": [], "no_decay": []}
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            engram_module = module if isinstance(module, EngramMemoryBase) else None
            if engram_module is not None and pname == "rows":
                groups["engram_rows"].append(p)
            elif not decay_norms_and_biases and (pname == "bias" or _is_norm(module) or
                                                 (engram_module is not None and pname in engram_module.scale_names)):
                groups["no_decay"].append(p)
            else:
                groups["decay"].append(p)
    settings = {"engram_rows": (lr * engram_lr_mult, 0.0), "decay": (lr, weight_decay), "no_decay": (lr, 0.0)}
    return [{"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
            for name, params in groups.items() if params]


def _is_norm(module: nn.Module) -> bool:
    from engram.layers.norm import BranchRMSNorm

    return isinstance(module, (*_NORMS, BranchRMSNorm))


def export_rows(model: nn.Module) -> dict[int, torch.Tensor]:
    """The trained rows of every in-module Engram layer in `model`, by layer id (CPU copies).

    All of them must share one spec; pass the result to build_table to get one table for all.

    Example:
        >>> mem = next(m for m in model.modules() if isinstance(m, engram.EngramMemory))
        >>> engram.build_table(path, mem.spec, mem.comp, weights=engram.export_rows(model))
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    mems = [m for m in model.modules() if isinstance(m, EngramMemoryBase) and m.rows is not None]
    rows: dict[int, torch.Tensor] = {}
    for mem in mems:
        if mem.spec != mems[0].spec or mem.comp != mems[0].comp:
            raise InputError(
                f"EngramMemory layers {mems[0].layer_id} and {mem.layer_id} use different specs or "
                "compressions, so their rows cannot form one table: export each with mem.export_rows()")
        if mem.layer_id in rows:
            raise InputError(
                f"two EngramMemory modules read layer_id={mem.layer_id}: give each its own layer id "
                "or export them separately with mem.export_rows()")
        rows[mem.layer_id] = mem.export_rows()
    return rows
