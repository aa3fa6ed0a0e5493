"""Decoding over a sharded table: each rank's sequences continue that rank's own NgramHistory.

A history holds the look-back of the sequences one rank decodes. Their new ids are hashed on that
rank, against it, and only row ids and rows travel (`engram.distributed.exchange`), so the
history itself never leaves the rank. The first sharded lookup with a history stamps it with the
rank (`NgramHistory.decoding_rank`, the global rank in torch.distributed); a lookup with it on
another rank is refused: those are not that rank's sequences, and mixing them silently would
hash every new id against another sequence's predecessors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.distributed as dist

from engram.addressing.hashing import NgramHasher
from engram.addressing.history import NgramHistory
from engram.errors import InputError

__all__ = ["claim_history", "context_grams"]


def claim_history(history: NgramHistory, rank: int) -> None:
    """Stamp `history` as decoded by `rank`, or raise InputError if another rank stamped it."""
    owner = getattr(history, "decoding_rank", None)     # None also for a history pickled before the field
    if owner is None:
        history.decoding_rank = rank
    elif owner != rank:
        raise InputError(
            f"history holds the sequences of rank {owner} but rank {rank} looked up with it: each rank keeps the "
            "NgramHistory of its own sequences; make one on this rank (engram.NgramHistory(table.spec, "
            "table.compression, batch_size=B)), or set history.decoding_rank = None where the sequences moved here")


def context_grams(hasher: NgramHasher, x: np.ndarray, history: NgramHistory | None, mask: Any,
                  doc_start: Any) -> list[np.ndarray]:
    """The n-gram columns of this rank's compressed ids x [B, T] (see `NgramHasher.context_grams`),
    after the history, mask and doc_start are checked and the history is claimed for this rank."""
    grams = hasher.context_grams(x, history, mask, doc_start)
    if history is not None:
        claim_history(history, dist.get_rank())
    return grams
