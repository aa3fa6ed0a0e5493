"""Training table rows larger than RAM: rows and Adam state on disk behind a bounded row cache.

`engram.OffloadedRows` (engram.offload.rows) is the public class. The pieces, one job each:

    adam.py       the lazy SparseAdam arithmetic (shared with engram.distributed.ShardedRows)
    records.py    one row's record on disk: its values, then both Adam moments
    workdir.py    the working copy's files: identity, commit record, creation from a table
    datafile.py   the mapped file of every row's record, read and written in place
    undo.py       the undo log that makes every flush a consistent state after a crash
    keyindex.py   a vectorized hash index from row keys to slots
    cache.py      the row cache: slots, CLOCK eviction, pins
    writeback.py  the thread that writes evicted dirty rows back
    store.py      the cache over the working copy: fetch, step, flush
    snapshot.py   publishing the rows as an ordinary table
    rows.py       OffloadedRows: lookups with gradients, prefetch, step, flush, snapshot
"""
