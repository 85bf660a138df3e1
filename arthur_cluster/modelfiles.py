"""Know a model folder from its files alone: config, index, safetensors headers, tokenizer.

Reads two small pieces of each shard (the 8-byte length and the JSON header), never the weights, and
never imports mlx_lm or transformers. Problems are collected, not raised, so a broken folder yields a
report that names the file and the fix; `require_ok` turns errors into an exception where needed.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import struct
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from . import safeio
from .errors import ArthurError

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
MAX_RANK = 8  # tensor dimensions
MAX_DIM = 2**40  # one dimension; a larger one could never fit any file
MAX_LAYERS = 100_000  # num_hidden_layers and layer patterns; real models have a few hundred at most
MAX_CONFIG_INT = 2**40  # sizes in config.json (hidden size, vocabulary, context ...)


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
    outside: bool = False  # a file link leading out of the model folder (the linker links only model files)


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


MAX_FILES = 20_000  # per model folder; the largest real ones hold a few thousand
MAX_DEPTH = 16  # folder levels below the model folder
MAX_NAME = 1024  # characters of a file's path inside the folder


def list_files(folder: Path) -> tuple[list[FileEntry], list[Problem]]:
    """The regular files of the folder, sorted by name. Folder links are never followed (a link like
    `notes -> ~/private` or `usr -> /usr` is not part of the model); file links are (HF snapshots and link
    folders are made of them) and marked when they lead out of the folder; the walk is capped."""
    top = os.path.realpath(folder)
    entries: list[FileEntry] = []
    problems: list[Problem] = []
    stack: list[tuple[str, int]] = [("", 0)]
    while stack:
        rel_dir, depth = stack.pop()
        try:
            listing = sorted(os.scandir(os.path.join(folder, rel_dir)), key=lambda e: e.name)
        except OSError as e:
            problems.append(Problem(file=rel_dir, message=f"cannot list ({e.strerror})", fix="check its permissions"))
            continue
        for e in listing:
            if e.name.startswith("."):
                continue
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            entry = _file_entry(e, rel, depth, top, stack, problems)
            if entry is not None:
                entries.append(entry)
                if len(entries) > MAX_FILES:
                    problems.append(Problem(file="", message=f"more than {MAX_FILES} files (the cap per model "
                                            "folder): this is not a model folder",
                                            fix="point at the folder that holds config.json and the weights"))
                    return [], problems
    entries.sort(key=lambda e: e.name)
    return entries, problems


def _file_entry(e: os.DirEntry, rel: str, depth: int, top: str, stack: list[tuple[str, int]],
                problems: list[Problem]) -> FileEntry | None:
    if not _utf8(rel):
        shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
        problems.append(Problem(file=shown, message="name is not valid UTF-8: skipped (the hub and exo cannot "
                                "name it)", fix="rename the file", severity="warning"))
        return None
    if len(rel) > MAX_NAME:
        problems.append(Problem(file=rel[:80] + "...", message=f"path longer than {MAX_NAME} characters (the cap)",
                                fix="rename or remove it"))
        return None
    try:
        st = os.stat(e.path)  # follows a link: what would be read
    except OSError as err:
        problems.append(Problem(file=rel, message=f"cannot stat ({err.strerror}); a broken link?",
                                fix="restore the file or re-download the model"))
        return None
    outside = False
    if e.is_symlink():
        real = os.path.realpath(e.path)
        outside = not real.startswith(top + os.sep)
        if stat.S_ISDIR(st.st_mode):
            loop = real == top or top.startswith(real + os.sep)
            problems.append(Problem(file=rel, message=("symlink loop: " if loop else "")
                                    + f"a link to the folder {real}, not followed (a model's files are the files "
                                    "inside its folder)", fix="remove the link, or copy what the model needs into "
                                    "the folder", severity="warning"))
            return None
    if stat.S_ISDIR(st.st_mode):
        if depth + 1 > MAX_DEPTH:
            problems.append(Problem(file=rel, message=f"nested deeper than {MAX_DEPTH} folders (the cap)",
                                    fix="this is not a model folder's layout; point at the model folder"))
        else:
            stack.append((rel, depth + 1))
        return None
    if not stat.S_ISREG(st.st_mode):
        problems.append(Problem(file=rel, message="not a regular file (a FIFO, socket or device): never read",
                                fix="remove it, or put the real file in its place"))
        return None
    return FileEntry(name=rel, size=st.st_size, mtime_ns=st.st_mtime_ns, kind=_kind(e.name), outside=outside)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def is_gguf(path: Path) -> bool:
    try:
        with safeio.open_regular(path) as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and struct.unpack("<I", head)[0] == GGUF_MAGIC


def read_header(path: Path) -> tuple[dict, int, int]:
    """Return (tensors, data_start, file_size) for a safetensors file; raise ModelFileError with the reason."""
    try:
        with safeio.open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
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
    except safeio.UnsafeFileError as e:
        raise ModelFileError(str(e)) from None
    except OSError as e:
        raise ModelFileError(f"cannot read ({e.strerror})") from None
    try:
        header = safeio.loads_json(raw)
    except ValueError as e:  # UnicodeDecodeError included
        raise ModelFileError(f"header is not valid JSON ({e}): the file is corrupt; re-download it") from None
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
        if not (isinstance(shape, list) and len(shape) <= MAX_RANK
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)):
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
    if isinstance(n, int) and 0 < n <= MAX_LAYERS:
        return "*" * n
    return None


_SIZE_KEYS = ("hidden_size", "d_model", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
              "intermediate_size", "max_position_embeddings", "max_seq_len", "seq_length")


def _config_caps(config: dict) -> list[Problem]:
    """Numbers no real model has (10**13 layers) would otherwise exhaust memory further down."""
    out = []
    checks = [("num_hidden_layers", MAX_LAYERS)] + [(k, MAX_CONFIG_INT) for k in _SIZE_KEYS]
    for key, cap in checks:
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= cap:
            out.append(Problem(file="config.json", message=f"{key} = {v} is outside 0..{cap} (the cap)",
                               fix="config.json is corrupt; re-download it"))
    for key in ("hybrid_override_pattern", "layers_block_type", "layer_types"):
        v = config.get(key)
        if isinstance(v, (str, list)) and len(v) > MAX_LAYERS:
            out.append(Problem(file="config.json", message=f"{key} has {len(v)} entries, over the cap of "
                               f"{MAX_LAYERS} layers", fix="config.json is corrupt; re-download it"))
    return out


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
    try:
        top = [e.name for e in os.scandir(folder)]
    except OSError as e:
        why = "not a directory (moved or deleted?)" if e.errno in (errno.ENOENT, errno.ENOTDIR) else \
            f"cannot be listed ({e.strerror})"
        info.problems.append(Problem(file="", message=why,
                                     fix="check the path, or run `arthur-cluster models` to list what exists"))
        return info
    if not any(n == "config.json" or n.endswith((".safetensors", ".gguf")) for n in top):
        # Checked before walking: `probe /` must not walk the whole disk.
        info.problems.append(Problem(file="", message="no config.json, *.safetensors or *.gguf in it: not a model "
                                     "folder", fix="point at the folder that holds the model's config.json and "
                                     "weights (`arthur-cluster models` lists them)"))
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
        config = safeio.read_json(path)
    except FileNotFoundError:
        info.problems.append(Problem(file="config.json", message="missing",
                                     fix="copy config.json from the original repo or re-download the model"))
        return
    except safeio.UnsafeFileError as e:
        info.problems.append(Problem(file="config.json", message=str(e), fix="re-download config.json"))
        return
    except (OSError, ValueError) as e:
        info.problems.append(Problem(file="config.json", message=f"not valid JSON ({e})",
                                     fix="re-download config.json"))
        return
    if not isinstance(config, dict):
        info.problems.append(Problem(file="config.json", message="not a JSON object", fix="re-download config.json"))
        return
    info.config = config
    tc = text_config(config)
    capped = _config_caps(tc)
    if capped:
        info.problems += capped
        return
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
        index = safeio.read_json(index_path)
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
            per_row = scales["shape"][-1] * group if group and scales["shape"] and t["shape"] else 0
            bits = t["shape"][-1] * 32 / per_row if per_row > 0 else 0
            if group and scales["shape"] and t["shape"] and not 1 <= round(bits) <= 32:
                info.problems.append(Problem(
                    file=t["_shard"], message=f"{name[:-7]}: weight {t['shape']} and scales {scales['shape']} with "
                    f"group size {group} give no usable bit width", fix="the file is corrupt; re-download it"))
                params += numel
            elif per_row > 0:
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
        cfg = safeio.read_json(folder / "tokenizer_config.json")
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and bool(cfg.get("chat_template"))
