"""Live exo checks against the exo contract simulator (tests/exo_simulator.py), real HTTP on loopback."""

from __future__ import annotations

import pytest

from arthur_cluster import catalog, probe
from tests import realshape
from tests.conftest import NEMOTRON_CONFIG, NEMOTRON_ID
from tests.fixtures_exo import SIM_NEMOTRON_ID

GIB = 1 << 30


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    return realshape.build(tmp_path_factory.mktemp("rs") / "lmstudio-community" / NEMOTRON_ID.split("/")[1],
                           NEMOTRON_CONFIG)


def entry():
    return catalog.load().entry(NEMOTRON_ID)  # carries exo_id: exo's built-in card for the same weights


def test_exo_accepting_nemotron_tensor_on_3_and_4_nodes_is_reported_loudly(nemotron, exo_sim_factory):
    sim = exo_sim_factory(nodes=4)
    r = probe.run(nemotron, exo_url=sim.url, static_only=True, entry=entry(), use_cache=False)
    assert r.exo_url == sim.url and r.node_counts == [2, 3, 4]
    assert any(f.check == "exo.card" and SIM_NEMOTRON_ID in f.what and "built-in" in f.what for f in r.findings)
    for n in (3, 4):
        route = r.find(f"exo/tensor/ring/{n}")
        assert route.verdict == "blocked"
        loud = [f for f in route.findings if f.check == "exo.accepts_wrong"]
        assert loud and "EXO ACCEPTS TENSOR ON" in loud[0].what and "num_key_value_heads=2" in loud[0].what
        assert any(f.check == "exo.accepts_wrong" and f"exo/tensor/ring/{n}" in f.what for f in r.findings)
    assert r.find("exo/pipeline/ring/2").verdict == "ok"
    assert r.find("exo/tensor/ring/2").verdict == "ok"
    # Node memory comes from exo: 48 GiB available per simulated node.
    assert [m.available_bytes for m in r.nodes] == [48 * GIB] * 4
    assert r.memory["pipeline/2"].fits is True
    # The simulated nodes are CPU nodes without RDMA: JACCL is refused by exo and by the RDMA check.
    jaccl = r.find("exo/pipeline/jaccl/2")
    assert jaccl.verdict == "blocked" and any(f.check == "exo.rdma" for f in jaccl.findings)


def test_rdma_ready_metal_nodes_allow_jaccl(nemotron, exo_sim_factory):
    sim = exo_sim_factory(nodes=[{"rdma": True, "backends": ["MlxMetal"]}] * 2)
    r = probe.run(nemotron, exo_url=sim.url, static_only=True, entry=entry(), use_cache=False)
    assert r.find("exo/pipeline/jaccl/2").verdict == "ok"
    assert r.attention == "fused"  # Metal nodes: fused attention in the memory plans


def test_model_without_card_blocks_exo_routes(nemotron, exo_sim_factory):
    sim = exo_sim_factory(nodes=2)
    r = probe.run(nemotron, exo_url=sim.url, static_only=True, use_cache=False)  # no catalogue entry: no exo_id
    assert any(f.check == "exo.card" and f.severity == "error" and "arthur-cluster link" in f.fix for f in r.findings)
    assert all(x.verdict == "blocked" for x in r.routes if x.engine == "exo")
    assert r.find("mlx/pipeline/ring/2").verdict == "ok"
    sim.add_custom_card(NEMOTRON_ID, n_layers=52, hidden_size=2688, storage_size=33_559_966_776,
                        supports_tensor=True)
    r = probe.run(nemotron, exo_url=sim.url, static_only=True, use_cache=False)
    assert any(f.check == "exo.card" and "custom" in f.what for f in r.findings)
    assert r.find("exo/pipeline/ring/2").verdict == "ok"


def test_version_mismatch_and_small_nodes(nemotron, exo_sim_factory):
    sim = exo_sim_factory(nodes=[{"ram_total": 32 * GIB, "ram_available": 20 * GIB}] * 3,
                          version_mismatch="0.3.10")
    r = probe.run(nemotron, exo_url=sim.url, static_only=True, entry=entry(), use_cache=False)
    assert any(f.check == "exo.versions" and f.severity == "error" and "0.3.10" in f.what for f in r.findings)
    assert r.find("exo/pipeline/ring/2").verdict == "blocked"
    single = r.find("mlx/single/local/1")
    assert single.verdict == "blocked" and any(f.check == "memory" for f in single.findings)


def test_unreachable_exo_leaves_exo_routes_unknown(nemotron):
    r = probe.run(nemotron, exo_url="http://127.0.0.1:9", static_only=True, use_cache=False)
    assert any(f.check == "exo" and "not reachable" in f.what for f in r.findings)
    assert all(x.verdict in ("unknown", "blocked") for x in r.routes if x.engine == "exo")
    assert r.find("exo/pipeline/ring/2").verdict == "unknown"
