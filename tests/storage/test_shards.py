"""Row ranges of parts: which part owns a row at every part's edges, and the tiling check's gaps and overlaps."""

from __future__ import annotations

import numpy as np

import engram
from engram.storage.shards import ShardRange, check_ranges, owners, plan_shards

SPEC = engram.TableSpec(engram_vocab_size=(1000, 1000), max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=16,
                        layer_ids=(1, 4), compressed_vocab_size=200)


def test_owners_at_the_first_and_last_row_of_every_part():
    for parts in (1, 2, 3, 7):
        starts = np.array([p.start(1) for p in plan_shards(SPEC, parts)], np.int64)
        stops = np.array([p.ranges[1][1] for p in plan_shards(SPEC, parts)], np.int64)
        assert np.array_equal(owners(starts, starts), np.arange(parts))           # each part's first row
        assert np.array_equal(owners(starts, stops - 1), np.arange(parts))        # and its last
        rows = np.arange(SPEC.rows(1))
        assert np.array_equal(owners(starts, rows), np.repeat(np.arange(parts), stops - starts))


def _parts(spans_1):
    """Parts with the given layer 1 spans and layer 4 split evenly."""
    even = plan_shards(SPEC, len(spans_1))
    return [ShardRange(r, len(spans_1), {1: span, 4: even[r].ranges[4]}) for r, span in enumerate(spans_1)]


def test_check_ranges_names_a_one_row_gap_an_overlap_and_a_short_end():
    n = SPEC.rows(1)
    assert check_ranges(SPEC, plan_shards(SPEC, 3)) is None
    assert check_ranges(SPEC, _parts([(0, 500), (501, n)])) == "rows [500, 501) of layer 1 are in no shard (rank 1 " \
                                                                "starts at 501)"
    assert check_ranges(SPEC, _parts([(0, 500), (499, n)])) == "rows [499, 500) of layer 1 are in two shards (rank 1 " \
                                                                "among them)"
    assert check_ranges(SPEC, _parts([(0, 500), (500, n - 1)])) == f"rows [{n - 1}, {n}) of layer 1 are in no shard"
    assert check_ranges(SPEC, _parts([(1, 500), (500, n)])) == "rows [0, 1) of layer 1 are in no shard (rank 0 " \
                                                                "starts at 1)"
