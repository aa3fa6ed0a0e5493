"""Shared pieces of the offload tests: small tables, cache sizes in rows, and the in-memory reference
(in-module rows trained with torch.optim.SparseAdam) that offloaded training must equal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import engram
from engram.offload.records import RecordLayout
from engram.offload.store import cache_bytes_for

VOCAB = 300
COMP = engram.Compression.identity(VOCAB)
LAYERS = (1, 3)


def make_spec(dtype: str = "float32", D: int = 8, base: int = 2000) -> engram.TableSpec:
    return engram.TableSpec(engram_vocab_size=(base, base + 100), max_ngram_size=3, n_head_per_ngram=2,
                            n_embed_per_ngram=2 * D, layer_ids=LAYERS, compressed_vocab_size=VOCAB, dtype=dtype)


def make_table(path: Path, dtype: str = "float32", **spec_args) -> engram.Table:
    return engram.build_table(path, make_spec(dtype, **spec_args), COMP, seed=3)


def cache_for(rows: int, spec: engram.TableSpec, rows_dtype: str = "float32") -> int:
    """cache_bytes of a cache holding `rows` rows of `spec`."""
    return cache_bytes_for(rows, RecordLayout(spec.head_dim, rows_dtype))


def batch(step: int, shape: tuple[int, int] = (3, 12)) -> np.ndarray:
    """The token ids of step `step` (deterministic)."""
    return np.random.default_rng([step, 11]).integers(0, VOCAB, shape)


def all_rows(table: engram.Table) -> dict[int, torch.Tensor]:
    return {lid: table.rows(lid, np.arange(table.spec.rows(lid)), dtype=torch.float32) for lid in table.spec.layer_ids}


def working_rows(rows: engram.OffloadedRows) -> dict[str, dict[int, torch.Tensor]]:
    """The rows and moments a working copy holds on disk (flush first), as float32 [rows, D] per layer."""
    ident, data = rows._copy.ident, rows._store.data
    out: dict[str, dict[int, torch.Tensor]] = {"rows": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for lid, base in ident.bases.items():
        lo, hi = ident.ranges[lid]
        records = data.span(base, base + hi - lo)
        out["rows"][lid] = ident.layout.values(records).to(torch.float32)
        moments = ident.layout.moments(records)
        D = ident.spec.head_dim
        out["exp_avg"][lid], out["exp_avg_sq"][lid] = moments[:, :D].clone(), moments[:, D:].clone()
    return out


class Reference:
    """Every row in memory, trained by torch.optim.SparseAdam on the rows a step touched.

    `bf16`: rows are rounded to bfloat16 after every step (what a bfloat16 working copy stores).
    """

    def __init__(self, table: engram.Table, lr: float, bf16: bool = False) -> None:
        self.spec, self.bf16 = table.spec, bf16
        self.hasher = engram.NgramHasher(table.spec, table.compression)
        self.rows = {lid: torch.nn.Parameter(r.clone()) for lid, r in all_rows(table).items()}
        self.opt = torch.optim.SparseAdam(list(self.rows.values()), lr=lr)

    def lookup(self, ids: np.ndarray, layer_id: int) -> torch.Tensor:
        idx = torch.from_numpy(self.hasher.global_rows(ids, layer_id))                  # [B, T, H]
        return torch.nn.functional.embedding(idx, self.rows[layer_id]).flatten(2)       # [B, T, E]

    def step(self, used: dict[int, list[np.ndarray]]) -> None:
        """SparseAdam on the rows `used[layer]` (the ids of the step's lookups) touched."""
        for lid, batches in used.items():
            param = self.rows[lid]
            touched = torch.from_numpy(np.unique(np.concatenate(
                [self.hasher.global_rows(ids, lid).ravel() for ids in batches])))
            param.grad = torch.sparse_coo_tensor(touched[None], param.grad[touched], param.shape,
                                                 check_invariants=True)
        self.opt.step()
        self.opt.zero_grad()
        if self.bf16:
            with torch.no_grad():
                for param in self.rows.values():
                    param.copy_(param.bfloat16().float())

    def moments(self, name: str) -> dict[int, torch.Tensor]:
        return {lid: self.opt.state[p][name] if p in self.opt.state else torch.zeros_like(p)
                for lid, p in self.rows.items()}
