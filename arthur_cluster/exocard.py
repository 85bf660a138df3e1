"""How a model folder compares with an exo model card.

No card file is written: exo (main) deletes every file in custom_model_cards that is not in its state, and
cards enter exo through POST /models/add on every version (docs/exo.md). What stays here: exo's family and
quantization labels, the comparison of a folder with exo's built-in card of the same weights, and the header
that recognises a card file an older link wrote, so `link`/`unlink` can remove it.
"""

from __future__ import annotations

from .modelfiles import ModelInfo

CARD_HEADER = "# Written by arthur-cluster link; `arthur-cluster unlink` removes it."
FAMILIES = {"nemotron_h": "nemotron", "nemotron": "nemotron", "llama": "llama", "mistral": "llama"}


def card_filename(repo_id: str) -> str:
    return repo_id.replace("/", "--") + ".toml"


def quantization_label(info: ModelInfo) -> str:
    """How exo's cards name the quantization: "8bit", "4bit", "MXFP4", "bf16"."""
    q = info.quantization
    if q and q.bits:
        return f"{q.bits}bit" if q.mode == "affine" else q.mode.upper()
    dtype = (info.torch_dtype or "").lower()
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


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
