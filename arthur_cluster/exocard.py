"""exo's model card fields for a linked model, from the header inspection.

No card file is written any more: exo's workers delete every file in custom_model_cards that is not in their
state (cards enter it through POST /models/add, see docs/exo.md). What stays here: the card's numbers (to
compare a folder with exo's built-in card of the same weights), exo's quantization label, and the header
that recognises a card file an older link wrote, so `link`/`unlink` can remove it.
"""

from __future__ import annotations

import json
import re

from .errors import ArthurError
from .modelfiles import ModelInfo, text_config

CARD_HEADER = "# Written by arthur-cluster link; `arthur-cluster unlink` removes it."
BACKENDS = ["MlxMetal", "MlxCuda", "MlxCpu"]
# Architectures exo can tensor-shard (its config rule is an exact match of `architectures`).
TENSOR_ARCHITECTURES = {
    "Glm4MoeLiteForCausalLM", "GlmMoeDsaForCausalLM", "DeepseekV4ForCausalLM", "DeepseekV32ForCausalLM",
    "DeepseekV3ForCausalLM", "Qwen3NextForCausalLM", "Qwen3MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration", "Qwen3VLForConditionalGeneration", "MiniMaxM2ForCausalLM",
    "LlamaForCausalLM", "GptOssForCausalLM", "Step3p5ForCausalLM", "NemotronHForCausalLM",
    "Gemma4ForConditionalGeneration",
}
TENSOR_MODEL_TYPES = {"llama", "nemotron_h"}
FAMILIES = {"nemotron_h": "nemotron", "nemotron": "nemotron", "llama": "llama", "mistral": "llama"}
# Every key exo's card model accepts; anything else makes exo reject the card.
ALLOWED_KEYS = {
    "model_id", "storage_size", "n_layers", "hidden_size", "supports_tensor", "num_key_value_heads", "tasks",
    "components", "family", "quantization", "base_model", "capabilities", "backends", "reasoning_dialect",
    "context_length", "uses_cfg", "trust_remote_code", "is_custom", "vision", "sampling_defaults",
}


class CardError(ArthurError, ValueError):
    """The model lacks what a card needs (layers, hidden size); the message names the file."""


def card_filename(repo_id: str) -> str:
    return repo_id.replace("/", "--") + ".toml"


def _supports_tensor(info: ModelInfo) -> bool:
    archs = info.architectures
    if archs:
        return len(archs) == 1 and archs[0] in TENSOR_ARCHITECTURES
    return info.model_type in TENSOR_MODEL_TYPES


def quantization_label(info: ModelInfo) -> str:
    """How exo's cards name the quantization: "8bit", "4bit", "MXFP4", "bf16"."""
    return _quantization(info)


def _quantization(info: ModelInfo) -> str:
    q = info.quantization
    if q and q.bits:
        return f"{q.bits}bit" if q.mode == "affine" else q.mode.upper()
    dtype = (info.torch_dtype or "").lower()
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def _base_model(repo_id: str) -> str:
    """The repo name without its packaging suffixes: NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit -> ...-30B-A3B."""
    name = repo_id.split("/", 1)[-1]
    pattern = re.compile(r"[-_](mlx|gguf|\d+[-_]?bits?|bf16|fp16|f16|mxfp4|nvfp4|mxfp8|dwq|instruct-mlx)$", re.I)
    while (shorter := pattern.sub("", name)) != name:
        name = shorter
    return name.replace("-", " ").replace("_", " ")


def card_fields(info: ModelInfo, repo_id: str) -> dict:
    """The card as plain data, in exo's field order."""
    if not info.num_layers or not info.hidden_size:
        raise CardError(f"{info.path / 'config.json'}: no num_hidden_layers/hidden_size, which an exo card "
                        "requires; use the model's original config.json")
    tc = text_config(info.config)
    fields: dict = {
        "model_id": repo_id,
        "n_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "supports_tensor": _supports_tensor(info),
    }
    # Only an explicit value: with it exo checks KV-head divisibility before tensor placement.
    kv = tc.get("num_key_value_heads")
    if isinstance(kv, int) and not isinstance(kv, bool) and kv > 0:
        fields["num_key_value_heads"] = kv
    fields.update({
        "tasks": ["TextGeneration"],
        "family": FAMILIES.get(info.model_type or "", info.model_type or ""),
        "quantization": _quantization(info),
        "base_model": _base_model(repo_id),
        "capabilities": ["text"],
        "backends": list(BACKENDS),
        "context_length": info.context_length or 0,
        "trust_remote_code": False,
        "is_custom": True,
        "storage_size": {"in_bytes": info.data_bytes or info.weight_bytes},
    })
    return fields


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def render(fields: dict) -> str:
    """TOML text: scalars and arrays first, then one [table] per dict (TOML's ordering rule)."""
    bad = set(fields) - ALLOWED_KEYS
    if bad:
        raise ValueError(f"exo rejects cards with unknown keys: {sorted(bad)}")
    lines = [CARD_HEADER]
    tables = []
    for key, v in fields.items():
        if isinstance(v, dict):
            tables.append((key, v))
        else:
            lines.append(f"{key} = {_value(v)}")
    for key, table in tables:
        lines.append("")
        lines.append(f"[{key}]")
        lines += [f"{k} = {_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def card_text(info: ModelInfo, repo_id: str) -> str:
    return render(card_fields(info, repo_id))


MB = 1 << 20


def storage_slack(info: ModelInfo) -> int:
    """How far exo's storage figure may sit from the folder's tensor data and still be these weights: exo
    counts either the tensor data (an index's metadata.total_size) or whole files, whose safetensors headers
    (about as large as this folder's own) differ with the shard layout and metadata; plus exo's rounding of
    its size to whole MB."""
    headers = max(0, (info.weight_bytes or 0) - (info.data_bytes or 0))
    return 2 * headers + MB


def differs_from_card(info: ModelInfo, *, n_layers: int | None, hidden_size: int | None,
                      quantization: str | None, storage_bytes: int | None, family: str | None = None) -> str | None:
    """None when the folder holds the model of an exo card: the same architecture family, layer count,
    hidden size, quantization and tensor data size (within the header slack); else what differs."""
    mine = FAMILIES.get(info.model_type or "", info.model_type or "")
    checks = [("layers", n_layers, info.num_layers), ("hidden size", hidden_size, info.hidden_size),
              ("quantization", quantization or "", quantization_label(info))]
    if family:
        checks.append(("family", family, mine))
    for what, theirs, ours in checks:
        if theirs != ours:
            return f"{what}: exo's card says {theirs}, the folder {ours}"
    if storage_bytes is None or abs(storage_bytes - (info.data_bytes or 0)) > storage_slack(info):
        return f"size: exo's card says {storage_bytes} bytes, the folder's tensors {info.data_bytes}"
    return None
