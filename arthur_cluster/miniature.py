"""Miniature models: the same architecture and layer pattern as a real model, small dimensions, every parameter random.

Built with mlx-lm's own model classes and save functions, with a byte-level BPE tokenizer trained offline
(with a chat template), so `mlx_lm.load` loads the folder and generates. Used by the probe's smoke test,
the test fixtures and the demo library. Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

from .errors import ArthurError

ARCHITECTURES = ("nemotron_h", "llama")

# Every width is a multiple of 64 so that affine quantization (group 64) covers every layer,
# experts included: unquantized MoE experts only run in float32 on CPU.
_NEMOTRON_H = {
    "model_type": "nemotron_h",
    "architectures": ["NemotronHForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "attention_bias": False,
    "mamba_num_heads": 16,
    "mamba_head_dim": 16,
    "mamba_proj_bias": False,
    "ssm_state_size": 16,
    "conv_kernel": 4,
    "n_groups": 4,  # several groups per rank at 2 ranks, as the real model's 8
    "chunk_size": 128,
    "mlp_bias": False,
    "mlp_hidden_act": "relu2",
    "mamba_hidden_act": "silu",
    "layer_norm_epsilon": 1e-5,
    "norm_eps": 1e-5,
    "use_bias": False,
    "use_conv_bias": True,
    "moe_intermediate_size": 128,
    "moe_shared_expert_intermediate_size": 128,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 0.0001,
    "tie_word_embeddings": False,
    "residual_in_fp32": False,
    "rescale_prenorm_residual": True,
    "mamba_ssm_cache_dtype": "float32",
}
_NEMOTRON_PATTERN = "MEM*EM-*"

_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 16384,  # above rope_scaling's original 8192, as in the real config
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
}

# Overrides that change the architecture's meaning are refused; dimension overrides are free.
_DIMENSION_KEYS = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "moe_intermediate_size",
    "moe_shared_expert_intermediate_size", "n_routed_experts", "num_experts_per_tok", "vocab_size",
    "max_position_embeddings", "hybrid_override_pattern", "tie_word_embeddings", "conv_kernel",
}


class MiniatureError(ArthurError, ValueError):
    pass


def miniature_pattern(pattern: str, max_layers: int = 8) -> str:
    """A short pattern in the real one's order that keeps every block type the real one has."""
    short = pattern[:max_layers]
    for kind in dict.fromkeys(pattern):
        if kind not in short:
            short += kind
    return short


