"""probe --exo against exo's own API code (tests/fixtures_exo.py): nodes, card, previews and RDMA."""

from __future__ import annotations

import pytest

from arthur_cluster import catalog, probe
from arthur_cluster.exo_client import ExoClient
from tests import realshape
from tests.conftest import NEMOTRON_CONFIG, NEMOTRON_ID
from tests.fixtures_exo import EXO_NEMOTRON_ID, GIB


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    return realshape.build(tmp_path_factory.mktemp("rs") / "lmstudio-community" / NEMOTRON_ID.split("/")[1],
                           NEMOTRON_CONFIG)


def entry():
    return catalog.load().entry(NEMOTRON_ID)  # carries exo_id: exo's built-in card for the same weights


def test_exo_accepting_nemotron_tensor_on_3_and_4_nodes_is_reported_loudly(nemotron, exo_factory):
    h = exo_factory("--nodes", "4")
    r = probe.run(nemotron, exo_url=h.url, static_only=True, entry=entry(), use_cache=False)
    assert r.exo_url == h.url and r.node_counts == [2, 3, 4]
    assert any(f.check == "exo.card" and EXO_NEMOTRON_ID in f.what and "built-in" in f.what for f in r.findings)
    for n in (3, 4):
        route = r.find(f"exo/tensor/ring/{n}")
        assert route.verdict == "blocked"
        loud = [f for f in route.findings if f.check == "exo.accepts_wrong"]
        assert loud and "EXO ACCEPTS TENSOR ON" in loud[0].what and "num_key_value_heads=2" in loud[0].what
    assert r.find("exo/pipeline/ring/2").verdict == "ok"
    assert r.find("exo/tensor/ring/2").verdict == "ok"
    assert [m.available_bytes for m in r.nodes] == [48 * GIB] * 4  # node memory comes from exo
    jaccl = r.find("exo/pipeline/jaccl/2")  # no RDMA on these nodes: exo and the RDMA check refuse JACCL
    assert jaccl.verdict == "blocked" and any(f.check == "exo.rdma" for f in jaccl.findings)


def test_rdma_ready_metal_nodes_allow_jaccl(nemotron, exo_factory):
    h = exo_factory("--nodes", "2", "--rdma")
    r = probe.run(nemotron, exo_url=h.url, static_only=True, entry=entry(), use_cache=False)
    assert r.find("exo/pipeline/jaccl/2").verdict == "ok"


def test_model_without_card_blocks_exo_routes_until_exo_has_one(nemotron, exo_factory, tmp_path):
    from arthur_cluster import linker, modelfiles

    links = tmp_path / "links"
    h = exo_factory("--nodes", "2", links=links)
    r = probe.run(nemotron, exo_url=h.url, static_only=True, use_cache=False)  # no catalogue entry: no exo_id
    assert any(f.check == "exo.card" and f.severity == "error" and "/models/add" in f.fix for f in r.findings)
    assert all(x.verdict == "blocked" for x in r.routes if x.engine == "exo")
    linker.link(modelfiles.inspect(nemotron, repo_id=NEMOTRON_ID), exo_dir=links, hf=False)
    ExoClient(h.url).add_model(NEMOTRON_ID)  # what `up` does: exo builds the card from the linked folder
    r = probe.run(nemotron, exo_url=h.url, static_only=True, use_cache=False)
    assert any(f.check == "exo.card" and "custom" in f.what for f in r.findings)
    assert r.find("exo/pipeline/ring/2").verdict == "ok"


def test_small_nodes_block_with_exos_own_reason(nemotron, exo_factory):
    h = exo_factory("--nodes", "3", "--ram-gib", "10", "--ram-total-gib", "32")
    r = probe.run(nemotron, exo_url=h.url, static_only=True, entry=entry(), use_cache=False)
    route = r.find("exo/pipeline/ring/2")
    assert route.verdict == "blocked"
    assert any("sufficient memory" in f.what for f in route.findings if f.check == "exo.preview")
    single = r.find("mlx/single/local/1")
    assert single.verdict == "blocked" and any(f.check == "memory" for f in single.findings)


def test_unreachable_exo_leaves_exo_routes_unknown(nemotron):
    r = probe.run(nemotron, exo_url="http://127.0.0.1:9", static_only=True, use_cache=False)
    assert any(f.check == "exo" and "exo not usable: Cannot reach exo" in f.what for f in r.findings)
    assert all(x.verdict in ("unknown", "blocked") for x in r.routes if x.engine == "exo")
    assert r.find("exo/pipeline/ring/2").verdict == "unknown"
