"""Pipeline and tensor parallel NemotronH (Mamba2 'M', MoE 'E', attention '*', MLP '-') on mlx.core.distributed.

mlx-lm's NemotronH has neither `shard()` nor `pipeline()`; both live here, on top of mlx-lm's own layer classes.

Tensor split, per layer type:
- attention: query and KV heads split (column-split q/k/v), o_proj row-split and summed across ranks;
- Mamba2 mixer: split by whole groups and their heads. The packed in_proj output [z | x | B | C | dt] is cut
  section by section so each rank gets the z, x, B, C, dt of its own heads and groups; conv1d channels [x | B | C]
  likewise; dt_bias, A_log, D and the gated norm's weight by head. The gated norm normalises per group, and a
  rank holds whole groups, so it stays local. out_proj is row-split and summed;
- MoE: each rank holds a contiguous subset of the routed experts (whole experts) and a slice of the shared
  expert. The router runs on every rank; each rank gathers the (token, expert) picks it owns and runs only
  those, so at n ranks each computes about 1/n of the routed work, and adds its weighted outputs back per token.
  Whole experts rather than a slice of each expert's width because a width slice must hold whole quantization
  groups: the real model's moe_intermediate_size 1856 split two ways is 928, not a multiple of 64, while its 128
  experts divide by 2, 4 and 8. Routed and shared partial sums meet in one all_sum per MoE layer. Which picks a
  rank owns is known only once the router has run, so each MoE layer reads the picks back to the host (one sync
  per layer).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx_lm.models.base import create_attention_mask, create_ssm_mask
from mlx_lm.models.cache import ArraysCache, KVCache

from . import stage
from .split import ShardingError, pipeline_split, tensor_blockers

# --- pipeline ------------------------------------------------------------------------------------------


class PipelineBackbone(nn.Module):
    """This rank's slice of NemotronH's backbone: embeddings on the first stage only, its layers, norm_f."""

    def __init__(self, src, layer_range: range, group):
        super().__init__()
        self.rank, self.size, self.group = group.rank(), group.size(), group
        self.start = layer_range.start
        self.dtype = stage.hidden_dtype(src.embeddings)
        self.hidden_size = int(src.norm_f.weight.shape[0])
        if self.rank == self.size - 1:
            self.embeddings = src.embeddings
        self.layers = stage.local_layers(src.layers, layer_range)
        self.norm_f = src.norm_f

    @property
    def own(self) -> list:
        return self.layers[self.start:]

    def make_cache(self) -> list:
        caches = []
        for layer in self.own:
            if layer.block_type == "M":
                caches.append(ArraysCache(size=2))
            elif layer.block_type == "*":
                caches.append(KVCache())
        return caches or [stage.LinkCache()]

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        B, L = inputs.shape[:2]
        own = self.own
        if cache is None:
            cache = [None] * sum(1 for x in own if x.block_type in "M*")
        # Masks from this stage's own first attention / Mamba cache (all caches see the same positions).
        cached = [x for x in own if x.block_type in "M*"]
        first_attn = next((cache[i] for i, x in enumerate(cached) if x.block_type == "*"), None)
        first_ssm = next((cache[i] for i, x in enumerate(cached) if x.block_type == "M"), None)
        shape = (B, L, self.hidden_size)
        probe = mx.zeros((B, L, 1), dtype=self.dtype)  # masks only read the length
        attn_mask = create_attention_mask(probe, first_attn) if any(x.block_type == "*" for x in own) else None
        ssm_mask = create_ssm_mask(probe, first_ssm) if first_ssm is not None else None

        h = stage.receive(shape, self.dtype, self.rank, self.size, self.group)
        if h is None:
            h = self.embeddings(inputs)
        i = 0
        for layer in own:
            c = None
            if layer.block_type in "M*":
                c = cache[i]
                i += 1
            h = layer(h, mask=attn_mask if layer.block_type == "*" else ssm_mask, cache=c)
        h = stage.hand_over(h, cache, self.rank, self.size, self.group)
        return self.norm_f(h)


class PipelineModel(nn.Module):
    def __init__(self, model, group, layer_range: range):
        super().__init__()
        self.args = model.args
        self.model_type = model.model_type
        self.backbone = PipelineBackbone(model.backbone, layer_range, group)
        self.lm_head = model.lm_head

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return self.lm_head(self.backbone(inputs, cache=cache))

    @property
    def layers(self) -> list:
        return self.backbone.own

    def make_cache(self) -> list:
        return self.backbone.make_cache()


def pipeline(model, group, ranges: list[range] | None = None) -> PipelineModel:
    """This rank's stage of a lazily loaded NemotronH (`ranges` from registry.pipeline_split, by rank)."""
    n_layers = len(model.backbone.layers)
    if ranges is None:
        ranges = pipeline_split(_config(model), group.size())
    stage.check_ranges(ranges, group.size(), n_layers)
    return PipelineModel(model, group, ranges[group.rank()])