def tiny_config(
    architecture: str,
    *,
    like: dict[str, Any] | None = None,
    vocab_size: int = 512,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json of a miniature; `like` (a real config) supplies pattern and quantization mode."""
    if architecture == "nemotron_h":
        cfg = copy.deepcopy(_NEMOTRON_H)
        pattern = _NEMOTRON_PATTERN
        if like and isinstance(like.get("hybrid_override_pattern"), str):
            pattern = miniature_pattern(like["hybrid_override_pattern"])
        cfg["hybrid_override_pattern"] = pattern
        cfg["num_hidden_layers"] = len(pattern)
    elif architecture == "llama":
        cfg = copy.deepcopy(_LLAMA)
    else:
        raise MiniatureError(
            f"no miniature for architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}"
        )
    cfg["vocab_size"] = vocab_size
    cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"] = 1, 4, 0  # <s>, <|im_end|>, <pad>
    for key, value in (overrides or {}).items():
        if key not in _DIMENSION_KEYS:
            raise MiniatureError(f"cannot override {key!r} in a miniature")
        cfg[key] = value
    if architecture == "nemotron_h":
        cfg["num_hidden_layers"] = len(cfg["hybrid_override_pattern"])
    return cfg


def quantization_like(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The quantization block of a real config, reduced to what a miniature can copy."""
    q = (config or {}).get("quantization")
    if not isinstance(q, dict):
        return None
    return {"group_size": int(q.get("group_size", 64)), "bits": int(q.get("bits", 4)),
            "mode": str(q.get("mode", "affine"))}


ATTENTION_SHARPNESS = 4.0  # q and k weights times this (scores times 16)


def _random_value(name: str, v, config: dict[str, Any]):
    """A random replacement for a parameter the constructor left constant (or, for A_log, an arange),
    in the range a trained model has, so that no parameter can be taken from the wrong place unnoticed."""
    import math

    import mlx.core as mx

    leaf = name.rsplit(".", 1)[-1]
    uniform = lambda lo, hi: mx.random.uniform(lo, hi, v.shape)  # noqa: E731
    if leaf == "A_log":  # A = -exp(A_log) in [-16, -1], as Mamba2 initialises it: stable for any dt > 0
        return mx.log(uniform(1.0, 16.0))
    if leaf == "dt_bias":  # softplus(dt_bias) = dt, log-uniform in [0.01, 0.2]: the state both keeps and forgets
        dt = mx.exp(uniform(math.log(0.01), math.log(0.2)))
        return dt + mx.log(-mx.expm1(-dt))
    if leaf == "D":
        return uniform(0.5, 1.5)
    if leaf == "e_score_correction_bias":  # shifts which experts win, as trained biases do
        return uniform(-0.1, 0.1)
    if name.endswith("gate.weight") and v.ndim == 2 and "n_routed_experts" in config:  # the MoE router
        return mx.random.normal(v.shape) / math.sqrt(v.shape[-1])
    first = float(v.reshape(-1)[0].item())
    if v.size > 1 and bool(mx.all(v == first).item()):
        # Constant from the constructor: norm weights (ones), biases (zeros) and the like.
        return uniform(0.5, 1.5) if first == 1.0 else first + uniform(-0.2, 0.2)
    return None


def randomize(model, config: dict[str, Any]) -> None:
    """Replace every parameter the constructor did not draw at random (norms, biases, router, Mamba's
    A_log, dt_bias and D). Uses mlx's current random state: call after seeding."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    new = []
    for name, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating) and (r := _random_value(name, v, config)) is not None:
            new.append((name, r.astype(v.dtype)))
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            # Peaked attention, as a trained model's: with the default scale it averages over every position,
            # the answer hangs on the last token only, and different questions on a document answer alike.
            new.append((name, v * ATTENTION_SHARPNESS))
    model.update(tree_unflatten(new))


def build_model(config: dict[str, Any], *, seed: int = 0, dtype: str = "float32"):
    """Instantiate mlx-lm's model class for the config with every parameter random (evaluated)."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes  # mlx-lm's own class lookup

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    randomize(model, config)
    if dtype != "float32":
        from mlx.utils import tree_flatten, tree_unflatten

        keep = getattr(model, "cast_predicate", lambda _: True)  # by name: e.g. A_log stays float32
        target = getattr(mx, dtype)
        cast = [(k, v.astype(target)) for k, v in tree_flatten(model.parameters())
                if keep(k) and mx.issubdtype(v.dtype, mx.floating)]
        model.update(tree_unflatten(cast))
    mx.eval(model.parameters())
    return model


def quantize(model, config: dict[str, Any], quant: dict[str, Any]) -> dict[str, Any]:
    """Quantize in place with mlx-lm's quantizer; returns the config carrying the quantization block."""
    from mlx_lm.utils import quantize_model

    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints bits-per-weight
        _, qconfig = quantize_model(
            model, config, group_size=quant["group_size"], bits=quant["bits"], mode=quant.get("mode", "affine")
        )
    return qconfig


def save_folder(
    out: Path,
    model,
    config: dict[str, Any],
    *,
    shards: int = 1,
    tokenizer: bool = True,
) -> Path:
    """Write an MLX model folder the way mlx-lm converts do (config, safetensors, index, tokenizer)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters, save_config, save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if shards <= 1:
        save_model(out, model)
    else:
        weights = dict(tree_flatten(model.parameters()))
        names = sorted(weights)
        per = -(-len(names) // shards)
        index = {
            "metadata": {
                "total_size": sum(v.nbytes for v in weights.values()),
                "total_parameters": get_total_parameters(model),
            },
            "weight_map": {},
        }
        for i in range(shards):
            part = {k: weights[k] for k in names[i * per:(i + 1) * per]}
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            mx.save_safetensors(str(out / fname), part, metadata={"format": "mlx"})
            index["weight_map"].update({k: fname for k in part})
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    save_config(dict(config), out / "config.json")
    if tokenizer:
        from . import tinytok

        tinytok.write(out, vocab_size=int(config.get("vocab_size", 512)))
    return out


def make(
    out: Path,
    architecture: str,
    *,
    like: dict[str, Any] | None = None,
    quant: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    shards: int = 1,
    dtype: str = "float32",
) -> Path:
    """Build and save a miniature: `quant` None keeps float32 weights (safe for MoE on CPU: MLX's CPU gather_mm
    is float32 only); `dtype` "bfloat16" with `quant` gives bf16 activations, as the real 8-bit model runs."""
    config = tiny_config(architecture, like=like, overrides=overrides)
    model = build_model(config, seed=seed, dtype=dtype)
    if quant:
        config = quantize(model, config, quant)
    return save_folder(out, model, config, shards=shards)
