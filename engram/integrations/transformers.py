"""Engram layers in a Hugging Face transformers causal LM, exact under `model.generate()`.

    from engram.integrations.transformers import add_engram
    model = add_engram(model, engram.open("table.engram"), at_layers=(0, 2))
    out = model.generate(input_ids, attention_mask=mask, num_beams=3)

`add_engram` puts an `EngramMemory` before each chosen decoder layer (a submodule `engram` of that
layer: its weights save and load with the model's) and feeds it the token ids: a hook on the
decoder model keeps each forward's `input_ids` and the new positions' `attention_mask` (0 =
padding: left-padded prompts), and a hook on each chosen layer adds the Engram branch to the
hidden states before the layer runs. With a cache, each Engram layer continues its `EngramCache`,
carried inside the transformers cache (`engram.integrations.hf_cache`), so greedy search,
sampling, beam search and assisted decoding (rejected drafts cropped) give the tokens of decoding
without a cache. transformers is imported by this module only (the optional extra `hf`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from engram.args import check_int
from engram.errors import InputError
from engram.integrations.hf_cache import EngramCacheState, carrier_class
from engram.layers.memory import EngramMemory
from engram.tensors import to_numpy_ids

__all__ = ["add_engram", "decoder_layers"]

_CACHE_KWARGS = ("cache", "past_key_values")       # the cache's name in forward (newer, older transformers)


class _Step:
    """The token ids [B, T] and padding flags [B, T] (or None) of the forward in progress."""

    def __init__(self, ids: np.ndarray, flags: np.ndarray | None) -> None:
        self.ids, self.flags = ids, flags


class _Hooks:
    """What the hooks of one model share: its Engram modules and the forward in progress."""

    def __init__(self, modules: dict[int, EngramMemory], max_rollback: int) -> None:
        self.modules, self.max_rollback = modules, max_rollback
        self.step: _Step | None = None

    def state_of(self, cache: Any, layer_idx: int, batch: int) -> EngramCacheState:
        """The Engram state `cache` carries, attached now if it has none yet."""
        state = getattr(cache, "engram_state", None)
        if state is None:
            held = int(cache.get_seq_length(layer_idx))
            if held:
                raise InputError(
                    f"the cache passed to the model already holds {held} positions but no Engram state: it was "
                    "filled without these Engram layers (by another model, or before add_engram); pass a fresh "
                    "cache, or none (generate() makes one)")
            layers = {i: mem.new_cache(batch, self.max_rollback) for i, mem in self.modules.items()}
            state = EngramCacheState(layers, self)
            cache.__class__ = carrier_class(type(cache))
            cache.engram_state = state
        elif state.owner is not self:
            raise InputError("the cache carries the Engram state of another model: pass each model its own cache")
        return state


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder model (whose forward takes the token ids) and its list of decoder layers."""
    get = getattr(model, "get_decoder", None)
    base = get() if callable(get) else getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return base, layers
    raise InputError(f"found no list of decoder layers (.layers, .h or .blocks) in {type(base).__name__}: "
                     "add_engram takes a decoder-only transformers causal LM (e.g. LlamaForCausalLM)")


