"""Header-only inspection: real shapes, tiny real models, and every way a folder can be broken."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from arthur_cluster import modelfiles
from tests import realshape
from tests.conftest import LLAMA_CONFIG, NEMOTRON_CONFIG, copy_model


@pytest.fixture(scope="module")
def nemotron_realshape(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rs") / "lmstudio-community" / "NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit"
    return realshape.build(folder, NEMOTRON_CONFIG)


def test_real_shape_nemotron(nemotron_realshape):
    info = modelfiles.inspect(nemotron_realshape)
    assert info.ok, info.problems
    assert info.format == "mlx" and info.model_type == "nemotron_h"
    assert info.layer_counts == {"mamba": 23, "moe": 23, "attention": 6}
    assert info.num_layers == 52 and info.num_kv_heads == 2 and info.context_length == 262144
    assert info.quantization.bits == 8 and info.quantization.group_size == 64 and info.quantization.mode == "affine"
    assert 31.0e9 < info.parameters < 32.5e9  # "30B-A3B": 31.6B in total
    assert len(info.shards) > 1 and info.has_index
    assert 30e9 < info.weight_bytes < 36e9
    # sparse: the apparent size is real, the disk usage is not
    used = sum(os.stat(nemotron_realshape / s).st_blocks * 512 for s in info.shards)
    assert used < 50 * 1024 * 1024


def test_tiny_models_parameter_count_matches_loaded_model(tiny_models):
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load

    for folder in tiny_models.values():
        info = modelfiles.inspect(folder)
        assert info.ok and info.tokenizer and info.chat_template
        model, _ = load(str(folder))
        # count every parameter of the loaded model, quantized weights at their unpacked size
        expected = 0
        for _, m in tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module)):
            for name, v in tree_flatten(m.parameters()):
                if name in ("scales", "biases") and hasattr(m, "bits"):
                    continue
                expected += v.size * 32 // m.bits if (name == "weight" and hasattr(m, "bits")) else v.size
        expected += sum(v.size for k, v in tree_flatten(model.parameters())
                        if k.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias"))  # held by non-leaf mixers
        assert info.parameters == expected


def test_llama_shape_from_config(tmp_path):
    folder = tmp_path / "llama"
    realshape.build(folder, LLAMA_CONFIG)
    info = modelfiles.inspect(folder)
    assert info.ok, info.problems
    assert info.layer_counts == {"attention": 16} and info.num_kv_heads == 8
    assert info.quantization.bits == 4
    assert 1.1e9 < info.parameters < 1.4e9


def test_inspection_does_not_import_mlx_lm(nemotron_realshape):
    code = ("import sys; from arthur_cluster import modelfiles; "
            f"i = modelfiles.inspect({str(nemotron_realshape)!r}); assert i.ok; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx_lm', 'transformers', 'mlx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- broken folders -------------------------------------------------------------------------------


@pytest.fixture
def model(tmp_path, tiny_models) -> Path:
    return copy_model(tiny_models["nemotron_h-8bit"], tmp_path / "m")


def problems(folder: Path) -> list[str]:
    info = modelfiles.inspect(folder)
    assert not info.ok
    return [str(p) for p in info.errors]


def first_shard(folder: Path) -> Path:
    return folder / sorted(json.loads((folder / modelfiles.INDEX_NAME).read_text())["weight_map"].values())[0]


def test_truncated_shard(model):
    shard = first_shard(model)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    (msg,) = problems(model)
    assert msg.startswith(shard.name) and "outside" in msg and "re-download" in msg


def test_lfs_pointer(model):
    shard = first_shard(model)
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    (msg,) = problems(model)
    assert shard.name in msg and "git-lfs pointer" in msg


def test_missing_shard(model):
    shard = first_shard(model)
    shard.unlink()
    (msg,) = problems(model)
    assert shard.name in msg and "missing" in msg


def test_broken_link_shard(model, tmp_path):
    shard = first_shard(model)
    shard.unlink()
    shard.symlink_to(tmp_path / "gone.safetensors")
    msgs = problems(model)
    assert any(shard.name in m and "broken link" in m for m in msgs)


def test_bad_config(model):
    (model / "config.json").write_text("{not json")
    msgs = problems(model)
    assert any(m.startswith("config.json") and "not valid JSON" in m for m in msgs)


def test_missing_config(model):
    (model / "config.json").unlink()
    assert any(m.startswith("config.json: missing") for m in problems(model))


def test_index_path_traversal(model):
    index = json.loads((model / modelfiles.INDEX_NAME).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../../etc/passwd"
    (model / modelfiles.INDEX_NAME).write_text(json.dumps(index))
    assert any("outside the folder" in m for m in problems(model))


def test_header_length_lies(model):
    shard = first_shard(model)
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    shard.write_bytes(bytes(data))
    (msg,) = problems(model)
    assert shard.name in msg and "does not fit" in msg


def _write_safetensors(path: Path, header: dict, data_len: int) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))


def test_overlapping_tensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _write_safetensors(tmp_path / "model.safetensors", {
        "a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b.weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }, 24)
    (msg,) = problems(tmp_path)
    assert msg.startswith("model.safetensors") and "overlap" in msg


def test_size_does_not_match_dtype_and_shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _write_safetensors(tmp_path / "model.safetensors", {
        "a.weight": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 16]},
        "b.weight": {"dtype": "Q9", "shape": [4], "data_offsets": [16, 20]},
    }, 20)
    (msg,) = problems(tmp_path)
    assert "needs 32" in msg and "unknown dtype 'Q9'" in msg


def test_wrong_bits_in_config(model):
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization"]["bits"] = 4
    (model / "config.json").write_text(json.dumps(cfg))
    assert any("stored at 8 bits, config says 4" in m for m in problems(model))


def test_index_names_tensor_not_in_shard(model):
    index = json.loads((model / modelfiles.INDEX_NAME).read_text())
    index["weight_map"]["backbone.extra.weight"] = first_shard(model).name
    (model / modelfiles.INDEX_NAME).write_text(json.dumps(index))
    assert any("not in their shard" in m and "backbone.extra.weight" in m for m in problems(model))


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert any("no model*.safetensors" in m for m in problems(tmp_path))


def test_gguf_by_magic(tmp_path):
    (tmp_path / "model-Q4_K_M.gguf").write_bytes(struct.pack("<IIQQ", modelfiles.GGUF_MAGIC, 3, 0, 0))
    (tmp_path / "fake.gguf").write_bytes(b"not gguf")
    assert modelfiles.inspect(tmp_path).format == "gguf"
    (tmp_path / "model-Q4_K_M.gguf").unlink()
    assert modelfiles.inspect(tmp_path).format == "other"


def test_require_ok_names_file(model):
    first_shard(model).unlink()
    with pytest.raises(modelfiles.ModelFileError, match="listed in the index but missing"):
        modelfiles.require_ok(modelfiles.inspect(model))


def test_symlink_loop_is_reported(model):
    (model / "loop").symlink_to(model)
    info = modelfiles.inspect(model)
    assert any("symlink loop" in str(p) for p in info.problems)
