"""Pieces every pipeline stage shares: the hand-over between stages and the tie of that hand-over into the cache.

mlx evaluates lazily. During prefill only the caches are evaluated, so a stage's send must hang off one of its
caches or it never runs and the next stage waits forever. A stage that holds no cached layer (only MoE or MLP
layers) gets one small `LinkCache` for that purpose.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

from .split import ShardingError


class LinkCache(ArraysCache):
    """A one-slot cache that only carries the stage's hand-over in the graph."""

    def __init__(self):
        super().__init__(size=1)


def hidden_dtype(embedding) -> mx.Dtype:
    """The dtype an embedding layer produces (a quantized one produces its scales' dtype)."""
    return embedding.scales.dtype if "scales" in embedding else embedding.weight.dtype


def receive(h_shape, dtype, rank: int, size: int, group) -> mx.array | None:
    """The hidden state from the previous stage (rank+1), or None on the first stage."""
    if rank < size - 1:
        return mx.distributed.recv(h_shape, dtype, rank + 1, group=group)
    return None


def hand_over(h: mx.array, cache, rank: int, size: int, group) -> mx.array:
    """Send to the next stage (rank-1), tie into the cache, and give every rank the last stage's output."""
    if rank != 0:
        h = mx.distributed.send(h, rank - 1, group=group)
    if cache:
        tie(cache[-1], h)
    if size > 1:
        h = mx.distributed.all_gather(h, group=group)[: h.shape[0]]
    return h


def tie(c, h: mx.array) -> None:
    if getattr(c, "keys", None) is not None and not isinstance(c, ArraysCache):
        c.keys = mx.depends(c.keys, h)
    elif isinstance(c, ArraysCache):
        slot = c[0] if c[0] is not None else mx.zeros((1,), dtype=h.dtype)
        c[0] = mx.depends(slot, h)


def local_layers(layers: list, ranges_for_rank: range) -> list:
    """The model's layer list with only this rank's layers kept: earlier ones become None (their weights are
    never evaluated, so a lazily loaded rank never reads them) and later ones are dropped."""
    kept = list(layers[: ranges_for_rank.stop])
    kept[: ranges_for_rank.start] = [None] * ranges_for_rank.start
    return kept


def check_ranges(ranges: list[range], size: int, n_layers: int) -> None:
    if len(ranges) != size:
        raise ShardingError(f"{len(ranges)} layer ranges for {size} ranks")
    covered = sorted((r.start, r.stop) for r in ranges)
    pos = 0
    for start, stop in covered:
        if start != pos or stop <= start:
            raise ShardingError(f"layer ranges {[(r.start, r.stop) for r in ranges]} must be non-empty and "
                                f"cover layers 0..{n_layers - 1} without gaps")
        pos = stop
    if pos != n_layers:
        raise ShardingError(f"layer ranges cover {pos} of {n_layers} layers")
    for r in range(size - 1):  # rank n-1 holds the first layers
        if ranges[r].start != ranges[r + 1].stop:
            raise ShardingError("rank r+1 must hold the layers just before rank r's (rank n-1 holds the first)")
