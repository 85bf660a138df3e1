"""One memory plan and one fit verdict: `probe`, `pick` and `doc --plan` give the same peak and the same verdict
for the same model, context and nodes (this machine), on real-shape folders that do and do not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import realshape
from tests.conftest import LLAMA_CONFIG, NEMOTRON_CONFIG, NEMOTRON_ID

CONTEXT = "4096"


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lms")
    realshape.build(root / "lmstudio-community" / NEMOTRON_ID.split("/")[1], NEMOTRON_CONFIG)
    realshape.build(root / "mlx-community" / "Llama-3.2-1B-Instruct-4bit", LLAMA_CONFIG)
    return root


def cli(library: Path, tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "ARTHUR_LMSTUDIO_MODELS": str(library), "EXO_API": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "arthur_cluster.cli", *args, "--json"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def _from_probe(out: dict) -> tuple[int, bool]:
    route = next(r for r in out["routes"] if r["engine"] == "mlx" and r["sharding"] == "single")
    return route["peak_bytes"], route["fits"]


def _from_doc(out: dict) -> tuple[int, bool]:
    assert out["memory"]["context"] == int(CONTEXT)
    node = out["memory"]["nodes"][0]
    return node["total"], node["fits"]


def _from_pick(out: dict, model: str) -> tuple[int, bool]:
    choice = out.get("choice")
    if choice and choice["model"] == model and choice["route"]["sharding"] == "single":
        return choice["plan"]["nodes"][0]["total"], True
    rejections = (choice or {}).get("rejections") or out.get("rejections")
    miss = next(r for r in rejections if r["model"] == model and r["stage"] == "memory")
    return miss["reason"], False


@pytest.mark.parametrize("model", [NEMOTRON_ID, "mlx-community/Llama-3.2-1B-Instruct-4bit"])
def test_probe_pick_and_doc_plan_agree(library, tmp_path, model):
    doc = tmp_path / "doc.md"
    doc.write_text("\n\n".join(f"Paragraph {i}: the cluster splits the model's layers over nodes." for i in range(900)))
    probe_peak, probe_fits = _from_probe(cli(library, tmp_path, "probe", model, "--static-only", "--context", CONTEXT))
    doc_peak, doc_fits = _from_doc(cli(library, tmp_path, "doc", str(doc), "--ask", "Q?", "--model", model,
                                       "--context", CONTEXT, "--plan"))
    pick = _from_pick(cli(library, tmp_path, "pick", model, "--engine", "mlx", "--context", CONTEXT), model)
    assert probe_peak == doc_peak and probe_fits == doc_fits
    if isinstance(pick[0], str):  # a rejection: its text carries the same figure
        from arthur_cluster.memory import human_bytes

        assert human_bytes(probe_peak) in pick[0] and pick[1] == probe_fits is False
    else:
        assert pick == (probe_peak, probe_fits)


def test_doc_plan_on_an_exo_deployment_uses_exo_node_memory(shared_exo, tiny_models):
    """An exo deployment is planned on exo's nodes with the memory exo reports, as pick judges exo routes."""
    from arthur_cluster import bringup, docjob, documents
    from arthur_cluster.fallback import Route
    from tests.fixtures_exo import LLAMA_ID

    memory = shared_exo.get("/state/nodeMemory")
    nodes = sorted(memory)
    dep = bringup.Deployment(
        model=LLAMA_ID, served_id=LLAMA_ID, engine="exo",
        route=Route(engine="exo", sharding="pipeline", backend="ring", nodes=2), endpoint=shared_exo.url,
        nodes=nodes, model_path=tiny_models["llama-4bit"],
        smoke=bringup.Smoke(question="q", answer="a"))
    bringup.write_record(dep)
    planner = docjob.plan_runner()
    plan = docjob.plan_job(documents.Document("Some text about nodes.\n\nMore text."), docjob.make_tasks(["Q?"]),
                           planner, max_tokens=8, warmup=False)
    assert sorted(n.node for n in plan.memory.nodes) == nodes and plan.memory.split == "pipeline"
    for node in plan.memory.nodes:
        assert node.budget == memory[node.node]["ramAvailable"]["inBytes"] and node.fits is True
    # Rates a run on the deployment's engine recorded are found by the next plan, made without weights.
    engine = docjob.open_runner()
    assert isinstance(engine, docjob.EngineRunner)
    docjob.record_rates(engine, {"prefill_tps": 900.0, "decode_tps": 30.0})
    again = docjob.plan_job(documents.Document("Some text about nodes.\n\nMore text."), docjob.make_tasks(["Q?"]),
                            docjob.plan_runner(), max_tokens=8, warmup=False)
    assert again.decode_tps == 30.0 and again.seconds is not None


def test_probe_and_pick_agree_on_a_cluster_pipeline(library, tmp_path):
    """Two 24 GiB nodes of models.toml's [cluster]: the pipeline stages (sized by each node's budget) and so
    the busiest node's figure are the same in probe and pick."""
    toml = tmp_path / "models.toml"
    toml.write_text(f'target = "{NEMOTRON_ID}"\nfallbacks = []\n[cluster]\nbackend = "ring"\n'
                    + "".join(f'[[cluster.nodes]]\nname = "mini{i}"\nmemory_bytes = {24 * 2**30}\n'
                              f'ssh = "mini{i}.local"\n' for i in range(2)))
    env_cat = {"ARTHUR_CLUSTER_MODELS": str(toml)}
    os.environ.update(env_cat)
    try:
        probe_out = cli(library, tmp_path, "probe", NEMOTRON_ID, "--cluster", "--static-only", "--context", CONTEXT)
        pick_out = cli(library, tmp_path, "pick", "--engine", "mlx", "--context", CONTEXT)
    finally:
        for k in env_cat:
            os.environ.pop(k)
    route = next(r for r in probe_out["routes"]
                 if (r["engine"], r["sharding"], r["backend"], r["nodes"]) == ("mlx", "pipeline", "ring", 2))
    choice = pick_out["choice"]
    assert choice["route"]["sharding"] == "pipeline" and choice["route"]["nodes"] == 2
    peak = max(n["total"] for n in choice["plan"]["nodes"])
    assert route["peak_bytes"] == peak and route["fits"] is True is choice["plan"]["fits"]
    plan = probe_out["memory"]["pipeline/2"]
    assert [n["layers"] for n in plan["nodes"]] == [n["layers"] for n in choice["plan"]["nodes"]]
