"""What a table conversion does to a model, not only to its rows: the KL / NLL quality gate.

A row error (`engram.convert`'s report) is not a model error: a model may be insensitive to some
rows and very sensitive to others. `compare` runs a model twice on the same token batches, once
reading its Engram rows from `table_a` (the source) and once from `table_b` (the conversion), and
compares the two next-token distributions at every position, as llama.cpp's perplexity tool does
with `--kl-divergence`:

- KL divergence `KL(P_a || P_b) = sum_v P_a(v) (log P_a(v) - log P_b(v))` in nats, per position;
  its mean, 99th percentile and maximum;
- the mean negative log-likelihood of the actual next token under each table, and its change
  `delta_nll = nll_b - nll_a` (exp(delta_nll) is the perplexity ratio);
- top-1 agreement: the share of positions where both pick the same most likely token.

Positions are 0..T-2 of each batch [B, T]: position t predicts token t+1 of the batch.

`kl_gate` turns this into a gate for `engram.convert(..., accept=)`: the converted table is
compared with its source before it is published, and refused (QualityGateError) when the mean KL
exceeds a threshold, so nothing is written.

Example:
    >>> def model_fn(ids, table):          # ids [B, T] -> logits [B, T, V], rows read from `table`
    ...     return model_reading(table)(ids)
    >>> report = engram.quality.compare(model_fn, batches, engram.open("f32.engram"), engram.open("int4.engram"))
    >>> report.kl_mean, report.delta_nll, report.top1_agreement
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engram.errors import InputError, QualityGateError, SpecMismatchError

__all__ = ["QualityReport", "compare", "kl_gate", "KLGate", "text_batches"]

ModelFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class QualityReport:
    """The difference between a model reading `table_a` and the same model reading `table_b`.

    Attributes:
        positions: next-token predictions compared (B * (T - 1) per batch).
        kl_mean, kl_p99, kl_max: KL(P_a || P_b) per position, in nats: mean, 99th percentile, max.
        nll_a, nll_b: mean negative log-likelihood of the next token (nats) with each table.
        delta_nll: nll_b - nll_a (> 0: table_b predicts worse).
        top1_agreement: share of positions whose most likely token is the same with both tables.
    """

    positions: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    nll_a: float
    nll_b: float
    delta_nll: float
    top1_agreement: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return dataclasses.asdict(self)


def check_same_rows(table_a: Any, table_b: Any) -> None:
    """Refuse two tables that do not address the same rows (other spec fields or compression)."""
    for name, t in (("table_a", table_a), ("table_b", table_b)):
        if not hasattr(t, "spec") or not hasattr(t, "compression"):
            raise InputError(f"{name} must be an open engram table, got {type(t).__name__}: pass engram.open(path)")
    fields = table_a.spec.row_fields_differ(table_b.spec)
    if fields or table_a.compression.fingerprint != table_b.compression.fingerprint:
        what = f"spec fields {fields}" if fields else "compression"
        raise SpecMismatchError(
            f"table_a and table_b differ in {what}: the gate compares a table with a conversion of itself "
            "(the same rows in another dtype); pass the source table and its engram.convert output")


def compare(model_fn: ModelFn, batches: Iterable[Any], table_a: Any, table_b: Any) -> QualityReport:
    """Compare a model's next-token distributions with its rows read from `table_a` and from `table_b`.

    Args:
        model_fn: `model_fn(token_ids, table) -> logits`: token ids int64 [B, T] (CPU) and an open
            table to read the Engram rows from; logits [B, T, V] (any float dtype and device).
        batches: token-id batches [B, T] (T >= 2; numpy arrays or tensors), each run with both tables.
        table_a: the reference (source) table.
        table_b: the table under test (a conversion of `table_a`).

    Returns:
        A QualityReport (see the module docstring for the definitions).

    Raises:
        SpecMismatchError: the tables do not hold the same rows (other spec fields or compression).
        InputError: no batches, a batch that is not [B, T >= 2] ints, or logits of the wrong shape.
    """
    check_same_rows(table_a, table_b)
    kl, nll_a, nll_b, agree = [], [], [], []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            ids = _ids(batch, i)
            lp_a = _log_probs(model_fn(ids, table_a), ids, "table_a", i)          # [B, T-1, V]
            lp_b = _log_probs(model_fn(ids, table_b), ids, "table_b", i)
            target = ids[:, 1:].unsqueeze(2).to(lp_a.device)                       # [B, T-1, 1]
            kl.append((lp_a.exp() * (lp_a - lp_b)).sum(dim=2).clamp_(min=0).flatten().cpu())
            nll_a.append(-lp_a.gather(2, target).flatten().cpu())
            nll_b.append(-lp_b.gather(2, target).flatten().cpu())
            agree.append((lp_a.argmax(dim=2) == lp_b.argmax(dim=2)).flatten().cpu())
    if not kl:
        raise InputError("batches is empty: pass at least one [B, T] batch of token ids")
    k = torch.cat(kl).double()
    a, b = torch.cat(nll_a).double().mean().item(), torch.cat(nll_b).double().mean().item()
    return QualityReport(positions=k.numel(), kl_mean=k.mean().item(), kl_p99=torch.quantile(k, 0.99).item(),
                         kl_max=k.max().item(), nll_a=a, nll_b=b, delta_nll=b - a,
                         top1_agreement=torch.cat(agree).double().mean().item())


def _ids(batch: Any, i: int) -> torch.Tensor:
    ids = torch.from_numpy(np.asarray(batch)) if not isinstance(batch, torch.Tensor) else batch.cpu()
    if ids.dim() != 2 or ids.shape[1] < 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InputError(f"batches[{i}] must be token ids shaped [B, T] with T >= 2, got shape "
                         f"{tuple(ids.shape)} of {ids.dtype}: cut the text into windows of at least 2 tokens")
    return ids.long()


def _log_probs(logits: Any, ids: torch.Tensor, name: str, i: int) -> torch.Tensor:
    B, T = ids.shape
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (B, T):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"model_fn(batches[{i}], {name}) must return logits [B, T, V] = [{B}, {T}, V], got {got}")
    if int(ids.max()) >= logits.shape[2] or int(ids.min()) < 0:
        raise InputError(f"batches[{i}] holds token ids outside [0, {logits.shape[2]}), the logits' vocabulary: "
                         "tokenize the text with the model's own tokenizer")
    return F.log_softmax(logits[:, :-1].float(), dim=2)


class KLGate:
    """`convert(..., accept=gate)`: refuses a conversion whose mean KL exceeds `max_kl`.

    Attributes:
        report: the QualityReport of the last conversion judged (None before).
    """

    def __init__(self, model_fn: ModelFn, batches: Sequence[Any], max_kl: float) -> None:
        if not isinstance(max_kl, (int, float)) or isinstance(max_kl, bool) or not max_kl >= 0:
            raise InputError(f"max_kl={max_kl!r} is invalid: expected a float >= 0 (mean KL in nats, e.g. 0.01)")
        self.model_fn, self.batches, self.max_kl = model_fn, list(batches), float(max_kl)
        self.report: QualityReport | None = None

    def __call__(self, converted: Any, source: Any) -> None:
        self.report = compare(self.model_fn, self.batches, source, converted)
        if not self.report.kl_mean <= self.max_kl:
            raise QualityGateError(
                f"the {converted.spec.dtype} conversion moves the model's next-token distribution by a mean KL of "
                f"{self.report.kl_mean:.4g} nats (p99 {self.report.kl_p99:.4g}, delta NLL "
                f"{self.report.delta_nll:+.4g}), above max_kl={self.max_kl!r}: nothing was written; keep a wider "
                "dtype (int8, float8_e4m3), a smaller scale_block, or raise max_kl")


def kl_gate(model_fn: ModelFn, batches: Sequence[Any], max_kl: float) -> KLGate:
    """A gate for `engram.convert(src, dst, dtype=..., accept=gate)` that refuses (QualityGateError,
    nothing written) a conversion whose mean KL against the source exceeds `max_kl` nats.

    Example:
        >>> gate = engram.quality.kl_gate(model_fn, batches, max_kl=0.01)
        >>> engram.convert("f32.engram", "int4.engram", dtype="int4", accept=gate); gate.report.kl_mean
    """
    return KLGate(model_fn, batches, max_kl)


def text_batches(token_ids: Any, window: int = 128, batch_size: int = 8, max_tokens: int | None = None
                 ) -> list[torch.Tensor]:
    """Cut a token stream into batches of consecutive, non-overlapping windows [B, window].

    Args:
        token_ids: 1-D ints (a tokenized held-out text).
        window: tokens per sequence (T, >= 2; at most the model's context).
        batch_size: sequences per batch (the last batch may hold fewer).
        max_tokens: use at most this many tokens (None: all whole windows).

    Raises:
        InputError: bad arguments, or fewer tokens than one window.
    """
    ids = np.asarray(token_ids).reshape(-1).astype(np.int64)
    for name, value, low in (("window", window, 2), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{name}={value!r} is invalid: expected an int >= {low}")
    n = ids.size // window if max_tokens is None else min(ids.size, max_tokens) // window
    if n < 1:
        raise InputError(f"{ids.size} tokens (max_tokens={max_tokens!r}) make no window of {window}: "
                         "give a longer text or a smaller window")
    rows = torch.from_numpy(ids[: n * window].reshape(n, window).copy())
    return [rows[i: i + batch_size] for i in range(0, n, batch_size)]

