"""scripts/test_nemotron_exo.sh end to end against exo's own API code (tests/fixtures_exo.py), run as its own
process with its read-only dir set to the links dir the script's `link` fills. The miniatures stand in under
the real ids in a temporary HOME; the script drives the installed arthur-cluster command as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arthur_cluster import paths
from tests import realshape
from tests.conftest import NEMOTRON_CONFIG, copy_model
from tests.fixtures_exo import LLAMA_ID, NEMOTRON_ID, wait_for
from tests.linkhelp import content_hashes

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "test_nemotron_exo.sh"
ARTHUR = Path(sys.executable).parent / "arthur-cluster"


@pytest.fixture
def library(tmp_path, tiny_models) -> Path:
    models = tmp_path / "lmstudio-models"
    copy_model(tiny_models["nemotron_h-8bit"], models / NEMOTRON_ID)
    copy_model(tiny_models["llama-4bit"], models / LLAMA_ID)
    before = content_hashes(models)
    yield models
    assert content_hashes(models) == before, "a source file in the LM Studio folder changed"


def harness(exo_factory, *flags: str):
    return exo_factory("--nodes", "2", *flags, links=paths.exo_links_dir())


def run_script(url: str, library: Path, *args: str, timeout: str = "60") -> subprocess.CompletedProcess:
    env = {**os.environ, "EXO_API": url, "LMSTUDIO_MODELS": str(library), "ARTHUR_CLUSTER": str(ARTHUR),
           "UP_TIMEOUT": timeout, "PROBE_FLAGS": "--static-only", "COLUMNS": "200"}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=os.environ["HOME"], capture_output=True,
                          text=True, timeout=300)


def test_nemotron_comes_up_on_exo_and_answers_and_a_rerun_is_safe(exo_factory, library):
    h = harness(exo_factory)
    res = run_script(h.url, library)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert f"up: {NEMOTRON_ID}" in out and "route:    exo pipeline/ring on 2 nodes" in out
    assert "question: What is 2+2?" in out and "answer:   '2 + 2 = 4.'" in out and "tokens/s:" in out
    assert "fallback:" not in out and "Traceback" not in out + res.stderr
    assert len(h.instances()) == 1 and NEMOTRON_ID in h.custom_cards()
    record = json.loads(paths.deployment_file().read_text())
    assert record["endpoint"] == h.url and 0 < record["smoke"]["generation_tokens"] <= 50

    again = run_script(h.url, library, "--down")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reusing it" in again.stderr + again.stdout  # the rerun placed nothing new
    assert f"up: {NEMOTRON_ID}" in again.stdout
    assert wait_for(lambda: h.instances() == {})  # --down deleted the one instance, which the rerun reused


def test_nodes_too_small_fall_back_to_the_llama_and_say_why(exo_factory, tmp_path, tiny_models):
    models = tmp_path / "lmstudio-models"
    realshape.build(models / NEMOTRON_ID, NEMOTRON_CONFIG)  # the real shape: 33.6 GB (sparse)
    copy_model(tiny_models["llama-4bit"], models / LLAMA_ID)
    h = harness(exo_factory, "--ram-gib", "10")
    res = run_script(h.url, models)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"up: {LLAMA_ID}" in res.stdout and "fallback:" in res.stdout and "does not fit" in res.stdout


def test_dry_run_changes_nothing(exo_factory, library):
    h = harness(exo_factory)
    res = run_script(h.url, library, "--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "would run:" in res.stdout and NEMOTRON_ID in res.stdout
    assert not paths.deployment_file().exists() and not any(paths.exo_links_dir().iterdir())
    assert h.instances() == {} and h.custom_cards() == {}


@pytest.mark.parametrize("fault, said", [(("--fail-runner", "Metal out of memory"), "Metal out of memory"),
                                         (("--error-after", "2"), "Runner on node exonode-1 disconnected")])
def test_exit_is_nonzero_when_no_model_answers_and_exos_reason_is_shown(exo_factory, library, fault, said):
    h = harness(exo_factory, *fault)
    res = run_script(h.url, library)
    assert res.returncode == 1
    assert "FAILED: no model answered" in res.stdout
    assert said in res.stdout + res.stderr and "Traceback" not in res.stdout + res.stderr
    assert h.instances() == {}