def add_engram(model: Any, table: Any = None, at_layers: Sequence[int] | None = None, *, spec: Any = None,
               compression: Any = None, kernel_size: int = 4, max_rollback: int = 64,
               init_std: float = 0.02) -> Any:
    """Put Engram layers into a transformers causal LM before the chosen decoder layers.

    The Engram layer for `spec.layer_ids[k]` runs before decoder layer `at_layers[k]`, on its
    input hidden states, and its output is added to them (the paper's placement: before the
    block's attention). After this, `model(...)` and `model.generate(...)` need nothing more.

    Args:
        model: a decoder-only transformers model with a list of decoder layers (LlamaForCausalLM,
            MistralForCausalLM, Qwen2ForCausalLM, ...). Changed in place and returned.
        table: where the rows come from: an open table of any tier (`engram.open`), a
            `ShardedTable`, trainable `ShardedRows` / `OffloadedRows`; or None for trainable
            in-module rows, with `spec` and `compression`.
        at_layers: decoder layer indices, one per `spec.layer_ids` (default: `spec.layer_ids`).
        spec, compression: for `table=None` (default: the table's).
        kernel_size: the ShortConv's taps. init_std: in-module rows' initial standard deviation.
        max_rollback: tokens a cache can take back per step (assisted decoding's rejected drafts).

    Returns:
        `model`, with an `engram` submodule in each chosen decoder layer.

    Raises:
        InputError: no decoder layers found, Engram layers already added, `at_layers` of another
            length than `spec.layer_ids` or outside the model, `table=None` without a spec.
    """
    base, layers = decoder_layers(model)
    if any(isinstance(getattr(layer, "engram", None), nn.Module) for layer in layers):
        raise InputError("this model already has Engram layers: call add_engram once per model")
    if table is not None:
        spec, compression = table.spec, table.compression
    elif spec is None or compression is None:
        raise InputError("add_engram(model, table=None) needs spec= and compression= (in-module rows), or pass a "
                         "table (engram.open(path))")
    at = tuple(spec.layer_ids if at_layers is None else at_layers)
    if len(at) != len(spec.layer_ids) or len(set(at)) != len(at):
        raise InputError(f"at_layers={list(at)!r} must name {len(spec.layer_ids)} distinct decoder layers, one per "
                         f"spec.layer_ids={list(spec.layer_ids)}")
    for i in at:
        check_int("at_layers[i]", i, 0)
        if i >= len(layers):
            raise InputError(f"at_layers holds {i} but the model has {len(layers)} decoder layers: pass indices in "
                             f"[0, {len(layers)})")
    check_int("max_rollback", max_rollback, 0)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    weight = next(model.parameters())
    modules = {}
    for i, layer_id in zip(at, spec.layer_ids, strict=True):
        mem = EngramMemory(spec, compression, layer_id=layer_id, hidden_size=config.hidden_size,
                           kernel_size=kernel_size, table=table, init_std=init_std)
        modules[i] = mem.to(device=weight.device, dtype=weight.dtype)
        layers[i].add_module("engram", modules[i])
    hooks = _Hooks(modules, int(max_rollback))
    base.register_forward_pre_hook(functools.partial(_begin, hooks), with_kwargs=True)
    base.register_forward_hook(functools.partial(_end, hooks), always_call=True)
    for i in at:
        layers[i].register_forward_pre_hook(functools.partial(_engram_branch, hooks, i), with_kwargs=True)
    return model


def _begin(hooks: _Hooks, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Before the decoder model's forward: keep its token ids and the new positions' padding flags."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        given = "inputs_embeds" if kwargs.get("inputs_embeds") is not None else "no input_ids"
        raise InputError(f"the model was called with {given}: its Engram layers hash token ids, which cannot be "
                         "recovered from embeddings; pass input_ids (generate(input_ids=...))")
    B, T = ids.shape
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    flags = None
    if mask is not None:
        if not torch.is_tensor(mask) or mask.ndim != 2 or mask.shape[0] != B or mask.shape[1] < T:
            shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise InputError(f"attention_mask {shape} is not a [B, >= T] = [{B}, >= {T}] mask: the Engram layers "
                             "read padding from a 2-D mask (1 = token, 0 = padding); pass one")
        new = mask[:, -T:]
        flags = None if bool(new.all()) else new.detach().cpu().numpy().astype(np.bool_)   # all tokens: no flags
    hooks.step = _Step(to_numpy_ids(ids), flags)


def _end(hooks: _Hooks, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    hooks.step = None


def _engram_branch(hooks: _Hooks, layer_idx: int, module: nn.Module, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Before decoder layer `layer_idx`: hidden [B, T, C] += its Engram branch (continuing the cache's state)."""
    step = hooks.step
    if step is None:
        raise InputError(f"decoder layer {layer_idx} ran outside a forward of its model: its Engram layer gets the "
                         "token ids from the model's forward; call the model, not the layer")
    hidden = args[0] if args else kwargs["hidden_states"]
    cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    engram_cache = None
    if cache is not None:
        B, T = step.ids.shape
        state = hooks.state_of(cache, layer_idx, B)
        state.begin(step, B, step.flags, T, int(cache.get_seq_length(layer_idx)))
        engram_cache = state.layers[layer_idx]
    mem = hooks.modules[layer_idx]
    branch = mem(hidden.unsqueeze(2), step.ids, cache=engram_cache, mask=step.flags)   # [B, T, 1, C]
    hidden = hidden + branch.squeeze(2)                                                # [B, T, C]
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
