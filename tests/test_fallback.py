"""The picker: availability, memory fit, checks per route, route order, rejections with reasons, determinism."""

from __future__ import annotations

import socket

import pytest

from arthur_cluster import cluster, fallback
from arthur_cluster.catalog import Catalog, ModelEntry
from arthur_cluster.cluster import ClusterInfo, ClusterNode
from arthur_cluster.fallback import NoChoice, Rejection, Route
from tests.fixtures_exo import EXO_NEMOTRON_ID, LLAMA_ID

GIB = 1 << 30
TINY_NEMOTRON = "lmstudio-community/Tiny-NemotronH-MLX-8bit"  # the lmstudio_home fixture's folders
TINY_LLAMA = "mlx-community/Tiny-Llama-MLX-4bit"


def local(memory: int = 64 * GIB) -> ClusterInfo:
    return ClusterInfo(source="local", engine="mlx",
                       nodes=[ClusterNode(name="here", memory_bytes=memory, available_bytes=memory, local=True)])


def cat(target: str = TINY_NEMOTRON, fallbacks=(TINY_LLAMA,), **models: ModelEntry) -> Catalog:
    return Catalog(target=target, fallbacks=list(fallbacks), models=models)


def test_target_on_this_machine_is_chosen_first(lmstudio_home):
    choice = fallback.pick(cat(), cluster=local())
    assert choice.model == TINY_NEMOTRON
    assert choice.route == Route(engine="mlx", sharding="single", nodes=1)
    assert choice.available.source == "lmstudio" and choice.available.path.is_dir()
    assert choice.verdict.status == "ok", choice.verdict
    assert choice.plan.fits is True
    assert choice.context == 4096  # the default (8192) capped at the miniature's own length
    assert choice.rejections == [] and choice.fallback_reason(TINY_NEMOTRON) is None


def test_pick_is_deterministic(lmstudio_home):
    c = cat(target="nobody/Missing-Model")
    first = fallback.pick(c, cluster=local()).model_dump(mode="json")
    again = fallback.pick(c, cluster=local()).model_dump(mode="json")
    assert first == again


def test_missing_target_falls_back_and_says_why(lmstudio_home):
    choice = fallback.pick(cat(target="nobody/Missing-Model"), cluster=local())
    assert choice.model == TINY_LLAMA
    assert [r.stage for r in choice.rejections] == ["available"]
    assert "nobody/Missing-Model" in choice.fallback_reason("nobody/Missing-Model")
    assert "not on disk" in choice.rejections[0].reason


def test_memory_too_small_rejects_every_candidate_with_numbers(lmstudio_home):
    with pytest.raises(NoChoice) as e:
        fallback.pick(cat(), cluster=local(memory=64 * 1024))
    rej = e.value.rejections
    assert [(r.model, r.stage) for r in rej] == [(TINY_NEMOTRON, "memory"), (TINY_LLAMA, "memory")]
    assert all("does not fit" in r.reason and "KB" in r.reason for r in rej)
    assert "no model of the catalogue can run here" in str(e.value)


def test_context_longer_than_the_model_is_refused(lmstudio_home):
    choice = fallback.pick(cat(), cluster=local(), context=8000)
    assert choice.model == TINY_LLAMA  # 16384 tokens; the nemotron miniature has 4096
    assert choice.rejections[0].stage == "catalog" and "4096" in choice.rejections[0].reason


def test_a_failed_bring_up_excludes_its_route_or_its_model(lmstudio_home):
    single = Route(engine="mlx", sharding="single", nodes=1)
    prior = [Rejection(model=TINY_NEMOTRON, route=single, stage="bringup", reason="smoke test failed")]
    choice = fallback.pick(cat(), cluster=local(), prior=prior)
    assert choice.model == TINY_LLAMA and choice.rejections[0].reason == "smoke test failed"
    prior = [Rejection(model=TINY_NEMOTRON, stage="bringup", reason="card rejected")]
    assert fallback.pick(cat(), cluster=local(), prior=prior).model == TINY_LLAMA


def test_route_order_is_tensor_jaccl_then_pipeline_ring_then_single():
    two = ClusterInfo(source="exo", engine="exo", nodes=[ClusterNode(name="a"), ClusterNode(name="b")])
    assert [r.label for r in fallback.routes_for(two)] == [
        "exo tensor/jaccl on 2 nodes", "exo pipeline/ring on 2 nodes", "exo single node"]
    assert [r.label for r in fallback.routes_for(local())] == ["mlx single node"]


