"""Know a model folder from its files alone: config, index, safetensors headers, tokenizer.

Reads two small pieces of each shard (the 8-byte length and the JSON header), never the weights, and
never imports mlx_lm or transformers. Problems are collected, not raised, so a broken folder yields a
report that names the file and the fix; `require_ok` turns errors into an exception where needed.
"""

from __future__ import annotations

from .errors import ArthurError

import json
import math
import os
import struct
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

INDEX_NAME = "model.safetensors.index.json"
GGUF_MAGIC = 0x46554747
LFS_PREFIX = b"version https://git-lfs"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own reader caps headers at 100 MB

DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "U16": 16, "I16": 16, "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64,
    "C64": 64,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model")
LAYER_KINDS = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}


class ModelFileError(ArthurError, ValueError):
    """A model folder cannot be used; the message names the file and the fix."""


class Problem(BaseModel):
    file: str  # relative to the model folder ("" for the folder itself)
    message: str
    fix: str = ""
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = self.file or "(folder)"
        return f"{where}: {self.message}" + (f" — {self.fix}" if self.fix else "")


class Quantization(BaseModel):
    bits: int | None = None
    group_size: int | None = None
    mode: str = "affine"
    overrides: int = 0  # per-module entries in the config's quantization block
    quantized_tensors: int = 0  # modules found quantized in the headers


class FileEntry(BaseModel):
    name: str  # relative path inside the folder, "/"-separated
    size: int
    mtime_ns: int
    kind: Literal["weights", "config", "index", "tokenizer", "other"]


class ModelInfo(BaseModel):
    """What a model folder holds, from headers only. The seam between discovery, linker, probe and memory."""

    path: Path
    repo_id: str | None = None
    source: str = "path"  # lmstudio | hf-cache | exo | path
    format: Literal["mlx", "gguf", "other"] = "other"
    model_type: str | None = None
    architectures: list[str] = Field(default_factory=list)
    layer_pattern: str | None = None  # one char per layer: M mamba, E moe, * attention, - mlp
    layer_counts: dict[str, int] = Field(default_factory=dict)
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    context_length: int | None = None
    quantization: Quantization | None = None
    torch_dtype: str | None = None
    parameters: int | None = None
    weight_bytes: int = 0  # summed shard sizes (apparent)
    data_bytes: int = 0  # summed tensor data (what the weights occupy once loaded)
    total_bytes: int = 0  # every file of the folder
    shards: list[str] = Field(default_factory=list)
    has_index: bool = False
    tokenizer: bool = False
    chat_template: bool = False
    remote_code: bool = False
    files: list[FileEntry] = Field(default_factory=list)
    config: dict = Field(default_factory=dict, repr=False)
    problems: list[Problem] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def require_ok(info: ModelInfo) -> ModelInfo:
    if not info.ok:
        lines = "\n  ".join(str(p) for p in info.errors)
        raise ModelFileError(f"{info.path} cannot be used:\n  {lines}")
    return info


# --- files --------------------------------------------------------------------------------------


def _kind(name: str) -> str:
    if name.endswith(".safetensors"):
        return "weights"
    if name == INDEX_NAME:
        return "index"
    if name in TOKENIZER_FILES or name.startswith("tokenizer") or name.endswith((".tiktoken", ".jinja")) or name in (
        "special_tokens_map.json", "chat_template.json", "vocab.json", "merges.txt"
    ):
        return "tokenizer"
    if name.endswith(".json") or name.endswith(".py"):
        return "config"
    return "other"


def list_files(folder: Path) -> tuple[list[FileEntry], list[Problem]]:
    """Every file below the folder (links followed, loops refused), sorted by name."""
    entries: list[FileEntry] = []
    problems: list[Problem] = []
    seen_dirs: set[tuple[int, int]] = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen_dirs:
            problems.append(Problem(file=os.path.relpath(root, folder), message="symlink loop",
                                    fix="remove the link that points back into the folder"))
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if n.startswith("."):
                continue
            full = Path(root) / n
            rel = full.relative_to(folder).as_posix()
            try:
                fst = full.stat()
            except OSError as e:
                problems.append(Problem(file=rel, message=f"cannot stat ({e.strerror}); a broken link?",
                                        fix="restore the file or re-download the model"))
                continue
            entries.append(FileEntry(name=rel, size=fst.st_size, mtime_ns=fst.st_mtime_ns, kind=_kind(n)))
    entries.sort(key=lambda e: e.name)
    return entries, problems


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and struct.unpack("<I", head)[0] == GGUF_MAGIC


