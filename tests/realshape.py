"""A real-shape LM Studio folder: true tensor names, dtypes and shapes in valid safetensors headers over
sparse files (the data regions are holes), so a 31 GB checkpoint costs a few megabytes of disk.

Shapes come from mlx-lm's own model class built lazily from the real config and quantized lazily:
nothing is evaluated, so no weight memory is used either.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

from arthur_cluster import tinytok

DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "uint32": "U32", "uint8": "U8",
               "int32": "I32", "int8": "I8"}


def tensor_specs(config: dict) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) of the MLX conversion of `config` (quantized if it says so)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    keep = getattr(model, "cast_predicate", lambda _: True)
    q = config.get("quantization")
    if q:
        group, bits, mode = q["group_size"], q["bits"], q.get("mode", "affine")
        nn.quantize(model, group, bits, mode=mode,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group == 0)
    dtype = config.get("torch_dtype", "bfloat16")
    specs = {}
    for name, v in tree_flatten(model.parameters()):
        dt = str(v.dtype).split(".")[-1]
        if mx.issubdtype(v.dtype, mx.floating) and keep(name):
            dt = dtype
        specs[name] = (DTYPE_NAMES[dt], list(v.shape))
    return specs


BITS = {"BF16": 16, "F16": 16, "F32": 32, "U32": 32, "U8": 8, "I32": 32, "I8": 8}


def write_sparse_safetensors(path: Path, specs: dict[str, tuple[str, list[int]]]) -> int:
    """Header with correct offsets, data region left as a hole; returns the data size."""
    header, offset = {}, 0
    for name in sorted(specs):
        dt, shape = specs[name]
        n = math.prod(shape) * BITS[dt] // 8
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "mlx"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def build(folder: Path, config_path: Path, *, shard_bytes: int = 5 * 1024**3) -> Path:
    """Write config, sharded sparse weights with an index, and a tokenizer into `folder`."""
    config = json.loads(Path(config_path).read_text())
    specs = tensor_specs(config)
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[dict] = [{}]
    size = 0
    for name in sorted(specs):
        dt, shape = specs[name]
        n = math.prod(shape) * BITS[dt] // 8
        if groups[-1] and size + n > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = specs[name]
        size += n
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        total += write_sparse_safetensors(folder / fname, group)
        weight_map.update({k: fname for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    shutil.copyfile(config_path, folder / "config.json")
    tinytok.write(folder)
    return folder
