"""scripts/test_nemotron_exo.sh end to end: the exo contract simulator runs as its own process (exo itself
cannot run here), the miniatures stand in under the real ids in a temporary HOME, and the script drives the
installed arthur-cluster command exactly as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import copy_model
from tests.fixtures_exo import SIM_LLAMA_ID, SIM_LMSTUDIO_NEMOTRON_ID

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "test_nemotron_exo.sh"
ARTHUR = Path(sys.executable).parent / "arthur-cluster"


@pytest.fixture
def library(tmp_path, tiny_models) -> Path:
    models = tmp_path / "lmstudio-models"
    copy_model(tiny_models["nemotron_h-8bit"], models / SIM_LMSTUDIO_NEMOTRON_ID)
    copy_model(tiny_models["llama-4bit"], models / SIM_LLAMA_ID)
    return models


@pytest.fixture
def simulator(library):
    """start(*faults, nemotron=True) -> URL of a simulator process; stopped after the test."""
    procs: list[subprocess.Popen] = []

    def start(*faults: str, nemotron: bool = True) -> str:
        args = [sys.executable, "-m", "tests.exo_simulator", "--port", "0",
                "--model", f"{SIM_LLAMA_ID}={library / SIM_LLAMA_ID}"]
        if nemotron:
            args += ["--model", f"{SIM_LMSTUDIO_NEMOTRON_ID}={library / SIM_LMSTUDIO_NEMOTRON_ID}"]
        for f in faults:
            args += ["--fault", f]
        p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        url = p.stdout.readline().strip()
        assert url.startswith("http://"), "the simulator did not start"
        return url

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def run_script(url: str, library: Path, *args: str, timeout: str = "60") -> subprocess.CompletedProcess:
    env = {**os.environ, "EXO_API": url, "LMSTUDIO_MODELS": str(library), "ARTHUR_CLUSTER": str(ARTHUR),
           "UP_TIMEOUT": timeout, "PROBE_FLAGS": "--static-only", "COLUMNS": "200"}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=os.environ["HOME"], capture_output=True,
                          text=True, timeout=300)


def instances(url: str) -> dict:
    return requests.get(f"{url}/state/instances", timeout=5).json()


def test_nemotron_comes_up_on_exo_and_answers_and_a_rerun_is_safe(simulator, library):
    url = simulator()
    res = run_script(url, library)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert f"up: {SIM_LMSTUDIO_NEMOTRON_ID}" in out
    assert "route:    exo pipeline/ring on 2 nodes" in out
    assert "question: What is 2+2?" in out and "answer:" in out and "tokens/s:" in out
    assert "fallback:" not in out
    assert "Traceback" not in out + res.stderr
    first = instances(url)
    assert len(first) == 1
    record = json.loads((Path(os.environ["HOME"]) / ".local/share/arthur-cluster/deployment.json").read_text())
    assert record["endpoint"] == url and 0 < record["smoke"]["generation_tokens"] <= 50

    again = run_script(url, library, "--down")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reusing it" in again.stderr + again.stdout  # the rerun placed nothing new
    assert f"up: {SIM_LMSTUDIO_NEMOTRON_ID}" in again.stdout
    assert instances(url) == {}  # --down deleted the one instance, which the rerun reused


def test_falls_back_to_the_llama_and_says_why(simulator, library):
    url = simulator(nemotron=False)  # this exo cannot make a card for the LM Studio Nemotron
    res = run_script(url, library)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"up: {SIM_LLAMA_ID}" in res.stdout
    assert "fallback:" in res.stdout and "rejects a card" in res.stdout


def test_dry_run_changes_nothing(simulator, library):
    url = simulator()
    res = run_script(url, library, "--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "would run:" in res.stdout and SIM_LMSTUDIO_NEMOTRON_ID in res.stdout
    state = Path(os.environ["HOME"]) / ".local/share/arthur-cluster"
    assert not (state / "deployment.json").exists() and not (state / "exo-models").exists()
    assert instances(url) == {}


def test_exit_is_nonzero_when_no_model_answers(simulator, library):
    url = simulator("never_ready")
    res = run_script(url, library, timeout="1")
    assert res.returncode == 1
    assert "FAILED: no model answered" in res.stdout
    assert "not ready after 1 s" in res.stderr and "Traceback" not in res.stderr