def read_header(path: Path) -> tuple[dict, int, int]:
    """Return (tensors, data_start, file_size) for a safetensors file; raise ModelFileError with the reason."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(b"version "):
                raise ModelFileError("a git-lfs pointer, not weights: fetch the real file (git lfs pull) "
                                     "or re-download the model")
            if len(head) < 8:
                raise ModelFileError(f"only {size} bytes, too short for safetensors: re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ModelFileError(f"header length {n} does not fit the {size}-byte file: the file is "
                                     "truncated or not safetensors; re-download it")
            raw = f.read(n)
    except OSError as e:
        raise ModelFileError(f"cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ModelFileError("header is not valid JSON: the file is corrupt; re-download it") from None
    if not isinstance(header, dict):
        raise ModelFileError("header is not a JSON object: the file is corrupt; re-download it")
    header.pop("__metadata__", None)
    return header, 8 + n, size


def check_tensors(header: dict, data_len: int) -> list[str]:
    """Offsets, sizes and overlaps of every tensor against the data region; returns the reasons found."""
    reasons: list[str] = []
    spans: list[tuple[int, int, str]] = []
    for name, t in header.items():
        if not isinstance(t, dict):
            reasons.append(f"tensor {name}: entry is not an object")
            continue
        dtype, shape, offs = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if dtype not in DTYPE_BITS:
            reasons.append(f"tensor {name}: unknown dtype {dtype!r}")
            continue
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            reasons.append(f"tensor {name}: bad shape {shape!r}")
            continue
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            reasons.append(f"tensor {name}: bad data_offsets {offs!r}")
            continue
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            reasons.append(f"tensor {name}: bytes {begin}..{end} outside the {data_len}-byte data region "
                           "(truncated file?)")
            continue
        want = math.prod(shape) * DTYPE_BITS[dtype] // 8
        if end - begin != want:
            reasons.append(f"tensor {name}: {end - begin} bytes where {dtype}{shape} needs {want}")
            continue
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (b1, e1, n1), (b2, e2, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            reasons.append(f"tensors {n1} and {n2} overlap")
            break
    return reasons


# --- config -------------------------------------------------------------------------------------


def text_config(config: dict) -> dict:
    """Multimodal configs keep the language model's settings under text_config."""
    inner = config.get("text_config")
    if isinstance(inner, dict):
        merged = dict(config)
        merged.update(inner)
        return merged
    return config


def layer_pattern(config: dict) -> str | None:
    """The per-layer block kinds as one char each (NemotronH and other hybrids), else all-attention."""
    pattern = config.get("hybrid_override_pattern")
    if isinstance(pattern, list):
        pattern = "".join(pattern)
    if isinstance(pattern, str) and pattern:
        return pattern
    names = config.get("layers_block_type") or config.get("layer_types")
    if isinstance(names, list) and names:
        table = {"mamba": "M", "linear_attention": "M", "conv": "M", "moe": "E", "attention": "*",
                 "full_attention": "*", "sliding_attention": "*", "mlp": "-"}
        return "".join(table.get(str(n), "?") for n in names)
    n = config.get("num_hidden_layers")
    if isinstance(n, int) and n > 0:
        return "*" * n
    return None


def _quant_config(config: dict) -> dict | None:
    q = config.get("quantization") or config.get("quantization_config")
    return q if isinstance(q, dict) else None


def _int(config: dict, *keys: str) -> int | None:
    for k in keys:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


# --- inspection ------------------------------------------------------------------------------------


def inspect(folder: Path | str, *, repo_id: str | None = None, source: str = "path") -> ModelInfo:
    """Inspect a model folder from headers; problems are recorded on the result, never raised."""
    folder = Path(folder)
    info = ModelInfo(path=folder, repo_id=repo_id, source=source)
    if not folder.is_dir():
        info.problems.append(Problem(file="", message="not a directory (moved or deleted?)",
                                     fix="check the path, or run `arthur-cluster models` to list what exists"))
        return info
    info.files, problems = list_files(folder)
    info.problems += problems
    info.total_bytes = sum(f.size for f in info.files)
    names = {f.name for f in info.files}
    by_name = {f.name: f for f in info.files}

    if any(n.endswith(".gguf") for n in names):
        ggufs = [n for n in names if n.endswith(".gguf")]
        info.format = "gguf" if any(is_gguf(folder / n) for n in ggufs) else "other"
        if info.format == "gguf" and not any(n.endswith(".safetensors") for n in names):
            info.weight_bytes = sum(by_name[n].size for n in ggufs)
            return info

    _read_config(folder, info)
    _read_weights(folder, info, names)
    info.tokenizer = any(n in names for n in TOKENIZER_FILES) or any(n.endswith(".tiktoken") for n in names)
    info.chat_template = _has_chat_template(folder, names)
    if info.format == "mlx" and not info.tokenizer:
        info.problems.append(Problem(file="", message="no tokenizer (tokenizer.json, tokenizer.model or *.tiktoken)",
                                     fix="copy the tokenizer files from the original repo", severity="warning"))
    return info


