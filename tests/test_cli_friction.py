"""Friction a new user met: short names everywhere (up --fallback), a models table that fits 80 columns, lists
each model once, says what GGUF is and explains its columns, and `link --all` that says what it skipped and what
it did."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from arthur_cluster import modelfiles
from tests.conftest import copy_model


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arthur_cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_up_takes_a_short_fallback_name(lmstudio_home, tmp_path):
    proc = cli("up", "nobody/not-here", "--engine", "mlx", "--fallback", "Tiny-Llama-MLX-4bit", "--max-tokens", "4",
               "--json", env={"EXO_API": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr
    dep = json.loads(proc.stdout)
    assert dep["model"] == "mlx-community/Tiny-Llama-MLX-4bit" and dep["smoke"]["generation_tokens"] > 0
    assert "nobody/not-here could not run" in dep["fallback_reason"]
    assert cli("down", "--json").returncode == 0


@pytest.fixture
def messy_library(lmstudio_home, tiny_models):
    models = lmstudio_home / "models"
    gguf = models / "someone" / "Some-Model-GGUF"
    gguf.mkdir(parents=True)
    (gguf / "some-model-Q4_K_M.gguf").write_bytes(struct.pack("<IIQQ", modelfiles.GGUF_MAGIC, 3, 0, 0))
    copy_model(tiny_models["llama-4bit"], models / "a-very-long-publisher-name-for-testing" /
               ("An-Extremely-Long-Model-Name-That-Would-Wrap-A-Table-" + "x" * 60 + "-MLX-4bit"))
    return models


def test_models_table_fits_80_columns_names_gguf_and_lists_each_model_once(messy_library):
    env = {"COLUMNS": "200", "ARTHUR_LMSTUDIO_MODELS": str(messy_library)}
    assert cli("link", "mlx-community/Tiny-Llama-MLX-4bit", env=env).returncode == 0  # an hf* entry appears
    proc = cli("models", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert max(len(ln) for ln in lines) <= 80, "\n".join(lines)
    assert lines[0] == "4 model(s)", "\n".join(lines)  # the linked entry is its LM Studio row's
    flat = "".join(ln.split(" ")[0] for ln in lines)  # the model column, folded lines joined
    long = "a-very-long-publisher-name-for-testing/An-Extremely-Long-Model-Name-That-Would-Wrap-A-Table-"
    assert long + "x" * 60 + "-MLX-4bit" in flat  # never cut
    assert "mlx-community/Tiny-Llama-MLX-4bit" in flat and "lmstudio-community/Tiny-NemotronH-MLX-8bit" in flat
    llama = next(ln for ln in lines if ln.startswith("mlx-community/"))
    assert " lms " in llama and " hf,exo " in llama and llama.rstrip().endswith("ok")
    gguf = next(ln for ln in lines if ln.startswith("someone/Some-Model-GGUF"))
    assert gguf.rstrip().endswith("GGUF") and "  someone/Some-Model-GGUF: GGUF: LM Studio runs it" in proc.stdout
    legend = " ".join(lines[-4:])
    assert "lms LM Studio" in legend and "hf*" in legend and "--json" in legend


def test_link_all_reports_skips_and_a_summary(messy_library, tmp_path):
    env = {"ARTHUR_LMSTUDIO_MODELS": str(messy_library)}
    proc = cli("link", "--all", "--dry-run", "--json", env=env)
    out = json.loads(proc.stdout)
    assert any("someone/Some-Model-GGUF (GGUF" in s for s in out["skipped"]), out["errors"]
    # The very long name is refused by the linker (not a valid repo id): the summary counts it as failed.
    assert out["summary"] == "would link 2 of 4 model(s); skipped 1; failed 1", out["errors"]
    proc = cli("link", "--all", "--dry-run", env=env)
    assert "skipped someone/Some-Model-GGUF" in proc.stdout and "would link 2 of 4" in proc.stdout
    empty = tmp_path / "empty-lms"
    empty.mkdir()
    proc = cli("link", "--all", "--lmstudio-dir", str(empty))
    assert proc.returncode == 0 and f"nothing to link: no models in {empty}" in proc.stdout.replace("\n", "")