# --- tensor --------------------------------------------------------------------------------------------


def _part(x: mx.array, n: int, r: int, axis: int = 0, cuts: list[int] | None = None) -> mx.array:
    """Rank r's share of x along axis: each section between `cuts` is split n ways and the shares joined."""
    sections = mx.split(x, cuts, axis=axis) if cuts else [x]
    return mx.contiguous(mx.concatenate([mx.split(s, n, axis=axis)[r] for s in sections], axis=axis))


def _shard_attention(m, group) -> None:
    n = group.size()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(m, name, shard_linear(getattr(m, name), "all-to-sharded", group=group))
    m.o_proj = shard_linear(m.o_proj, "sharded-to-all", group=group)
    m.num_heads //= n
    m.num_key_value_heads //= n


def _shard_mamba(m, group) -> None:
    n, r = group.size(), group.rank()
    inner, gs = m.intermediate_size, m.n_groups * m.ssm_state_size
    # in_proj rows: [z (inner) | x (inner) | B (gs) | C (gs) | dt (heads)]
    m.in_proj = shard_linear(m.in_proj, "all-to-sharded", segments=[inner, 2 * inner, 2 * inner + gs,
                                                                      2 * inner + 2 * gs], group=group)
    # conv1d channels: [x (inner) | B (gs) | C (gs)]; weight (channels, kernel, 1), bias (channels,)
    conv = {"weight": _part(m.conv1d.weight, n, r, 0, [inner, inner + gs])}
    if "bias" in m.conv1d:
        conv["bias"] = _part(m.conv1d.bias, n, r, 0, [inner, inner + gs])
    m.conv1d.update(conv)
    # Per head (each rank's heads are its groups' heads, in order).
    m.dt_bias = _part(m.dt_bias, n, r)
    m.A_log = _part(m.A_log, n, r)
    m.D = _part(m.D, n, r)
    m.norm.weight = _part(m.norm.weight, n, r)
    m.out_proj = shard_linear(m.out_proj, "sharded-to-all", group=group)
    m.num_heads //= n
    m.n_groups //= n
    m.intermediate_size //= n
    m.conv_dim //= n
    m.conv1d.groups = m.conv_dim


def _shard_mlp(m, group) -> None:
    m.up_proj = shard_linear(m.up_proj, "all-to-sharded", group=group)
    m.down_proj = shard_linear(m.down_proj, "sharded-to-all", group=group)


def _local_partial_mlp(m, group) -> None:
    """Split an MLP in place whose partial output is summed by the caller: a bias on the summed side
    is kept on rank 0 only, so the sum counts it once."""
    shard_inplace(m.up_proj, "all-to-sharded", group=group)
    shard_inplace(m.down_proj, "sharded-to-all", group=group)
    if "bias" in m.down_proj and group.rank() != 0:
        m.down_proj.bias = mx.zeros_like(m.down_proj.bias)


