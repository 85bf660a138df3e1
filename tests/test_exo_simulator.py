"""The simulator's placement rules (exo's, from shared/facts/exo.md) and its command-line form."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from arthur_cluster.exo_client import ExoClient
from tests.exo_simulator import GIB
from tests.fixtures_exo import SIM_LLAMA_ID, SIM_NEMOTRON_ID

ROOT = Path(__file__).resolve().parents[1]


def pick(previews, sharding, meta, min_nodes):
    return next(p for p in previews if (p.sharding, p.instance_meta, p.min_nodes) == (sharding, meta, min_nodes))


def test_tensor_rules_reproduce_exos_unchecked_nemotron_split(exo_sim_factory):
    sim = exo_sim_factory(nodes=4)
    client = ExoClient(sim.url)
    nemotron = client.previews(SIM_NEMOTRON_ID)
    llama = client.previews(SIM_LLAMA_ID)
    # Nemotron cards lack num_key_value_heads: 3 nodes pass (2688 % 3 == 0) though its 2 KV heads cannot split.
    assert len(pick(nemotron, "Tensor", "MlxRing", 3).instance.shards) == 3
    # Llama has 8 KV heads and hidden 2048: 3 nodes fail, so the smallest qualifying group is 4.
    assert len(pick(llama, "Tensor", "MlxRing", 3).instance.shards) == 4
    # Smallest group wins: min_nodes=1 puts a model that fits on one node.
    assert len(pick(llama, "Pipeline", "MlxRing", 1).instance.shards) == 1
    # No RDMA anywhere: no JACCL preview succeeds.
    assert all(p.error and p.instance is None for p in nemotron if p.instance_meta == "MlxJaccl")


def test_pipeline_splits_layers_by_available_memory(exo_sim_factory):
    sim = exo_sim_factory(nodes=[{"ram_available": 30 * GIB}, {"ram_available": 10 * GIB}])
    preview = pick(ExoClient(sim.url).previews(SIM_NEMOTRON_ID), "Pipeline", "MlxRing", 1)
    shards = preview.instance.shards  # 33.6 GB does not fit 30 GiB: two nodes, layers 3:1
    assert [(s.node_id, s.start_layer, s.end_layer) for s in shards] == [("simnode-0", 0, 39), ("simnode-1", 39, 52)]
    assert sum(preview.memory_delta_by_node.values()) <= 33_600_000_000


def test_jaccl_needs_rdma_on_every_node(exo_sim_factory):
    metal = ["MlxMetal"]
    half = exo_sim_factory(nodes=[{"rdma": True, "backends": metal}, {"rdma": False, "backends": metal}])
    full = exo_sim_factory(nodes=[{"rdma": True, "backends": metal}, {"rdma": True, "backends": metal}])
    assert pick(ExoClient(half.url).previews(SIM_LLAMA_ID), "Pipeline", "MlxJaccl", 2).error
    ok = pick(ExoClient(full.url).previews(SIM_LLAMA_ID), "Pipeline", "MlxJaccl", 2)
    assert ok.ok and ok.instance.meta == "MlxJaccl" and len(ok.instance.shards) == 2


def test_runs_as_a_process_and_prints_its_url(tiny_models):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.exo_simulator", "--port", "0", "--nodes", "3",
                             "--model", f"{SIM_LLAMA_ID}={tiny_models['llama-4bit']}", "--fault", "version_mismatch=9.9"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        client = ExoClient(url)
        assert client.node_id() == "simnode-0"
        assert sorted(set(client.versions().values())) == ["0.3.70", "9.9"]
        assert [m.id for m in client.models(downloaded=True)] == [SIM_LLAMA_ID]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
