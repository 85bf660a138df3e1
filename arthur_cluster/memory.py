"""Memory plans: what each node must hold to run a model at a given context, before anything is loaded.

A plan charges every node with four parts, each modelled on what mlx-lm 0.32 allocates (batch 1):

* weights   — exact per-layer bytes from the safetensors headers when the folder is on disk, else computed
              from config.json, else the catalogue's storage_bytes. Pipeline: the layers of the node's stage
              plus every non-layer tensor (embeddings, final norm, head), because mlx-lm's `sharded_load`
              keeps those on every stage. Tensor: 1/N of each layer's sharded tensors plus the replicated
              ones (norms, the MoE router, embeddings, head).
* kv_cache  — attention ('*') layers only: 2 (K and V) x kv_heads x head_dim x tokens x bytes, where tokens
              is the context rounded up to KVCache's 256-token step. Bytes per element: the activation dtype
              (bf16 for quantized and bf16 models, f32 for f32 models), or bits/8 plus one 16-bit scale and
              bias per 64 elements for a quantized KV cache (kv_bits 8 or 4).
* mamba     — Mamba ('M') layers keep an ArraysCache of two arrays: the SSM state
              heads x head_dim x state_size in float32 (dt is cast to f32, so the state is f32), and the conv
              state (conv_kernel - 1) x (heads*head_dim + 2*groups*state_size) in the activation dtype.
              Constant in the context length.
* activation — the transient peak of one prefill step of L = min(prefill_step, context) tokens attending to
              the whole context S (the last step is the worst). MLX frees intermediates as soon as their
              consumers ran, so the peak is the largest single-layer transient, not a sum over layers:
                attention: the heads x L x S score matrix at 4 bytes per element (f32 scores with the
                           softmax in place, or bf16 scores plus the bf16 softmax output) — what MLX's
                           composed SDPA materialises on the CPU, plus its L x S causal mask (bool and
                           additive). Metal's and CUDA's fused kernels materialise neither: attention="fused"
                           (on an H100 the peak grew 1.8 GB from 8k to 262k tokens, as the KV cache does);
                mamba:     three heads x 256 x 256 float32 matrices of mlx-lm's chunked SSD scan plus the
                           f32 per-token inputs dt*x and the output (L x heads*head_dim x 4 each);
                moe:       the top-k copies of the step's hidden states and expert activations
                           (L x k x (hidden + 2 x moe_intermediate) in the activation dtype);
              plus the residual stream (3 x L x hidden) and the KV regrowth: when a step outgrows the cache,
              KVCache concatenates a new buffer while the old one is alive (one layer's KV at a time).
              Logits: mlx-lm's prefill evaluates only the cache, so the head runs on the final single
              token (vocab x 4 bytes); pass logits_tokens to charge a caller that keeps a step's logits.

Not modelled: allocator caching (mx.clear_cache runs between prefill steps in mlx-lm), backend-specific
workspace, the process itself. `overhead_bytes` adds a measured constant per node when a calibration is
known: MLX on CUDA (H100, Nemotron-3-Nano 8-bit) needs 4.1 GB at prefill step 512, 7.3 GB at 2048 and
9.6 GB at 4096 on top of the plan, the same from 8k to 262k tokens (bench/RESULTS.md).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from . import modelfiles
from .catalog import ModelEntry
from .errors import ArthurError
from .modelfiles import ModelInfo
from .types import DEFAULT_USABLE_FRACTION, NodeMemory, Sharding  # noqa: F401 (re-exported)

KV_STEP = 256  # mlx_lm.models.cache.KVCache.step
SSD_CHUNK = 256  # mlx_lm.models.ssm.ssm_attn step
# Bytes per attention-score element at the peak of a composed SDPA: measured on CPU (f32 scores, softmax
# in place) and CUDA (bf16 scores + bf16 softmax output) alike.
SCORE_BYTES = 4
DEFAULT_PREFILL_STEP = 2048  # mlx-lm's prefill_step_size
# Caps, named in the errors: far above any real model or cluster, low enough that the arithmetic stays small.
MAX_LAYERS = 10_000
MAX_NODES = 1_024
MAX_CONTEXT = 1 << 26  # 67M tokens

Split = Sharding  # how a plan divides the model
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Tensors of a layer that tensor parallelism keeps whole on every rank.
_REPLICATED_RE = re.compile(r"(norm[^.]*\.weight|norm[^.]*\.bias|\.gate\.weight|e_score_correction_bias)$")


class PlanError(ArthurError, ValueError):
    """Not enough known about the model to plan its memory; the message says what is missing."""


class NodePlan(BaseModel):
    node: str
    layers: tuple[int, int] | None = None  # [start, end) of a pipeline stage
    weights: int = 0
    kv_cache: int = 0
    mamba_state: int = 0
    activation: int = 0
    overhead: int = 0
    total: int = 0
    budget: int | None = None
    fits: bool | None = None  # None: the node's memory is unknown
    headroom: int | None = None


class MemoryPlan(BaseModel):
    model: str
    split: Split
    context: int
    prefill_step: int
    kv_bits: int
    source: Literal["headers", "config", "catalog"]  # where the weight figures come from
    nodes: list[NodePlan] = Field(default_factory=list)
    total: int = 0  # over all nodes
    fits: bool | None = None  # every node fits (None when a node's memory is unknown)
    notes: list[str] = Field(default_factory=list)

    @property
    def peak_node(self) -> NodePlan:
        return max(self.nodes, key=lambda n: n.total)


# --- the model's dimensions -----------------------------------------------------------------------


class Dims(BaseModel):
    """The config values the plan needs, with mlx-lm's defaults filled in."""

    pattern: str  # one char per layer: M mamba, E moe, * attention, - mlp, A attention+mlp (dense decoder)
    hidden: int
    vocab: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    intermediate: int = 0
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    ssm_state: int = 0
    n_groups: int = 1
    conv_kernel: int = 4
    experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    tied: bool = False
    act_bytes: int = 2  # bf16 unless the model is stored in float32
    bits: int | None = None
    group_size: int = 64
    quant_mode: str = "affine"

    @property
    def attention_layers(self) -> int:
        return sum(c in "*A" for c in self.pattern)

    @property
    def mamba_layers(self) -> int:
        return self.pattern.count("M")


