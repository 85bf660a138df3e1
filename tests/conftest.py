"""Shared fixtures: miniature models (random weights, offline tokenizer) and isolated homes.

Nothing here downloads anything. Models are built once per session and copied where a test needs
to change them; tests that must not change a folder get it read-only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from arthur_cluster import miniature

CONFIGS = Path(miniature.__file__).resolve().parent / "data"
NEMOTRON_CONFIG = CONFIGS / "nemotron-3-nano-30b-a3b-mlx-8bit.config.json"
LLAMA_CONFIG = CONFIGS / "llama-3.2-1b-instruct-4bit.config.json"

NEMOTRON_ID = "lmstudio-community/NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit"
LLAMA_ID = "mlx-community/Llama-3.2-1B-Instruct-4bit"

pytest_plugins = ["tests.fixtures_exo"]


def real_config(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Every test gets its own HOME and caches: nothing touches the developer's real folders."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "XDG_DATA_HOME",
                "EXO_HOME", "EXO_MODELS_DIRS", "EXO_MODELS_READ_ONLY_DIRS", "EXO_DEFAULT_MODELS_DIR",
                "ARTHUR_LMSTUDIO_HOME", "ARTHUR_LMSTUDIO_MODELS", "ARTHUR_CLUSTER_HOME", "ARTHUR_CLUSTER_MODELS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield home


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Miniatures built once: nemotron_h 8-bit (two shards, pattern from the real config),
    nemotron_h float32, llama 4-bit. Treat as read-only; copy with `copy_model` to change."""
    root = tmp_path_factory.mktemp("tiny")
    nemotron = real_config(NEMOTRON_CONFIG)
    out = {
        "nemotron_h-8bit": miniature.make(root / "nemotron_h-8bit", "nemotron_h", like=nemotron,
                                          quant=miniature.quantization_like(nemotron), shards=2),
        "nemotron_h-f32": miniature.make(root / "nemotron_h-f32", "nemotron_h", like=nemotron),
        "llama-4bit": miniature.make(root / "llama-4bit", "llama",
                                     quant={"group_size": 64, "bits": 4, "mode": "affine"}),
    }
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def make_read_only(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)


@pytest.fixture
def lmstudio_home(tmp_path, tiny_models, monkeypatch) -> Path:
    """An LM Studio home (~/.lmstudio) holding the tiny models under publisher/repo folders."""
    home = Path(os.environ["HOME"]) / ".lmstudio"
    models = home / "models"
    copy_model(tiny_models["nemotron_h-8bit"], models / "lmstudio-community" / "Tiny-NemotronH-MLX-8bit")
    copy_model(tiny_models["llama-4bit"], models / "mlx-community" / "Tiny-Llama-MLX-4bit")
    return home
