"""The checks at an Engram layer's boundary: its table, its forward arguments, a prefetch handle.

They run once per call, before any work, so that `forward` itself reads as the computation; every
failure is an InputError or SpecMismatchError that names the argument, the value and the fix.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.errors import InputError, SpecMismatchError
from engram.serving.prefetch import Prefetch
from engram.tensors import check_ids_2d, is_torch

if TYPE_CHECKING:
    from engram.layers.memory import EngramMemoryBase

__all__ = ["check_layer_inputs", "check_table", "prefetched_rows", "table_path"]


def table_path(table: Any) -> str | None:
    """The path of the table a layer reads, or None (in-module rows, or a source without one)."""
    path = getattr(table, "path", None)
    return None if path is None else os.fspath(path)


def check_table(table: Any, spec: TableSpec, comp: Compression, owner: str) -> None:
    """Raise unless `table` was built for `spec` (its row encoding aside) and `comp`."""
    if not (hasattr(table, "lookup") and isinstance(getattr(table, "spec", None), TableSpec)):
        raise InputError(f"table={table!r} is not an engram table: pass engram.open(path) or None")
    path = table_path(table)
    differ = table.spec.row_fields_differ(spec)
    if differ:
        fields = ", ".join(f"{n}={getattr(table.spec, n)!r} (module: {getattr(spec, n)!r})" for n in differ)
        raise SpecMismatchError(
            f"table at {path!r} was built for another spec: {fields}: build the module with "
            f"spec=table.spec ({owner}.from_table) or open the table built for this spec")
    if table.compression != comp:
        raise SpecMismatchError(
            f"table at {path!r} was built with another compression (fingerprint "
            f"{table.compression.fingerprint!r}, module: {comp.fingerprint!r}): build the module with "
            f"comp=table.compression ({owner}.from_table) or open the table built for this tokenizer")


def prefetched_rows(mem: EngramMemoryBase, handle: Prefetch) -> torch.Tensor:
    """The layer's rows [B, T, E] from `handle`, a prefetch of the table `mem` reads."""
    name = type(mem).__name__
    if mem.table is None:
        raise InputError(
            f"this {name} keeps its rows in the module (table=None), so a prefetch handle cannot "
            "supply them (table rows get no gradient): pass token_ids, or build the module with table=")
    theirs, ours = handle.table_path, table_path(mem.table)
    if theirs is not None and ours is not None and os.path.realpath(theirs) != os.path.realpath(ours):
        raise InputError(
            f"the prefetch handle holds rows of the table at {os.fspath(theirs)!r} but this {name} reads "
            f"{ours!r}: prefetch from the table this module reads (mem.table.prefetch(token_ids))")
    if mem.layer_id not in handle.layer_ids:
        raise InputError(
            f"the prefetch handle holds layers {handle.layer_ids} but this {name} reads layer "
            f"{mem.layer_id}: pass layer_ids=None (all layers) or include {mem.layer_id} in table.prefetch")
    rows = handle.result(mem.layer_id)
    weight_dtype = mem.compute_dtype
    if rows.dtype not in (weight_dtype, mem.table.dtype):      # the module's dtype, or the rows as stored
        raise InputError(
            f"the prefetched rows are {rows.dtype} but this {name} computes in {weight_dtype} and the "
            f"table stores {mem.table.dtype}: prefetch with dtype={weight_dtype} (or the default)")
    if rows.ndim != 3 or rows.shape[-1] != mem.embed_dim:
        raise InputError(
            f"the prefetched rows have shape {tuple(rows.shape)}, expected [B, T, {mem.embed_dim}]: "
            "prefetch from the table this module reads (mem.table.prefetch(token_ids))")
    return rows


def check_layer_inputs(mem: EngramMemoryBase, hidden_states: Any,
                       token_ids: Any) -> tuple[tuple[int, int, int, int], torch.Tensor | None]:
    """Raise InputError unless forward's arguments fit `mem`.

    Returns (B, T, G, C) and, when `token_ids` is a prefetch handle, its rows (collected once here,
    so forward does not resolve the handle again); None for token ids.
    """
    name = type(mem).__name__
    if not isinstance(hidden_states, torch.Tensor) or not hidden_states.is_floating_point():
        is_tensor = isinstance(hidden_states, torch.Tensor)
        got = hidden_states.dtype if is_tensor else type(hidden_states).__name__
        raise InputError(f"hidden_states must be a floating-point torch.Tensor, got {got}: "
                         "pass the model's hidden states")
    shape = tuple(hidden_states.shape)
    if len(shape) != 4:
        raise InputError(
            f"hidden_states must be shaped [B, T, G, C] (batch, positions, hc_mult, hidden_size), "
            f"got shape {shape}: for a dense model (hc_mult=1) pass hidden.unsqueeze(2)")
    B, T, G, C = shape
    if (G, C) != (mem.hc_mult, mem.hidden_size):
        raise InputError(
            f"hidden_states has shape {shape} (hc_mult G={G}, hidden_size C={C}) but this "
            f"{name} has hc_mult={mem.hc_mult}, hidden_size={mem.hidden_size}: pass "
            f"hidden states shaped [B, T, {mem.hc_mult}, {mem.hidden_size}] or build the module "
            f"with hc_mult={G}, hidden_size={C}")
    if T == 0:
        raise InputError(f"hidden_states has shape {shape}, with no positions (T=0): pass at least one position")
    dtype, param_device = mem.compute_dtype, mem.compute_device
    if hidden_states.dtype != dtype and not torch.is_autocast_enabled(hidden_states.device.type):
        raise InputError(
            f"hidden_states has dtype {hidden_states.dtype} but this {name} computes in {dtype}: pass "
            f"hidden_states.to({dtype}), convert the module with mem.to({hidden_states.dtype}), "
            "or run under torch.autocast")
    if hidden_states.device != param_device:
        raise InputError(
            f"hidden_states is on device {hidden_states.device} but this {name} is on "
            f"{param_device}: move the module with mem.to({str(hidden_states.device)!r})")
    if isinstance(token_ids, Prefetch):
        rows = prefetched_rows(mem, token_ids)
        if tuple(rows.shape[:2]) != (B, T):
            raise InputError(
                f"the prefetched rows have [B, T] = {tuple(rows.shape[:2])} but hidden_states has {(B, T)}: "
                "prefetch the token ids of the same batch and positions as the hidden states")
        return (B, T, G, C), rows
    if is_torch(token_ids) and token_ids.device.type != "cpu" and token_ids.device != param_device:
        raise InputError(
            f"token_ids is on device {token_ids.device} but hidden_states is on "
            f"{hidden_states.device}: pass the ids on {hidden_states.device} or on the CPU "
            "(hashing runs on the host)")
    if not hasattr(token_ids, "shape"):
        token_ids = np.asarray(token_ids)
    check_ids_2d(token_ids)
    if tuple(token_ids.shape) != (B, T):
        raise InputError(
            f"token_ids has shape {tuple(token_ids.shape)} but hidden_states has [B, T] = {(B, T)}: "
            "pass the token ids of the same batch and positions as the hidden states")
    return (B, T, G, C), None
