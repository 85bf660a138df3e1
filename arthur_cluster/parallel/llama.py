"""Pipeline parallel Llama on mlx.core.distributed (mlx-lm has Llama's tensor split, `Model.shard`, but no pipeline).

With tied embeddings (Llama 3.2 1B/3B) every rank keeps the embedding table, since the head reuses it;
with an untied head only the first stage keeps the embedding.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

from . import stage
from .split import pipeline_split


class PipelineLlamaModel(nn.Module):
    def __init__(self, src, layer_range: range, group, keep_embeddings: bool):
        super().__init__()
        self.rank, self.size, self.group = group.rank(), group.size(), group
        self.start = layer_range.start
        self.sliding_window = src.sliding_window
        self.dtype = stage.hidden_dtype(src.embed_tokens)
        self.hidden_size = int(src.norm.weight.shape[0])
        if keep_embeddings or self.rank == self.size - 1:
            self.embed_tokens = src.embed_tokens
        self.layers = stage.local_layers(src.layers, layer_range)
        self.norm = src.norm

    @property
    def own(self) -> list:
        return self.layers[self.start:]

    def make_cache(self) -> list:
        return [RotatingKVCache(max_size=self.sliding_window) if x.use_sliding else KVCache() for x in self.own]

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        B, L = inputs.shape[:2]
        own = self.own
        if cache is None:
            cache = [None] * len(own)
        probe = mx.zeros((B, L, 1), dtype=self.dtype)  # masks only read the length
        full = next((c for x, c in zip(own, cache) if not x.use_sliding), None)
        sliding = next((c for x, c in zip(own, cache) if x.use_sliding), None)
        fa_mask = create_attention_mask(probe, full) if any(not x.use_sliding for x in own) else None
        swa_mask = (create_attention_mask(probe, sliding, window_size=self.sliding_window)
                    if any(x.use_sliding for x in own) else None)
        h = stage.receive((B, L, self.hidden_size), self.dtype, self.rank, self.size, self.group)
        if h is None:
            h = self.embed_tokens(inputs)
        for layer, c in zip(own, cache):
            h = layer(h, swa_mask if layer.use_sliding else fa_mask, cache=c)
        h = stage.hand_over(h, cache, self.rank, self.size, self.group)
        return self.norm(h)


class PipelineModel(nn.Module):
    def __init__(self, model, group, layer_range: range):
        super().__init__()
        self.args = model.args
        self.model_type = model.model_type
        tied = model.args.tie_word_embeddings
        self.model = PipelineLlamaModel(model.model, layer_range, group, keep_embeddings=tied)
        if not tied:
            self.lm_head = model.lm_head

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        out = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    @property
    def layers(self) -> list:
        return self.model.own

    def make_cache(self) -> list:
        return self.model.make_cache()


def pipeline(model, group, ranges: list[range] | None = None) -> PipelineModel:
    """This rank's stage of a lazily loaded Llama (`ranges` from registry.pipeline_split, by rank)."""
    n_layers = len(model.model.layers)
    if ranges is None:
        a = model.args
        ranges = pipeline_split({"model_type": "llama", "hidden_size": a.hidden_size,
                                 "num_attention_heads": a.num_attention_heads, "head_dim": a.head_dim,
                                 "num_key_value_heads": a.num_key_value_heads,
                                 "intermediate_size": a.intermediate_size, "num_hidden_layers": n_layers},
                                group.size())
    stage.check_ranges(ranges, group.size(), n_layers)
    return PipelineModel(model, group, ranges[group.rank()])