def _read_config(folder: Path, info: ModelInfo) -> None:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        info.problems.append(Problem(file="config.json", message="missing",
                                     fix="copy config.json from the original repo or re-download the model"))
        return
    except (OSError, ValueError, UnicodeDecodeError) as e:
        info.problems.append(Problem(file="config.json", message=f"not valid JSON ({e})",
                                     fix="re-download config.json"))
        return
    if not isinstance(config, dict):
        info.problems.append(Problem(file="config.json", message="not a JSON object", fix="re-download config.json"))
        return
    info.config = config
    tc = text_config(config)
    info.model_type = tc.get("model_type") if isinstance(tc.get("model_type"), str) else None
    if not info.model_type:
        info.problems.append(Problem(file="config.json", message="no model_type",
                                     fix="the folder is not a transformers/MLX model; re-download it"))
    info.architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    info.layer_pattern = layer_pattern(tc)
    if info.layer_pattern:
        info.layer_counts = {LAYER_KINDS.get(c, c): info.layer_pattern.count(c) for c in dict.fromkeys(info.layer_pattern)}
    info.num_layers = _int(tc, "num_hidden_layers") or (len(info.layer_pattern) if info.layer_pattern else None)
    info.hidden_size = _int(tc, "hidden_size", "d_model")
    info.num_attention_heads = _int(tc, "num_attention_heads")
    info.num_kv_heads = _int(tc, "num_key_value_heads") or info.num_attention_heads
    info.head_dim = _int(tc, "head_dim") or (
        info.hidden_size // info.num_attention_heads if info.hidden_size and info.num_attention_heads else None)
    info.vocab_size = _int(tc, "vocab_size")
    info.context_length = _int(tc, "max_position_embeddings", "max_seq_len", "seq_length")
    info.torch_dtype = tc.get("torch_dtype") or tc.get("dtype")
    info.remote_code = bool(config.get("auto_map") or config.get("model_file"))
    q = _quant_config(config)
    if q is not None:
        info.quantization = Quantization(
            bits=q.get("bits") if isinstance(q.get("bits"), int) else None,
            group_size=q.get("group_size") if isinstance(q.get("group_size"), int) else None,
            mode=str(q.get("mode", "affine")),
            overrides=sum(1 for v in q.values() if isinstance(v, dict) or v is False),
        )


def _shard_list(folder: Path, info: ModelInfo, names: set[str]) -> tuple[list[str], dict[str, str] | None, dict]:
    index_path = folder / INDEX_NAME
    if INDEX_NAME not in names:
        return sorted(n for n in names if "/" not in n and n.startswith("model") and n.endswith(".safetensors")), None, {}
    info.has_index = True
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not an object of file names")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        info.problems.append(Problem(file=INDEX_NAME, message=f"unreadable index ({e})",
                                     fix="re-download model.safetensors.index.json"))
        return [], None, {}
    shards: list[str] = []
    for shard in dict.fromkeys(weight_map.values()):
        p = Path(shard)
        if p.is_absolute() or ".." in p.parts or shard != p.as_posix() or "\\" in shard:
            info.problems.append(Problem(file=INDEX_NAME, message=f"weight_map names {shard!r}, outside the folder",
                                         fix="the index is corrupt or hostile; re-download it"))
            continue
        shards.append(shard)
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return sorted(shards), weight_map, metadata


def _read_weights(folder: Path, info: ModelInfo, names: set[str]) -> None:
    shards, weight_map, metadata = _shard_list(folder, info, names)
    info.shards = shards
    if not shards:
        if not any(p.file == INDEX_NAME for p in info.problems):
            info.problems.append(Problem(file="", message="no model*.safetensors weights found",
                                         fix="this is not an MLX model folder (GGUF models run in LM Studio/llama.cpp)"))
        return
    info.format = "mlx"
    tensors: dict[str, dict] = {}
    data_bytes = 0
    for shard in shards:
        path = folder / shard
        if shard not in names:
            info.problems.append(Problem(file=shard, message="listed in the index but missing",
                                         fix="the download is incomplete; re-download the model"))
            continue
        info.weight_bytes += path.stat().st_size
        try:
            header, start, size = read_header(path)
        except ModelFileError as e:
            info.problems.append(Problem(file=shard, message=str(e)))
            continue
        reasons = check_tensors(header, size - start)
        if reasons:
            more = f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""
            info.problems.append(Problem(file=shard, message="; ".join(reasons[:3]) + more,
                                         fix="the file is corrupt or truncated; re-download it"))
            continue
        for name, t in header.items():
            t["_shard"] = shard
            tensors[name] = t
            data_bytes += t["data_offsets"][1] - t["data_offsets"][0]
    info.data_bytes = data_bytes
    if weight_map is not None:
        _check_index(info, weight_map, metadata, tensors, names)
    if tensors:
        _check_quantization(info, tensors)