def _int(cfg: dict, *keys: str, default: int = 0) -> int:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return default


def _check_layer_count(cfg: dict) -> None:
    n = cfg.get("num_hidden_layers")
    listed = [cfg.get(k) for k in ("hybrid_override_pattern", "layers_block_type", "layer_types")]
    sizes = [n if isinstance(n, int) else 0] + [len(v) for v in listed if isinstance(v, (str, list))]
    if max(sizes) > MAX_LAYERS:
        raise PlanError(f"config.json declares {max(sizes):,} layers, past the cap of {MAX_LAYERS:,}; "
                        "the config is damaged: replace it with the model's own")


def dims(config: dict) -> Dims:
    """Dimensions from a config.json (text_config merged); raises PlanError when the basics are missing."""
    cfg = modelfiles.text_config(config)
    _check_layer_count(cfg)
    pattern = modelfiles.layer_pattern(cfg)
    hidden = _int(cfg, "hidden_size", "d_model")
    if not pattern or not hidden:
        raise PlanError("config.json lacks hidden_size or the layer count; cannot plan memory")
    if not any(c in pattern for c in "ME-") and "hybrid_override_pattern" not in cfg:
        pattern = "A" * len(pattern)  # a plain decoder: every layer is attention + MLP
    heads = _int(cfg, "num_attention_heads")
    q = cfg.get("quantization") if isinstance(cfg.get("quantization"), dict) else None
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return Dims(
        pattern=pattern, hidden=hidden, vocab=_int(cfg, "vocab_size"), heads=heads,
        kv_heads=_int(cfg, "num_key_value_heads", default=heads),
        head_dim=_int(cfg, "head_dim", default=hidden // heads if heads else 0),
        intermediate=_int(cfg, "intermediate_size"),
        mamba_heads=_int(cfg, "mamba_num_heads"), mamba_head_dim=_int(cfg, "mamba_head_dim"),
        ssm_state=_int(cfg, "ssm_state_size"), n_groups=_int(cfg, "n_groups", default=1),
        conv_kernel=_int(cfg, "conv_kernel", default=4),
        experts=_int(cfg, "n_routed_experts", "num_experts", "num_local_experts"),
        top_k=_int(cfg, "num_experts_per_tok"),
        moe_intermediate=_int(cfg, "moe_intermediate_size"),
        shared_intermediate=_int(cfg, "moe_shared_expert_intermediate_size") * (_int(cfg, "n_shared_experts") or 1)
        if cfg.get("n_shared_experts") else 0,
        tied=bool(cfg.get("tie_word_embeddings", False)),
        act_bytes=4 if dtype in ("float32", "torch.float32") and not q else 2,
        bits=q.get("bits") if q else None, group_size=(q or {}).get("group_size", 64),
        quant_mode=str((q or {}).get("mode", "affine")),
    )


# --- weights ---------------------------------------------------------------------------------------


class WeightMap(BaseModel):
    """Weight bytes by layer: per layer, the part tensor parallelism shards and the part it replicates."""

    sharded: list[int]
    replicated: list[int]
    other: int  # embeddings, final norm, head: on every pipeline stage, replicated under tensor parallelism
    source: Literal["headers", "config", "catalog"]
    act_bytes: int | None = None  # from the headers' float dtype, when read

    @property
    def total(self) -> int:
        return sum(self.sharded) + sum(self.replicated) + self.other


def weights_from_headers(folder: Path, shards: list[str], num_layers: int) -> WeightMap | None:
    """Exact bytes per layer from the safetensors headers (two small reads per shard); None if unreadable."""
    sharded, replicated, other = [0] * num_layers, [0] * num_layers, 0
    floats: dict[str, int] = {}
    for shard in shards:
        try:
            header, _, _ = modelfiles.read_header(Path(folder) / shard)
        except (modelfiles.ModelFileError, OSError):
            return None
        for name, t in header.items():
            try:
                n = t["data_offsets"][1] - t["data_offsets"][0]
            except (KeyError, TypeError, IndexError):
                return None
            if t.get("dtype") in ("BF16", "F16", "F32"):
                floats[t["dtype"]] = floats.get(t["dtype"], 0) + 1
            m = _LAYER_RE.search(name)
            if m is None or int(m.group(1)) >= num_layers:  # layers past the stack (MTP) are dropped on load
                other += n if m is None else 0
                continue
            i = int(m.group(1))
            if _REPLICATED_RE.search(name):
                replicated[i] += n
            else:
                sharded[i] += n
    # The activation dtype is the one most float tensors (norms, scales) are stored in.
    act = {"F32": 4, "BF16": 2, "F16": 2}[max(floats, key=floats.get)] if floats else None
    return WeightMap(sharded=sharded, replicated=replicated, other=other, source="headers", act_bytes=act)


def _linear_bytes(d: Dims, rows: int, cols: int, quantizable: bool = True) -> int:
    """One Linear/Embedding/SwitchLinear weight (rows x cols, input width cols) as mlx-lm stores it."""
    n = rows * cols
    if d.bits and quantizable and cols % d.group_size == 0:
        per_group = 32 if d.quant_mode == "affine" else 8  # affine: 16-bit scale + bias; mx/nv fp: 8-bit scale
        return n * d.bits // 8 + (n // d.group_size) * per_group // 8
    return n * d.act_bytes


def _layer_weights(d: Dims, kind: str) -> tuple[int, int]:
    """(sharded, replicated) bytes of one layer computed from the config."""
    h, a = d.hidden, d.act_bytes
    lin = lambda r, c: _linear_bytes(d, r, c)  # noqa: E731
    attn = (lin(d.heads * d.head_dim, h) + 2 * lin(d.kv_heads * d.head_dim, h)
            + lin(h, d.heads * d.head_dim))
    if kind == "*":
        return attn, h * a
    if kind == "A":
        return attn + 2 * lin(d.intermediate, h) + lin(h, d.intermediate), 2 * h * a
    if kind == "-":
        return lin(d.intermediate, h) + lin(h, d.intermediate), h * a
    if kind == "M":
        inner = d.mamba_heads * d.mamba_head_dim
        conv_dim = inner + 2 * d.n_groups * d.ssm_state
        proj = lin(inner + conv_dim + d.mamba_heads, h) + lin(h, inner)
        small = conv_dim * d.conv_kernel * a + conv_dim * a + 2 * d.mamba_heads * a + d.mamba_heads * 4 + inner * a
        return proj + small, h * a
    if kind == "E":
        experts = d.experts * (lin(d.moe_intermediate, h) + lin(h, d.moe_intermediate))
        shared = lin(d.shared_intermediate, h) + lin(h, d.shared_intermediate) if d.shared_intermediate else 0
        router = d.experts * h * a + d.experts * 4
        return experts + shared, router + h * a
    raise PlanError(f"unknown layer kind {kind!r} in the layer pattern")


def weights_from_config(d: Dims) -> WeightMap:
    pairs = [_layer_weights(d, c) for c in d.pattern]
    embed = _linear_bytes(d, d.vocab, d.hidden)
    other = embed + (0 if d.tied else _linear_bytes(d, d.vocab, d.hidden)) + d.hidden * d.act_bytes
    return WeightMap(sharded=[s for s, _ in pairs], replicated=[r for _, r in pairs], other=other, source="config")


def human_bytes(n: int | float | None) -> str:
    """Decimal units, as macOS and LM Studio show sizes; "?" when unknown."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# --- caches and activations -------------------------------------------------------------------------


def kv_tokens(context: int) -> int:
    """Tokens KVCache allocates for `context`: it grows in whole steps of 256."""
    return -(-context // KV_STEP) * KV_STEP


def kv_bytes_per_element(d: Dims, kv_bits: int) -> float:
    if kv_bits >= 16:
        return d.act_bytes
    return kv_bits / 8 + 4 / 64  # QuantizedKVCache: group 64, 16-bit scale and bias per group


def kv_layer_bytes(d: Dims, context: int, kv_bits: int = 16, shards: int = 1) -> int:
    """One attention layer's K and V at `context` tokens (kv_heads divided over tensor shards)."""
    heads = -(-d.kv_heads // shards)
    return int(2 * heads * d.head_dim * kv_tokens(context) * kv_bytes_per_element(d, kv_bits))


def mamba_layer_bytes(d: Dims, shards: int = 1) -> int:
    """One Mamba layer's ArraysCache: f32 SSM state + conv state in the activation dtype."""
    heads = -(-d.mamba_heads // shards)
    groups = -(-d.n_groups // shards)
    ssm = heads * d.mamba_head_dim * d.ssm_state * 4
    conv = (d.conv_kernel - 1) * (heads * d.mamba_head_dim + 2 * groups * d.ssm_state) * d.act_bytes
    return ssm + conv


def activation_bytes(d: Dims, kinds: str, *, context: int, step: int, shards: int = 1, kv_bits: int = 16,
                     attention: str = "materialized", logits_tokens: int = 1, has_head: bool = True) -> int:
    """Transient peak of one prefill step for a node running layers of `kinds` (see the module docstring)."""
    L, S, a = min(step, context), kv_tokens(context), d.act_bytes
    peaks = [0]
    if any(c in "*A" for c in kinds):
        heads = -(-d.heads // shards)
        # The composed path also builds the causal mask: bool, then additive in the activation dtype.
        scores = heads * L * S * SCORE_BYTES + L * S * (1 + a) if attention == "materialized" else 0
        qkvo = L * (2 * heads + 2 * -(-d.kv_heads // shards)) * d.head_dim * a
        peaks.append(scores + qkvo + kv_layer_bytes(d, context, kv_bits, shards))
    if "M" in kinds:
        heads = -(-d.mamba_heads // shards)
        chunk = min(L, SSD_CHUNK)
        inner = heads * d.mamba_head_dim
        peaks.append(3 * heads * chunk * chunk * 4 + 2 * L * inner * 4 + L * 2 * inner * a)
    if "E" in kinds:
        mi = -(-d.moe_intermediate // shards)
        peaks.append(L * d.top_k * (d.hidden + 2 * mi) * a)
    if any(c in "A-" for c in kinds):
        peaks.append(2 * L * -(-d.intermediate // shards) * a)
    logits = d.vocab * max(logits_tokens, 1) * 4 if has_head else 0
    return max(peaks) + 3 * L * d.hidden * a + logits


# --- stages ----------------------------------------------------------------------------------------


def even_stages(num_layers: int, n: int) -> list[range]:
    """mlx-lm's default pipeline split, listed by rank: low ranks get the extra layers and rank 0 runs the
    last layers (PipelineMixin.pipeline)."""
    base, extra = divmod(num_layers, n)
    sizes = [base + (1 if r < extra else 0) for r in range(n)]
    out = []
    for r in range(n):
        start = sum(sizes[r + 1:])
        out.append(range(start, start + sizes[r]))
    return out


# --- the plan ----------------------------------------------------------------------------------------


def _nodes(nodes: list[NodeMemory] | int, split: Split) -> list[NodeMemory]:
    if isinstance(nodes, int):
        if nodes < 1:
            raise PlanError("the node count must be at least 1")
        if nodes > MAX_NODES:
            raise PlanError(f"{nodes:,} nodes is past the cap of {MAX_NODES:,} nodes; give a real node count")
        nodes = [NodeMemory(name=f"node{i}") for i in range(nodes)]
    if not nodes:
        raise PlanError("no nodes to plan for")
    if len(nodes) > MAX_NODES:
        raise PlanError(f"{len(nodes):,} nodes is past the cap of {MAX_NODES:,} nodes; give a real node count")
    if split == "single" and len(nodes) != 1:
        raise PlanError(f"split 'single' runs on one node, {len(nodes)} given")
    return list(nodes)


def _finish(plan: MemoryPlan, mem: list[NodeMemory]) -> MemoryPlan:
    for np_, node in zip(plan.nodes, mem):
        np_.total = np_.weights + np_.kv_cache + np_.mamba_state + np_.activation + np_.overhead
        np_.budget = node.budget
        if np_.budget is not None:
            np_.headroom = np_.budget - np_.total
            np_.fits = np_.headroom >= 0
    plan.total = sum(n.total for n in plan.nodes)
    known = [n.fits for n in plan.nodes]
    plan.fits = None if None in known else all(known)
    if plan.fits is None:
        plan.notes.append("node memory unknown: give node memory (cluster section, exo) for a fit verdict")
    return plan


def plan(
    model: ModelInfo | ModelEntry | dict,
    *,
    context: int,
    nodes: list[NodeMemory] | int = 1,
    split: Split = "single",
    prefill_step: int = 2048,
    kv_bits: int = 16,
    stages: list[range] | None = None,
    config: dict | None = None,
    attention: Literal["materialized", "fused"] = "materialized",
    logits_tokens: int = 1,
    overhead_bytes: int = 0,
    name: str | None = None,
) -> MemoryPlan:
    """Plan each node's memory for `model` at `context` tokens.

    model: a ModelInfo (headers and config of a folder), a config dict, or a models.toml ModelEntry (pass
    `config` too when the architecture's config is known; else only its storage/KV/state figures are used).
    stages: the pipeline stage of each node, in node order (default: mlx-lm's even split).
    """
    if context < 1 or prefill_step < 1:
        raise PlanError("context and prefill_step must be positive")
    if context > MAX_CONTEXT:
        raise PlanError(f"context {context:,} is past the cap of {MAX_CONTEXT:,} tokens; pass a smaller --context")
    mem = _nodes(nodes, split)
    n = len(mem)
    if isinstance(model, ModelEntry) and config is None:
        return _finish(_plan_from_entry(model, context, mem, split, prefill_step, kv_bits, overhead_bytes, name), mem)
    if isinstance(model, ModelInfo):
        cfg, label = model.config, name or model.repo_id or str(model.path)
    elif isinstance(model, dict):
        cfg, label = model, name or str(model.get("_name_or_path") or model.get("model_type") or "model")
    else:
        cfg, label = config or {}, name or "model"
    if not cfg:
        raise PlanError(f"{label}: no config.json to plan from; fix the folder or give the catalogue's figures")
    d = dims(cfg)
    wm = None
    if isinstance(model, ModelInfo) and model.shards and model.ok:
        wm = weights_from_headers(model.path, model.shards, len(d.pattern))
    wm = wm or weights_from_config(d)
    if wm.act_bytes:
        d = d.model_copy(update={"act_bytes": wm.act_bytes})
    out = MemoryPlan(model=label, split=split, context=context, prefill_step=prefill_step, kv_bits=kv_bits,
                     source=wm.source)
    if split == "pipeline":
        stages = stages or even_stages(len(d.pattern), n)
        if len(stages) != n:
            raise PlanError(f"{len(stages)} pipeline stages for {n} nodes")
    for i, node in enumerate(mem):
        if split == "pipeline":
            st = stages[i]
            kinds = "".join(d.pattern[j] for j in st)
            weights = sum(wm.sharded[j] + wm.replicated[j] for j in st) + wm.other
            shards, layers = 1, (st.start, st.stop)
            has_head = st.stop == len(d.pattern)
        else:
            kinds, shards, layers, has_head = d.pattern, (n if split == "tensor" else 1), None, True
            weights = sum(wm.sharded) // shards + sum(wm.replicated) + wm.other
        out.nodes.append(NodePlan(
            node=node.name, layers=layers, weights=weights,
            kv_cache=sum(kv_layer_bytes(d, context, kv_bits, shards) for c in kinds if c in "*A"),
            mamba_state=kinds.count("M") * mamba_layer_bytes(d, shards),
            activation=activation_bytes(d, kinds, context=context, step=prefill_step, shards=shards,
                                        kv_bits=kv_bits, attention=attention, logits_tokens=logits_tokens,
                                        has_head=has_head),
            overhead=overhead_bytes,
        ))
    if split == "tensor" and (d.kv_heads % n or d.heads % n):
        out.notes.append(f"heads do not divide by {n}: figures use the rounded-up share; the split itself is wrong")
    return _finish(out, mem)


def _plan_from_entry(e: ModelEntry, context: int, mem: list[NodeMemory], split: Split, step: int, kv_bits: int,
                     overhead: int, name: str | None) -> MemoryPlan:
    """Catalogue figures only: weights, KV and state are spread evenly over the nodes."""
    if e.storage_bytes is None:
        raise PlanError("the catalogue entry has no storage_bytes and the model is not on disk; add storage_bytes "
                        "to its [models.\"...\"] section in models.toml")
    n = len(mem)
    kv = (e.kv_bytes_per_token or 0) * kv_tokens(context)
    if kv_bits < 16:
        kv = int(kv * (kv_bits / 8 + 4 / 64) / 2)
    out = MemoryPlan(model=name or e.architecture or "model", split=split, context=context, prefill_step=step,
                     kv_bits=kv_bits, source="catalog")
    for node in mem:
        out.nodes.append(NodePlan(node=node.name, weights=math.ceil(e.storage_bytes / n), kv_cache=math.ceil(kv / n),
                                  mamba_state=math.ceil((e.state_bytes or 0) / n), overhead=overhead))
    out.notes.append("from the catalogue alone: activations not estimated, the split is assumed even")
    if e.kv_bytes_per_token is None:
        out.notes.append("kv_bytes_per_token missing in the catalogue: KV cache counted as 0")
    return out


# --- the shared verdict ------------------------------------------------------------------------------------


def machine_is_apple() -> bool:
    """Apple silicon: attention runs in Metal's fused kernel, which never holds the score matrix."""
    import platform

    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _pipeline_stages(model: ModelInfo | ModelEntry | dict, n: int, nodes: list[NodeMemory] | int) -> list[range] | None:
    """The stages bring-up uses: sized by each node's memory budget (registry.pipeline_split), else even."""
    cfg = model.config if isinstance(model, ModelInfo) else model if isinstance(model, dict) else None
    if not cfg:
        return None
    budgets = [m.budget for m in nodes] if isinstance(nodes, list) else None
    try:
        from .parallel import registry

        return registry.pipeline_split(cfg, n, budgets if budgets and None not in budgets else None)
    except (ImportError, ArthurError, KeyError, TypeError, ValueError):
        return None  # an incomplete config or an unsplittable model: the even split stands in


def fit(model: ModelInfo | ModelEntry | dict, *, context: int, nodes: list[NodeMemory] | int, split: Split,
        apple: bool, name: str | None = None, prefill_step: int = DEFAULT_PREFILL_STEP) -> MemoryPlan:
    """The one memory plan and fit verdict `probe`, `pick`, `up` and `doc --plan` share for a model, a context
    and the nodes: the same stages, the same attention accounting, the same prefill step everywhere."""
    n = nodes if isinstance(nodes, int) else len(nodes)
    stages = _pipeline_stages(model, n, nodes) if split == "pipeline" and 0 < n <= MAX_NODES else None
    return plan(model, context=context, nodes=nodes, split=split, stages=stages, prefill_step=prefill_step,
                attention="fused" if apple else "materialized", name=name)


def fit_text(p: MemoryPlan) -> str:
    """The verdict in words, the same in every command: the busiest node's need against its budget."""
    peak = p.peak_node
    if p.fits is None:
        return f"memory not known on every node (needs {human_bytes(peak.total)} on {peak.node})"
    return f"needs {human_bytes(peak.total)} of {human_bytes(peak.budget)} on {peak.node}"
