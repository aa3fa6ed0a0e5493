"""The gate model of a tiny LM checkpoint (`tools/train_tiny.py --save DIR` copies this file there
as engram_gate.py, beside tiny_lm.py, config.json and model.pt).

`engram quality` and `engram convert --max-kl` import DIR/engram_gate.py and call `load(DIR)`,
which returns `model_fn(token_ids [B, T], table) -> logits [B, T, V]`: the model with its Engram
rows read from `table` (the checkpoint's own table or a conversion of it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def load(directory: str | Path) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The checkpoint's model as a function of the token ids and the table its Engram layers read."""
    directory = Path(directory)
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))           # its tiny_lm.py
    from tiny_lm import TinyLM, TinyLMConfig

    fields = json.loads((directory / "config.json").read_text())
    config = TinyLMConfig(**{**fields, "engram_layers": tuple(fields["engram_layers"])})
    state = torch.load(directory / "model.pt", weights_only=True)
    model: list[Any] = []                            # built on the first call, with that call's table

    def model_fn(token_ids: torch.Tensor, table: Any) -> torch.Tensor:
        if not model:
            m = TinyLM(config, table.compression, table=table)
            m.load_state_dict(state)
            model.append(m.eval())
        for mem in model[0].engram_modules():
            mem.table = table                        # the same rows, as stored in this table
        with torch.no_grad():
            logits, _ = model[0](token_ids)
        return logits

    return model_fn
