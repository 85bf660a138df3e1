"""The exo side: read-only link directory, exo's completeness rule, custom cards exo would accept."""

from __future__ import annotations

import json
import os
import shlex
import tomllib
from pathlib import Path

import pytest

from arthur_cluster import exocard, linker, paths, sources
from arthur_cluster.modelfiles import read_header
from tests import realshape
from tests.conftest import NEMOTRON_CONFIG, copy_model
from tests.linkhelp import content_hashes, do_link, tree

NEMO = "lmstudio-community/Tiny-NemotronH-MLX-8bit"
LLAMA = "mlx-community/Tiny-Llama-MLX-4bit"
REAL_ID = "lmstudio-community/NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit"

# exo's card schema (strict, unknown keys forbidden): the required keys and the accepted enum values.
REQUIRED = {"model_id", "storage_size", "n_layers", "hidden_size", "supports_tensor", "tasks", "backends"}
TASKS = {"TextGeneration", "TextToImage", "ImageToImage"}
BACKENDS = {"MlxMetal", "MlxCpu", "MlxCuda", "Vllm"}


def exo_would_accept(card: dict) -> None:
    assert REQUIRED <= set(card), REQUIRED - set(card)
    assert set(card) <= exocard.ALLOWED_KEYS
    assert set(card["storage_size"]) == {"in_bytes"} and type(card["storage_size"]["in_bytes"]) is int
    assert type(card["n_layers"]) is int and card["n_layers"] > 0
    assert type(card["hidden_size"]) is int and card["hidden_size"] > 0
    assert type(card["supports_tensor"]) is bool and type(card["trust_remote_code"]) is bool
    assert set(card["tasks"]) <= TASKS and set(card["backends"]) <= BACKENDS and card["backends"]
    if "num_key_value_heads" in card:
        assert type(card["num_key_value_heads"]) is int and card["num_key_value_heads"] > 0


