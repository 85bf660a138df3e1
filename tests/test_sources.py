"""Discovery and locations: LM Studio's home rules, the HF cache precedence, exo's directories."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from arthur_cluster import catalog, paths, sources


def test_lmstudio_home_rules(tmp_path, monkeypatch):
    home = Path(os.environ["HOME"])
    assert paths.lmstudio_home() == home / ".lmstudio"
    (home / ".cache" / "lm-studio").mkdir(parents=True)
    assert paths.lmstudio_home() == home / ".cache" / "lm-studio"  # older installs
    (home / ".lmstudio-home-pointer").write_text(str(tmp_path / "elsewhere") + "\n")
    assert paths.lmstudio_home() == tmp_path / "elsewhere"
    monkeypatch.setenv(paths.ENV_LMSTUDIO_HOME, str(tmp_path / "flag"))
    assert paths.lmstudio_home() == tmp_path / "flag"


def test_lmstudio_models_folder_from_settings(tmp_path):
    lms = tmp_path / "lms"
    lms.mkdir()
    assert paths.lmstudio_models(lms) == lms / "models"
    (lms / "settings.json").write_text(json.dumps({"downloadsFolder": str(tmp_path / "big disk")}))
    assert paths.lmstudio_models(lms) == tmp_path / "big disk"
    (lms / "settings.json").write_text("{broken")
    assert paths.lmstudio_models(lms) == lms / "models"


def test_hf_cache_precedence(monkeypatch, tmp_path):
    home = Path(os.environ["HOME"])
    assert paths.hf_cache() == home / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.hf_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert paths.hf_cache() == tmp_path / "hfhome" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert paths.hf_cache() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert paths.hf_cache() == tmp_path / "hub"


def test_hf_cache_agrees_with_huggingface_hub(monkeypatch, tmp_path):
    import subprocess

    env = {**os.environ, "HF_HOME": str(tmp_path / "x")}
    env.pop("HF_HUB_CACHE", None)
    code = "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"
    theirs = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "x"))
    assert Path(theirs) == paths.hf_cache()


def test_exo_dirs(monkeypatch, tmp_path):
    home = Path(os.environ["HOME"])
    if sys.platform != "darwin":
        assert paths.exo_default_models_dir() == home / ".local" / "share" / "exo" / "models"
    monkeypatch.setenv("EXO_MODELS_READ_ONLY_DIRS", f"{tmp_path}/ro1:{tmp_path}/ro2")
    monkeypatch.setenv("EXO_MODELS_DIRS", f"{tmp_path}/rw")
    dirs = paths.exo_models_dirs()
    assert dirs[:3] == [tmp_path / "ro1", tmp_path / "ro2", tmp_path / "rw"]  # read-only first


def test_discover_lmstudio_two_levels(lmstudio_home, tmp_path):
    models = lmstudio_home / "models"
    (models / "pub" / "gguf-only").mkdir(parents=True)
    (models / "pub" / "gguf-only" / "x.gguf").write_bytes(b"GGUF")
    (models / "pub" / "empty").mkdir()
    (models / "pub" / "nested" / "deeper").mkdir(parents=True)
    (models / "pub" / "nested" / "deeper" / "config.json").write_text("{}")
    found = {f.repo_id: f for f in sources.lmstudio()}
    assert set(found) == {"lmstudio-community/Tiny-NemotronH-MLX-8bit", "mlx-community/Tiny-Llama-MLX-4bit",
                          "pub/gguf-only"}
    assert all(f.source == "lmstudio" for f in found.values())


def test_resolve(lmstudio_home):
    found = sources.lmstudio()
    assert [f.repo_id for f in sources.resolve("mlx-community/Tiny-Llama-MLX-4bit", found)] == [
        "mlx-community/Tiny-Llama-MLX-4bit"]
    assert len(sources.resolve("tiny-llama-mlx-4bit", found)) == 1  # name alone, any case
    assert sources.resolve("nothing/here", found) == []
    by_path = sources.resolve(str(lmstudio_home / "models" / "mlx-community" / "Tiny-Llama-MLX-4bit"), [])
    assert by_path[0].source == "path" and by_path[0].repo_id == "mlx-community/Tiny-Llama-MLX-4bit"


def test_catalogue_loads_and_orders():
    cat = catalog.load(catalog.REPO_ROOT_CATALOG)
    ids = cat.candidates()
    assert ids[0] == cat.target and "nemotron" in ids[0].lower()
    assert ids[1] == "mlx-community/Llama-3.2-1B-Instruct-4bit"
    assert cat.entry(ids[0]).context_length == 262144
    assert cat.for_demo().target.startswith("arthur-demo/")


@pytest.mark.parametrize("text,fragment", [
    ("target = ", "not valid TOML"),
    ('fallbacks = ["a/b"]', "target: Field required"),
    ('target = "no-slash"', "not a full repo id"),
    ('target = "a/b"\n[models."a/b"]\ncontext_length = -1', "greater than 0"),
    ('target = "a/b"\nsurprise = 1', "surprise: Extra inputs"),
])
def test_catalogue_errors_name_file_and_problem(tmp_path, text, fragment):
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(catalog.CatalogError) as e:
        catalog.load(path)
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_catalogue_missing(tmp_path):
    with pytest.raises(catalog.CatalogError, match="not found"):
        catalog.load(tmp_path / "nope.toml")


def test_repo_id_from_each_layout(tmp_path):
    hf = tmp_path / "hub" / "models--mlx-community--Llama-3.2-1B-Instruct-4bit" / "snapshots" / "abc123"
    exo = tmp_path / "exo" / "models" / "mlx-community--Llama-3.2-1B-Instruct-4bit"
    lms = tmp_path / "lmstudio" / "models" / "mlx-community" / "Llama-3.2-1B-Instruct-4bit"
    for folder in (hf, exo, lms):
        assert sources.repo_id_of(folder) == "mlx-community/Llama-3.2-1B-Instruct-4bit"