def _check_index(info: ModelInfo, weight_map: dict, metadata: dict, tensors: dict, names: set[str]) -> None:
    missing = [k for k, shard in weight_map.items() if shard in names and k not in tensors]
    readable = {t["_shard"] for t in tensors.values()}
    missing = [k for k in missing if weight_map[k] in readable]
    if missing:
        info.problems.append(Problem(file=INDEX_NAME, message=f"{len(missing)} tensors in weight_map are not in their "
                                     f"shard (first: {missing[0]})", fix="index and shards disagree; re-download"))
    unlisted = [k for k in tensors if k not in weight_map]
    if unlisted:
        info.problems.append(Problem(file=INDEX_NAME, message=f"{len(unlisted)} tensors are in shards but not in "
                                     f"weight_map (first: {unlisted[0]})", fix="index and shards disagree; re-download",
                                     severity="warning"))
    extra = sorted(n for n in names if n.startswith("model") and n.endswith(".safetensors")
                   and "/" not in n and n not in set(weight_map.values()))
    if extra:
        info.problems.append(Problem(file=extra[0], message=f"{len(extra)} safetensors file(s) not in the index",
                                     fix="left over from another download; they are ignored", severity="warning"))
    total = metadata.get("total_size")
    if isinstance(total, int) and not missing and readable == set(info.shards) and total != info.data_bytes:
        info.problems.append(Problem(file=INDEX_NAME, message=f"metadata.total_size {total} != {info.data_bytes} bytes "
                                     "of tensor data", fix="index and shards disagree; re-download",
                                     severity="warning"))


def _check_quantization(info: ModelInfo, tensors: dict) -> None:
    """Find quantized modules (U32 weight + scales), check their bits, and count parameters."""
    q = info.quantization
    params = 0
    quantized = 0
    for name, t in tensors.items():
        numel = math.prod(t["shape"])
        if name.endswith((".scales", ".biases")) and (name.rsplit(".", 1)[0] + ".weight") in tensors:
            base = tensors[name.rsplit(".", 1)[0] + ".weight"]
            if base["dtype"] == "U32":
                continue  # quantization metadata, not parameters
        if name.endswith(".weight") and t["dtype"] == "U32" and (name[:-7] + ".scales") in tensors:
            quantized += 1
            scales = tensors[name[:-7] + ".scales"]
            group = _group_size(info, name[:-7])
            if group and scales["shape"] and t["shape"]:
                bits = t["shape"][-1] * 32 / (scales["shape"][-1] * group)
                expected = _bits_for(info, name[:-7])
                if expected and abs(bits - expected) > 1e-6:
                    info.problems.append(Problem(
                        file=t["_shard"], message=f"{name[:-7]} is stored at {bits:g} bits, config says {expected}",
                        fix="config.json's quantization block does not match the weights; re-download"))
                    expected = None
                params += numel * 32 // int(round(bits)) if bits else numel
            else:
                params += numel
            continue
        params += numel
    info.parameters = params
    if q is not None:
        q.quantized_tensors = quantized
    elif quantized:
        info.problems.append(Problem(file="config.json", message=f"{quantized} quantized tensors but no quantization "
                                     "block", fix="config.json is not the one of these weights; re-download it"))


def _module_override(info: ModelInfo, module: str) -> dict | bool | None:
    q = _quant_config(info.config) or {}
    v = q.get(module)
    return v if isinstance(v, (dict, bool)) else None


def _group_size(info: ModelInfo, module: str) -> int | None:
    o = _module_override(info, module)
    if isinstance(o, dict) and isinstance(o.get("group_size"), int):
        return o["group_size"]
    return info.quantization.group_size if info.quantization else None


def _bits_for(info: ModelInfo, module: str) -> int | None:
    o = _module_override(info, module)
    if isinstance(o, dict) and isinstance(o.get("bits"), int):
        return o["bits"]
    return info.quantization.bits if info.quantization else None


def _has_chat_template(folder: Path, names: set[str]) -> bool:
    if "chat_template.jinja" in names or "chat_template.json" in names:
        return True
    if "tokenizer_config.json" not in names:
        return False
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and bool(cfg.get("chat_template"))
