"""Pipeline and tensor parallel NemotronH (Mamba2 'M', MoE 'E', attention '*', MLP '-') on mlx.core.distributed.

mlx-lm's NemotronH has neither `shard()` nor `pipeline()`; both live here, on top of mlx-lm's own layer classes.

Tensor split, per layer type:
- attention: query and KV heads split (column-split q/k/v), o_proj row-split and summed across ranks;
- Mamba2 mixer: split by whole groups and their heads. The packed in_proj output [z | x | B | C | dt] is cut
  section by section so each rank gets the z, x, B, C, dt of its own heads and groups; conv1d channels [x | B | C]
  likewise; dt_bias, A_log, D and the gated norm's weight by head. The gated norm normalises per group, and a
  rank holds whole groups, so it stays local. out_proj is row-split and summed;
- MoE (WidthMoE): every routed expert and the shared expert are cut along their intermediate width, in whole
  quantization groups (unevenly where the group count does not divide: the real model's 1856 = 29 groups of 64
  gives 15 and 14 at two ranks). The router runs on every rank, every rank runs every pick at 1/n of the width,
  and routed and shared partial sums meet in one float32 all_sum per MoE layer. Owning whole experts instead
  needs the picks on the host to size each rank's work (one sync per MoE layer); bench/bench_tensor.py
  measures both (bench/RESULTS.md).

Collectives per layer: one all_sum each for attention, Mamba, MLP and MoE (the row-split output projections).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
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


def _cut(total: int, unit: int, n: int, r: int) -> slice:
    """Rank r's share of `total` columns in whole units (quantization groups), as even as whole units allow."""
    units = total // unit
    return slice(r * units // n * unit, (r + 1) * units // n * unit)


def _rows(fc, s: slice) -> None:
    """Keep output rows `s` (of every expert, for a switch layer): fc1's intermediate units."""
    fc.update({k: mx.contiguous(v[..., s] if k == "bias" else v[..., s, :]) for k, v in fc.parameters().items()
               if isinstance(v, mx.array) and k in ("weight", "scales", "biases", "bias")})


def _columns(fc, s: slice, keep_bias: bool) -> None:
    """Keep input columns `s` (of every expert): fc2's intermediate units, packed words and group scales by unit."""
    new = {}
    if "scales" in fc:
        per_word = 32 // fc.bits
        new["weight"] = fc.weight[..., s.start // per_word:s.stop // per_word]
        new["scales"] = fc.scales[..., s.start // fc.group_size:s.stop // fc.group_size]
        if fc.get("biases") is not None:
            new["biases"] = fc.biases[..., s.start // fc.group_size:s.stop // fc.group_size]
    else:
        new["weight"] = fc.weight[..., s]
    new = {k: mx.contiguous(v) for k, v in new.items()}  # a slice alone would keep the whole tensor alive
    if "bias" in fc and not keep_bias:  # summed across ranks: counted once
        new["bias"] = mx.zeros_like(fc.bias)
    fc.update(new)


def _split_width(up, down, n: int, r: int) -> int:
    """Cut an up/down pair along its intermediate width for rank r; returns the width kept."""
    unit = int(down.group_size) if "scales" in down else 1
    s = _cut(int(up["weight"].shape[-2]), unit, n, r)
    _rows(up, s)
    _columns(down, s, keep_bias=r == 0)
    return s.stop - s.start


class WidthMoE(nn.Module):
    """NemotronH's MoE with every routed expert and the shared expert cut along their intermediate width.

    Every rank runs every (token, expert) pick at 1/n of the width, so the work per rank is known before the
    router runs: no host sync, the lazy graph stays whole, and routed and shared partial sums meet in one all_sum
    per MoE layer. The cut follows whole quantization groups, unevenly where their count does not divide (the real
    model's 1856 = 29 groups of 64: 15 and 14 at two ranks). The weighted routed sum is kept in float32, as the
    one-process layer sums it, and the partial sums are added across ranks in float32 too: rounding a partial to
    bf16 before the sum would add a rounding per rank that one process does not have.
    """

    def __init__(self, moe, group):
        super().__init__()
        n, r = group.size(), group.rank()
        self.group = group
        self.config = moe.config
        self.moe_latent_size = moe.moe_latent_size
        self.gate = moe.gate
        self.width = _split_width(moe.switch_mlp.fc1, moe.switch_mlp.fc2, n, r)
        self.switch_mlp = moe.switch_mlp
        if moe.config.n_shared_experts is not None:
            _split_width(moe.shared_experts.up_proj, moe.shared_experts.down_proj, n, r)
            self.shared_experts = moe.shared_experts
        if self.moe_latent_size is not None:
            self.fc1_latent_proj = moe.fc1_latent_proj
            self.fc2_latent_proj = moe.fc2_latent_proj
            if "bias" in self.fc2_latent_proj and r != 0:
                self.fc2_latent_proj.bias = mx.zeros_like(self.fc2_latent_proj.bias)

    def routed(self, x: mx.array) -> mx.array:
        """This rank's share of the weighted routed-expert sum, accumulated in float32 (the router's scores are)."""
        inds, scores = self.gate(x)
        h = self.fc1_latent_proj(x) if self.moe_latent_size is not None else x
        return (self.switch_mlp(h, inds) * scores.astype(mx.float32)[..., None]).sum(axis=-2)

    def partial(self, x: mx.array) -> mx.array:
        """This rank's float32 share of the layer's output (the shares sum to it)."""
        y = self.routed(x)
        if self.moe_latent_size is not None:
            y = self.fc2_latent_proj(y.astype(x.dtype))
        if self.config.n_shared_experts is not None:
            y = y + self.shared_experts(x).astype(mx.float32)
        return y.astype(mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(self.partial(x), group=self.group).astype(x.dtype)


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
            layer.mixer = WidthMoE(layer.mixer, group)
    return model