def exo_cluster(harness) -> ClusterInfo:
    return cluster.from_exo(cluster.exo_client(harness.url))


def test_exo_without_rdma_picks_pipeline_over_ring_and_says_why_not_jaccl(shared_exo, lmstudio_home):
    c = cat(target=LLAMA_ID, fallbacks=())
    choice = fallback.pick(c, cluster=exo_cluster(shared_exo))
    assert choice.model == LLAMA_ID and choice.available.source == "exo"  # exo found it in its read-only dir
    assert choice.route.label == "exo pipeline/ring on 2 nodes"
    jaccl = choice.rejections[0]
    assert jaccl.route.backend == "jaccl" and jaccl.stage == "checks"
    assert "RDMA" in jaccl.reason or "rdma" in jaccl.reason


def test_exo_with_rdma_everywhere_takes_tensor_over_jaccl_only_when_proven(exo_factory, lmstudio_home,
                                                                          tiny_models, tmp_path):
    from tests.conftest import copy_model
    from tests.test_exo_client import linked_llama

    h = exo_factory("--nodes", "2", "--rdma", links=linked_llama(tmp_path, tiny_models))
    c = cat(target=LLAMA_ID, fallbacks=())
    # Not on this disk: its config cannot be checked, so JACCL is not proven and the pipeline wins.
    choice = fallback.pick(c, cluster=exo_cluster(h))
    assert choice.route.label == "exo pipeline/ring on 2 nodes"
    assert "not proven" in choice.rejections[0].reason
    # On disk (LM Studio): every check passes and exo previews accept it.
    copy_model(tiny_models["llama-4bit"], lmstudio_home / "models" / LLAMA_ID)
    choice = fallback.pick(c, cluster=exo_cluster(h))
    assert choice.route.label == "exo tensor/jaccl on 2 nodes", choice.rejections
    assert choice.verdict.status == "ok" and choice.available.needs_link


def test_exo_tensor_split_that_exo_would_accept_wrongly_is_rejected(exo_factory, lmstudio_home, tiny_models):
    # Four RDMA nodes: exo's placement would tensor-split NemotronH's 2 KV heads four ways (its built-in card
    # has no num_key_value_heads). The picker must turn that down and take the pipeline.
    from tests.conftest import copy_model

    copy_model(tiny_models["nemotron_h-8bit"], lmstudio_home / "models" / EXO_NEMOTRON_ID)
    h = exo_factory("--nodes", "4", "--rdma")
    choice = fallback.pick(cat(target=EXO_NEMOTRON_ID, fallbacks=()), cluster=exo_cluster(h))
    assert choice.route.label == "exo pipeline/ring on 4 nodes", choice.rejections
    tensor = choice.rejections[0]
    assert tensor.route.sharding == "tensor" and "num_key_value_heads" in tensor.reason


def test_exo_model_not_downloaded_needs_allow_download(shared_exo, lmstudio_home):
    three_b = "mlx-community/Llama-3.2-3B-Instruct-4bit"  # exo has its card; no node has its weights
    c = cat(target=three_b, fallbacks=())
    with pytest.raises(NoChoice) as e:
        fallback.pick(c, cluster=exo_cluster(shared_exo))
    assert "--allow-download" in e.value.rejections[0].reason
    choice = fallback.pick(c, cluster=exo_cluster(shared_exo), allow_download=True)
    assert choice.available.source == "exo-download"


def test_no_exo_means_this_machine_with_a_note(lmstudio_home):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    found = cluster.discover(cat(), exo_url=f"http://127.0.0.1:{port}")
    assert [c.source for c in found.clusters] == ["local"]
    assert "exo not used" in found.notes[0] and str(port) in found.notes[0]
    with pytest.raises(cluster.ClusterError, match=str(port)):
        cluster.discover(cat(), engine="exo", exo_url=f"http://127.0.0.1:{port}")


