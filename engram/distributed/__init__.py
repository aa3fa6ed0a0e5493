"""Row-sharded tables over torch.distributed: lookups and training with each rank holding a part.

    st = engram.distributed.ShardedTable(path_of_this_rank, group=None, tier="mmap")
    e = st.lookup(token_ids, layer_id)           # == the whole table's lookup of this rank's ids
    rows = engram.distributed.ShardedRows(path_of_this_rank, lr=1e-3)   # trainable: table=rows in
    rows.step(); rows.save(prefix); engram.distributed.ShardedRows.load(prefix)   # EngramMemory

See `engram.storage.shards` for how a table is split, `engram.making.sharding.shard_table` (`engram shard`) to
split one, and `engram.build_table(..., shard=(r, W))` (`engram build --shard r/W`) to build a part.
"""

from __future__ import annotations

from engram.distributed.rows import ShardedRows as ShardedRows
from engram.distributed.table import ShardedTable as ShardedTable

__all__ = ["ShardedRows", "ShardedTable"]
