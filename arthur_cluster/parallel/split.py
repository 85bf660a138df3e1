"""The static arithmetic of a split, shared by the registry and the model files: what must divide for a tensor
split, each layer's weight cost, and the pipeline's layer ranges.

Reads config dicts only and imports neither mlx nor mlx_lm. Imports run one way: registry and the model files
(nemotron_h, llama, stage) import this module; it imports none of them.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArthurError

Config = dict[str, Any]


class ShardingError(ArthurError, ValueError):
    """A model cannot be split the way that was asked; the message says which quantity and what to do."""


# --- static: what must divide ------------------------------------------------------------------------


def _pattern(config: Config) -> str:
    from ..modelfiles import layer_pattern  # header facts only: no mlx

    return layer_pattern(config) or ""


def _quant_group(config: Config) -> int | None:
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict) and q.get("bits"):
        return int(q.get("group_size", 64))
    return None


def _divides(out: list[str], n: int, name: str, value: Any) -> None:
    if isinstance(value, int) and value % n:
        out.append(f"{name}={value} is not divisible by {n}")


def _row_split(out: list[str], n: int, group: int | None, name: str, width: Any) -> None:
    """A layer split along its input (its outputs summed across ranks): with quantized weights, each
    rank's slice of the input must hold whole quantization groups."""
    if not isinstance(width, int):
        return
    if width % n:
        out.append(f"{name}={width} is not divisible by {n}")
    elif group and (width // n) % group:
        out.append(f"{name}={width} split {n} ways gives {width // n} per rank, "
                   f"not a multiple of the quantization group size {group}")


def _units(out: list[str], n: int, group: int | None, name: str, width: Any) -> None:
    """A width cut into whole units (quantization groups, else columns), at least one per rank."""
    if not isinstance(width, int):
        return
    unit = group or 1
    if width % unit or width // unit < n:
        out.append(f"{name}={width} does not give each of {n} ranks whole groups of {unit}")


def tensor_blockers(config: Config, n: int) -> list[str]:
    """Why a tensor split of this model over `n` ranks is impossible; empty when it is possible."""
    if n < 1:
        return [f"the number of ranks must be at least 1, got {n}"]
    if n == 1:
        return []
    c = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    out: list[str] = []
    group = _quant_group(config)
    heads = c.get("num_attention_heads")
    head_dim = c.get("head_dim") or (c["hidden_size"] // heads if heads and c.get("hidden_size") else None)
    kv = c.get("num_key_value_heads", heads)
    mtype = c.get("model_type")
    if mtype == "nemotron_h":
        pattern = _pattern(c)
        if "*" in pattern:
            _divides(out, n, "num_attention_heads", heads)
            _divides(out, n, "num_key_value_heads", kv)
            if isinstance(heads, int) and isinstance(head_dim, int) and heads % n == 0:
                _row_split(out, n, group, "attention width (num_attention_heads*head_dim)", heads * head_dim)
        if "M" in pattern:
            mh, groups, mhd = c.get("mamba_num_heads"), c.get("n_groups"), c.get("mamba_head_dim")
            _divides(out, n, "mamba_num_heads", mh)
            # Heads are split by whole groups: B, C and the gated norm are per group.
            _divides(out, n, "n_groups", groups)
            if isinstance(mh, int) and isinstance(mhd, int) and mh % n == 0:
                _row_split(out, n, group, "mamba width (mamba_num_heads*mamba_head_dim)", mh * mhd)
        if "E" in pattern:  # experts cut along their width in whole quantization groups, unevenly if need be
            _units(out, n, group, "moe_intermediate_size", c.get("moe_intermediate_size"))
            if c.get("n_shared_experts"):
                _units(out, n, group, "moe_shared_expert_intermediate_size",
                       c.get("moe_shared_expert_intermediate_size"))
        if "-" in pattern:
            _row_split(out, n, group, "intermediate_size", c.get("intermediate_size"))
        return out
    # Transformers with attention + a dense MLP (llama and the like).
    _divides(out, n, "num_attention_heads", heads)
    _divides(out, n, "num_key_value_heads", kv)
    if isinstance(heads, int) and isinstance(head_dim, int) and heads % n == 0:
        _row_split(out, n, group, "attention width (num_attention_heads*head_dim)", heads * head_dim)
    _row_split(out, n, group, "intermediate_size", c.get("intermediate_size"))
    if c.get("n_routed_experts") or c.get("num_experts"):
        _divides(out, n, "number of experts", c.get("n_routed_experts") or c.get("num_experts"))
    return out


# --- static: layer costs and the pipeline split --------------------------------------------------------


def _bits(config: Config) -> float:
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict) and q.get("bits"):
        # Affine groups carry a scale and a bias per group (16-bit each).
        return int(q["bits"]) + 32 / int(q.get("group_size", 64))
    return 16.0


def layer_costs(config: Config) -> list[float]:
    """Approximate weight bytes of each layer, from the config alone."""
    c = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    d = int(c["hidden_size"])
    heads = int(c.get("num_attention_heads") or 1)
    hd = int(c.get("head_dim") or d // heads)
    kv = int(c.get("num_key_value_heads") or heads)
    attn = d * (heads * hd * 2 + kv * hd * 2)
    byte = _bits(config) / 8
    if c.get("model_type") == "nemotron_h":
        mh, mhd = int(c["mamba_num_heads"]), int(c["mamba_head_dim"])
        g, s = int(c["n_groups"]), int(c["ssm_state_size"])
        inner = mh * mhd
        mamba = d * (2 * inner + 2 * g * s + mh) + inner * d
        experts = int(c.get("n_routed_experts") or 0)
        moe = (experts * 2 * d * int(c.get("moe_intermediate_size") or 0)
               + 2 * d * int(c.get("moe_shared_expert_intermediate_size") or 0) + experts * d)
        mlp = 2 * d * int(c.get("intermediate_size") or 0)
        per = {"M": mamba, "E": moe, "*": attn, "-": mlp}
        return [per.get(k, 0) * byte for k in _pattern(c)]
    mlp = 3 * d * int(c["intermediate_size"])
    return [(attn + mlp) * byte] * _layer_count(c)


def _layer_count(c: Config) -> int:
    """num_hidden_layers within the inspection's cap: a hostile config must not make a list of 10**15 costs."""
    from ..modelfiles import MAX_LAYERS

    n = int(c["num_hidden_layers"])
    if not 0 <= n <= MAX_LAYERS:
        raise ShardingError(f"config.json: num_hidden_layers = {n:,} is outside 0..{MAX_LAYERS:,} (the cap); "
                            "the config is corrupt: re-download it")
    return n


def pipeline_split(config: Config, n: int, memory_per_node: list[int] | None = None) -> list[range]:
    """Contiguous layer ranges, element r for rank r (rank n-1 holds the first layers, rank 0 the last),
    sized in proportion to each rank's memory (equal when None) by per-layer weight cost."""
    costs = layer_costs(config)
    layers = len(costs)
    if n < 1:
        raise ShardingError(f"the number of ranks must be at least 1, got {n}")
    if n > layers:
        raise ShardingError(f"a pipeline of {n} stages needs at least {n} layers; the model has {layers}")
    memory = list(memory_per_node) if memory_per_node else [1] * n
    if len(memory) != n:
        raise ShardingError(f"memory_per_node has {len(memory)} entries for {n} ranks")
    if any(m <= 0 for m in memory):
        raise ShardingError(f"memory_per_node must be positive, got {memory}")
    # Stage s runs on rank n-1-s, so the stage shares are the memories in reverse rank order.
    shares = memory[::-1]
    total, mem_total = sum(costs), sum(shares)
    cum = [0.0]
    for c in costs:
        cum.append(cum[-1] + c)
    bounds, start = [0], 0
    for s in range(n - 1):
        target = total * sum(shares[: s + 1]) / mem_total
        lo, hi = start + 1, layers - (n - 1 - s)
        end = min(range(lo, hi + 1), key=lambda e: abs(cum[e] - target))
        bounds.append(end)
        start = end
    bounds.append(layers)
    stages = [range(bounds[i], bounds[i + 1]) for i in range(n)]
    return stages[::-1]


def split_counts(ranges: list[range]) -> list[int]:
    """The per-rank layer counts mlx-lm's `pipeline(group, split)` takes, from `pipeline_split`'s ranges."""
    return [len(r) for r in ranges]