def test_catalog_cluster_section_is_the_mlx_cluster(lmstudio_home):
    from arthur_cluster.catalog import ClusterEntry, NodeEntry

    c = cat().model_copy(update={"cluster": ClusterEntry(backend="ring", nodes=[
        NodeEntry(name="m1", ssh="m1.local", ips=["10.0.0.1"], memory_bytes=64 * GIB),
        NodeEntry(name="m2", ssh="m2.local", ips=["10.0.0.2"])])})
    info = cluster.from_catalog(c)
    assert [n.name for n in info.nodes] == ["m1", "m2"] and info.backend == "ring"
    assert "memory_bytes missing" in info.problems[0] and "m2" in info.problems[0]
    assert [r.label for r in fallback.routes_for(info)] == [
        "mlx tensor/jaccl on 2 nodes", "mlx pipeline/ring on 2 nodes", "mlx single node"]


def two_local_nodes() -> ClusterInfo:
    """A [cluster] of two nodes on this machine (no ssh), as models.toml would make it."""
    nodes = [ClusterNode(name=f"n{i}", memory_bytes=64 * GIB, local=True) for i in range(2)]
    return ClusterInfo(source="catalog", engine="mlx", backend="ring", nodes=nodes)


def test_route_asked_for_is_the_only_one_tried_even_outside_the_default_order(lmstudio_home):
    from arthur_cluster.probe import RouteSpec

    two = two_local_nodes()
    # without --route the default order holds: tensor/JACCL blocked (no RDMA), then the pipeline
    assert fallback.pick(cat(), cluster=two).route.label == "mlx pipeline/ring on 2 nodes"
    choice = fallback.pick(cat(), cluster=two, route=RouteSpec.parse("mlx/tensor/ring"))
    assert choice.model == TINY_NEMOTRON and choice.route.label == "mlx tensor/ring on 2 nodes"
    assert choice.rejections == []  # JACCL and the pipeline were not tried at all
    assert fallback.pick(cat(), cluster=two, route=RouteSpec.parse("mlx/tensor/ring/2")).route == choice.route
    # a route this cluster cannot take: every candidate turned down with the reason, nothing else tried
    with pytest.raises(NoChoice) as e:
        fallback.pick(cat(), cluster=two, route=RouteSpec.parse("mlx/tensor/ring/3"))
    assert [r.stage for r in e.value.rejections] == ["checks", "checks"]
    assert "matches --route mlx/tensor/ring/3" in str(e.value) and "mlx/tensor/ring/2" in str(e.value)
    with pytest.raises(NoChoice, match="no exo cluster here"):
        fallback.pick(cat(), cluster=two, route=RouteSpec.parse("exo/pipeline"))


def test_pick_route_from_the_command_line(lmstudio_home, tmp_path):
    """What the user sees: `pick --route` on a [cluster] of two nodes on this machine, and the refusals."""
    import json
    import os
    import subprocess
    import sys

    catalog = tmp_path / "models.toml"
    catalog.write_text(f'target = "{TINY_NEMOTRON}"\nfallbacks = []\n[cluster]\nbackend = "ring"\n'
                       '[[cluster.nodes]]\nname = "here-a"\nssh = "localhost"\nmemory_bytes = 8589934592\n'
                       '[[cluster.nodes]]\nname = "here-b"\nssh = "127.0.0.1"\nmemory_bytes = 8589934592\n')
    env = {**os.environ, "ARTHUR_CLUSTER_MODELS": str(catalog), "EXO_API": "http://127.0.0.1:9"}

    def pick(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "arthur_cluster.cli", "pick", *args], capture_output=True,
                              text=True, timeout=120, env=env)

    chosen = pick("--route", "mlx/tensor/ring", "--json")
    assert chosen.returncode == 0, chosen.stderr
    assert json.loads(chosen.stdout)["choice"]["route"] == {"engine": "mlx", "sharding": "tensor",
                                                            "backend": "ring", "nodes": 2}
    default = pick("--engine", "mlx")
    assert default.returncode == 0 and "mlx pipeline/ring on 2 nodes" in default.stdout, default.stdout
    bad = pick("--route", "mlx/tensor/token-ring")
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["error: --route: route 'mlx/tensor/token-ring': backend "
                                               "'token-ring' is not one of ring, jaccl, nccl, local"], bad.stderr
    wide = pick("--route", "mlx/tensor/ring/3")
    assert wide.returncode == 1 and "Traceback" not in wide.stderr
    assert "no route of this cluster (2 node(s)) matches --route mlx/tensor/ring/3" in " ".join(wide.stderr.split())