@pytest.fixture(scope="module")
def real_shape(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lms") / REAL_ID
    return realshape.build(folder, NEMOTRON_CONFIG)


def test_exo_link_is_complete_and_card_is_valid(lmstudio_home):
    src = lmstudio_home / "models" / NEMO
    res = do_link(src, NEMO)
    entry = paths.exo_links_dir() / "lmstudio-community--Tiny-NemotronH-MLX-8bit"
    assert res.exo_link == entry and entry.is_symlink() and os.readlink(entry) == str(src)
    assert linker.exo_complete(entry)
    assert res.env_line == f"EXO_MODELS_READ_ONLY_DIRS={paths.exo_links_dir()}"
    card = tomllib.loads(res.card.read_text())
    exo_would_accept(card)
    config = json.loads((src / "config.json").read_text())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert card["model_id"] == NEMO and card["n_layers"] == config["num_hidden_layers"]
    assert card["hidden_size"] == config["hidden_size"]
    assert card["num_key_value_heads"] == config["num_key_value_heads"]
    assert card["storage_size"]["in_bytes"] == index["metadata"]["total_size"]
    assert card["supports_tensor"] is True and card["family"] == "nemotron" and card["quantization"] == "8bit"
    assert card["is_custom"] is True and card["trust_remote_code"] is False
    assert res.card.name == "lmstudio-community--Tiny-NemotronH-MLX-8bit.toml"
    assert res.card.parent == paths.exo_custom_cards_dir()
    found = sources.exo([paths.exo_links_dir()])
    assert [(f.repo_id, f.linked) for f in found] == [(NEMO, True)]


def test_real_shape_card_matches_exos_own_card(real_shape):
    """exo ships a card for the mlx-community 8-bit conversion: same weights, same numbers."""
    res = do_link(real_shape, REAL_ID, hf=False)
    card = tomllib.loads(res.card.read_text())
    exo_would_accept(card)
    assert card["storage_size"]["in_bytes"] == 33559880448
    assert (card["n_layers"], card["hidden_size"], card["context_length"]) == (52, 2688, 262144)
    assert card["num_key_value_heads"] == 2 and card["supports_tensor"] is True
    assert card["base_model"] == "NVIDIA Nemotron 3 Nano 30B A3B"
    assert linker.exo_complete(res.exo_link)


def test_llama_card(lmstudio_home):
    res = do_link(lmstudio_home / "models" / LLAMA, LLAMA, hf=False)
    card = tomllib.loads(res.card.read_text())
    exo_would_accept(card)
    assert card["family"] == "llama" and card["quantization"] == "4bit" and card["supports_tensor"] is True


def test_no_index_explained_then_exo_index(tmp_path, tiny_models):
    src = copy_model(tiny_models["llama-4bit"], tmp_path / "lib" / "org" / "No-Index")
    os.unlink(src / "model.safetensors.index.json")
    before = tree(src), content_hashes(src)
    res = do_link(src, "org/No-Index")
    assert res.exo_link is None and any("never treats such a folder as complete" in w for w in res.warnings)
    assert not (paths.exo_links_dir() / "org--No-Index").exists()
    res = do_link(src, "org/No-Index", exo_index=True)
    entry = paths.exo_links_dir() / "org--No-Index"
    assert res.exo_mode == "index-dir" and entry.is_dir() and not entry.is_symlink()
    assert linker.exo_complete(entry)
    index = json.loads((entry / "model.safetensors.index.json").read_text())
    header, _, _ = read_header(src / "model.safetensors")
    assert set(index["weight_map"]) == set(header) and set(index["weight_map"].values()) == {"model.safetensors"}
    assert all((entry / f).is_symlink() for f in os.listdir(src))
    assert (tree(src), content_hashes(src)) == before  # nothing written into the source
    assert [a.op for a in do_link(src, "org/No-Index", exo_index=True).actions] == ["keep", "keep", "keep"]
    assert linker.doctor().ok
    linker.unlink("org/No-Index")
    assert not entry.exists() and (tree(src), content_hashes(src)) == before


def test_foreign_exo_entry_refused(lmstudio_home):
    src = lmstudio_home / "models" / NEMO
    entry = paths.exo_links_dir() / "lmstudio-community--Tiny-NemotronH-MLX-8bit"
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    home = Path(os.environ["HOME"])
    before = tree(home)
    with pytest.raises(linker.LinkError, match="not made by arthur-cluster"):
        do_link(src, NEMO)
    assert tree(home) == before
    assert any(f.kind == "foreign" for f in linker.doctor().findings)


def test_card_not_ours_left_alone(lmstudio_home):
    src = lmstudio_home / "models" / NEMO
    card = paths.exo_custom_cards_dir() / exocard.card_filename(NEMO)
    card.parent.mkdir(parents=True)
    card.write_text('model_id = "mine"\n')
    res = do_link(src, NEMO)
    assert card.read_text() == 'model_id = "mine"\n' and res.card is None
    assert any("not written by arthur-cluster" in w for w in res.warnings)
    linker.unlink(NEMO)
    assert card.read_text() == 'model_id = "mine"\n'


def test_env_line_keeps_other_dirs_and_quotes(lmstudio_home, monkeypatch, tmp_path):
    monkeypatch.setenv("EXO_MODELS_READ_ONLY_DIRS", "/srv/shared models")
    links = tmp_path / "my links"
    res = do_link(lmstudio_home / "models" / NEMO, NEMO, exo_dir=links, hf=False)
    assert res.env_line == "EXO_MODELS_READ_ONLY_DIRS=" + shlex.quote(f"{links}:/srv/shared models")
    assert shlex.split(res.env_line)[0].split("=", 1)[1].split(":") == [str(links), "/srv/shared models"]


def test_switching_modes_replaces_the_entry(tmp_path, tiny_models):
    src = copy_model(tiny_models["llama-4bit"], tmp_path / "lib" / "org" / "Switch")
    index = (src / "model.safetensors.index.json").read_text()
    os.unlink(src / "model.safetensors.index.json")
    do_link(src, "org/Switch", exo_index=True, hf=False)
    (src / "model.safetensors.index.json").write_text(index)  # the user re-downloaded the index
    res = do_link(src, "org/Switch", hf=False)
    assert res.exo_mode == "symlink" and res.exo_link.is_symlink() and linker.exo_complete(res.exo_link)
    assert linker.doctor().ok