class ShardedMoE(nn.Module):
    """NemotronH's MoE with a subset of the routed experts and a slice of the shared expert on each rank.
    Each rank runs only the picks of its own experts; `computed` counts them (tokens x experts)."""

    def __init__(self, moe, group):
        super().__init__()
        n, r = group.size(), group.rank()
        self.group = group
        self.config = moe.config
        self.moe_latent_size = moe.moe_latent_size
        total = moe.switch_mlp.fc1.num_experts
        self.per_rank = total // n
        self.first = r * self.per_rank
        self.computed = 0
        self.gate = moe.gate
        lo, hi = self.first, self.first + self.per_rank
        for fc in (moe.switch_mlp.fc1, moe.switch_mlp.fc2):
            fc.update({k: v[lo:hi] for k, v in fc.parameters().items()
                       if isinstance(v, mx.array) and v.ndim >= 1 and v.shape[0] == total})
        self.switch_mlp = moe.switch_mlp
        if moe.config.n_shared_experts is not None:
            _local_partial_mlp(moe.shared_experts, group)
            self.shared_experts = moe.shared_experts
        if self.moe_latent_size is not None:
            self.fc1_latent_proj = moe.fc1_latent_proj
            self.fc2_latent_proj = moe.fc2_latent_proj
            if "bias" in self.fc2_latent_proj and r != 0:
                self.fc2_latent_proj.bias = mx.zeros_like(self.fc2_latent_proj.bias)

    def _own_picks(self, inds: mx.array) -> tuple[mx.array, mx.array]:
        """(flat pick positions, local expert ids) of the picks whose expert this rank holds."""
        import numpy as np

        local = inds.reshape(-1) - self.first
        mine = (local >= 0) & (local < self.per_rank)
        pos = np.flatnonzero(np.array(mine))  # the sync: how many picks are ours decides the shapes
        self.computed += int(pos.size)
        pos = mx.array(pos.astype(np.int32))
        return pos, local[pos]

    def __call__(self, x: mx.array) -> mx.array:
        inds, scores = self.gate(x)
        k, flat = inds.shape[-1], x.reshape(-1, x.shape[-1])
        h = self.fc1_latent_proj(flat) if self.moe_latent_size is not None else flat
        pos, experts = self._own_picks(inds)
        routed = mx.zeros((flat.shape[0], h.shape[-1]), dtype=mx.float32)
        if pos.size:
            tokens = pos // k
            out = self.switch_mlp(h[tokens], experts[:, None])[:, 0]
            weighted = out * scores.reshape(-1)[pos][:, None]  # float32, as the one-process sum
            routed = routed.at[tokens].add(weighted)
        y = routed.astype(h.dtype)
        if self.moe_latent_size is not None:
            y = self.fc2_latent_proj(y)
        if self.config.n_shared_experts is not None:
            y = y + self.shared_experts(flat)
        return mx.distributed.all_sum(y, group=self.group).reshape(x.shape)


def _config(model) -> dict[str, Any]:
    a = model.args
    cfg = {k: getattr(a, k) for k in vars(a)}
    cfg["hybrid_override_pattern"] = "".join(a.hybrid_override_pattern)
    return cfg


def tensor(model, group, config: dict[str, Any] | None = None):
    """Split every layer of a lazily loaded NemotronH across the group, in place."""
    n = group.size()
    cfg = dict(_config(model))
    if config:
        cfg.update({k: v for k, v in config.items() if k in ("quantization", "quantization_config")})
    blockers = tensor_blockers(cfg, n)
    if blockers:
        raise ShardingError(f"cannot split nemotron_h {n} ways: " + "; ".join(blockers)
                            + ". Use a rank count that divides these, or a pipeline split.")
    if n == 1:
        return model
    for layer in model.backbone.layers:
        kind = layer.block_type
        if kind == "M":
            _shard_mamba(layer.mixer, group)
        elif kind == "*":
            _shard_attention(layer.mixer, group)
        elif kind == "-":
            _shard_mlp(layer.mixer, group)
        elif kind == "E":
            layer.mixer = ShardedMoE(layer.mixer, group)
    return model
