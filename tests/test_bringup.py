"""Bring-up against exo's own API code (tests/fixtures_exo.py: exo's app, State, placement, card loop; runners
and tokens faked) and the real local MLX engine.

Every failure ends in a clear message and, where a fallback exists, in that fallback: never a hang or a
traceback. Every source file of the LM Studio folder is byte-identical after each test.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest
from typer.testing import CliRunner

from arthur_cluster import bringup, cli, hostfile, paths
from arthur_cluster.catalog import Catalog
from arthur_cluster.cluster import ClusterError
from arthur_cluster.exo_client import ExoClient
from tests import realshape
from tests.conftest import NEMOTRON_CONFIG, copy_model
from tests.fixtures_exo import LLAMA_ID, NEMOTRON_ID, wait_for

NEMOTRON = NEMOTRON_ID
LLAMA = LLAMA_ID


def catalogue() -> Catalog:
    return Catalog(target=NEMOTRON, fallbacks=[LLAMA])


class Recorder(bringup.Hooks):
    def __init__(self, on_say=None):
        self.lines: list[str] = []
        self.waits: list[tuple[int, int]] = []
        self.on_say = on_say
        super().__init__(say=self._say, progress=lambda label, d, t: self.waits.append((d, t)))

    def _say(self, text: str) -> None:
        self.lines.append(text)
        if self.on_say:
            self.on_say(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exo(exo_factory, *flags: str):
    """A harness whose read-only dir is this test's links dir (where `up` links the weights)."""
    return exo_factory("--nodes", "2", *flags, links=paths.exo_links_dir())


def timed_up(limit: float, *args, **kw):
    """up(), which must end within `limit` seconds (a bound on a hang, not a speed test)."""
    start = time.monotonic()
    dep = bringup.up(*args, **kw)
    assert time.monotonic() - start < limit, f"up took more than {limit} s"
    return dep


# --- the paths that work ---------------------------------------------------------------------------------------


def test_nemotron_comes_up_on_exo_from_the_linked_weights_and_down_deletes_it(exo_factory, library):
    h = exo(exo_factory, "--ram-gib", "48")
    hooks = Recorder()
    dep = timed_up(60, catalogue(), engine="exo", exo_url=h.url, timeout=60, hooks=hooks)
    assert dep.model == dep.served_id == NEMOTRON and dep.engine == "exo" and dep.fallback_reason is None
    assert dep.route.label == "exo pipeline/ring on 2 nodes" and sorted(dep.nodes) == ["exonode-0", "exonode-1"]
    assert dep.smoke.answer == "2 + 2 = 4." and 0 < dep.smoke.generation_tokens <= 50
    # exo loads the linked weights: each node found the linker's entry in its read-only dir, no download.
    entry = paths.exo_links_dir() / "lmstudio-community--NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit"
    downloads = [d for n in dep.nodes for d in ExoClient(h.url).state().downloads[n] if d.model_id == NEMOTRON]
    assert [(d.status, d.read_only) for d in downloads] == [("Completed", True)] * 2
    assert json.dumps(h.get("/state/downloads")).count(json.dumps(str(entry))) >= 2  # modelDirectory
    assert list(h.instances()) == [dep.instance_id]
    assert any("registering" in line and "/models/add" in line for line in hooks.lines)
    assert hooks.waits and hooks.waits[-1][0] == hooks.waits[-1][1] > 0  # progress ended at every layer
    # The registration is exo's own and stays: in its state (every node keeps it) and its model list.
    time.sleep(5)
    assert NEMOTRON in h.custom_cards() and NEMOTRON in h.model_ids()
    assert not (paths.exo_custom_cards_dir()).exists()  # no card file of ours for exo to delete
    record = json.loads(paths.deployment_file().read_text())
    assert record["endpoint"] == h.url and record["instance_id"] == dep.instance_id

    again = bringup.up(catalogue(), engine="exo", exo_url=h.url, timeout=60)  # reuses, places nothing
    assert again.instance_id == dep.instance_id and len(h.instances()) == 1

    res = bringup.down()
    assert res.had_deployment and res.instance_id == dep.instance_id
    assert wait_for(lambda: h.instances() == {}) and not paths.deployment_file().exists()
    assert bringup.down().had_deployment is False


def test_nodes_too_small_for_nemotron_end_on_the_llama_with_a_memory_reason(exo_factory, lmstudio_home,
                                                                             tiny_models):
    models = lmstudio_home / "models"
    realshape.build(models / NEMOTRON, NEMOTRON_CONFIG)  # the real 33.6 GB shape, sparse
    copy_model(tiny_models["llama-4bit"], models / LLAMA)
    h = exo(exo_factory, "--ram-gib", "10")
    dep = timed_up(30, catalogue(), engine="exo", exo_url=h.url, timeout=600)
    assert dep.model == LLAMA and dep.engine == "exo" and dep.smoke.answer
    assert dep.fallback_reason.startswith(f"{NEMOTRON} could not run")
    assert "does not fit" in dep.fallback_reason and " GB of " in dep.fallback_reason  # a memory reason
    assert [i["MlxRingInstance"]["shardAssignments"]["modelId"] for i in h.instances().values()] == [LLAMA]


def test_262k_tokens_on_two_48_gib_rdma_nodes_is_nemotron_tensor_over_jaccl_with_fused_attention(exo_factory,
                                                                                                   lmstudio_home):
    """The document jobs' case, on each exo version: exo v1.0.71 publishes no node backends, so its Macs are
    known by their chip; the plan counts fused attention (no score matrix) and JACCL is taken where RDMA is."""
    from arthur_cluster import cluster, fallback
    from arthur_cluster.catalog import ModelEntry
    from arthur_cluster.types import Route
    from tests.fixtures_exo import EXO_NEMOTRON_ID, GIB

    realshape.build(lmstudio_home / "models" / NEMOTRON, NEMOTRON_CONFIG)  # the real 33.6 GB shape, sparse
    h = exo(exo_factory, "--ram-gib", "48", "--rdma")
    cat = Catalog(target=NEMOTRON, fallbacks=[LLAMA], models={NEMOTRON: ModelEntry(exo_id=EXO_NEMOTRON_ID)})
    jaccl = Route(engine="exo", sharding="tensor", backend="jaccl", nodes=2)
    choice = fallback.pick(cat, cluster=cluster.from_exo(cluster.exo_client(h.url)), context=262144)
    assert (choice.model, choice.route, choice.verdict.status) == (NEMOTRON, jaccl, "ok"), choice.rejections
    assert choice.plan.fits and choice.plan.peak_node.total < 20 * GIB  # fused; materialised scores: ~83 GiB
    dep = timed_up(60, cat, engine="exo", exo_url=h.url, context=262144, timeout=60)
    assert (dep.model, dep.served_id, dep.route, dep.context) == (NEMOTRON, EXO_NEMOTRON_ID, jaccl, 262144)
    assert [i["MlxJacclInstance"]["shardAssignments"]["modelId"] for i in h.instances().values()] == [
        EXO_NEMOTRON_ID]


def test_weights_missing_on_the_nodes_give_exos_download_error_then_the_fallback(exo_factory, library, tmp_path):
    h = exo_factory("--nodes", "2", links=tmp_path / "not-the-links-dir")  # exo's nodes do not see the links
    dep = timed_up(30, Catalog(target=LLAMA, fallbacks=[]), exo_url=h.url, timeout=600)
    assert dep.engine == "mlx" and dep.model == LLAMA  # this machine, which has the weights
    assert "Model files not found locally in offline mode" in dep.fallback_reason  # what exo said
    entry = paths.exo_links_dir() / paths.exo_model_dirname(LLAMA)
    assert f"not in the exo model directories of node(s) mac-0 (exonode-0)" in dep.fallback_reason
    assert str(entry) in dep.fallback_reason and f"`arthur-cluster link {LLAMA}`" in dep.fallback_reason
    assert h.instances() == {}  # the failed instance was deleted


def test_missing_weights_of_a_model_without_an_exo_card_are_said_within_30_s_then_the_fallback(
        exo_factory, library, tmp_path):
    """exo cannot build a card for weights its nodes do not see (it asks Hugging Face, offline here): `up`
    says so plainly, naming the nodes, the directory and the command, with what exo said, then falls back."""
    h = exo_factory("--nodes", "2", links=tmp_path / "not-the-links-dir")
    start = time.monotonic()
    said: list[tuple[float, str]] = []
    hooks = Recorder(on_say=lambda text: said.append((time.monotonic() - start, text)))
    dep = bringup.up(catalogue(), exo_url=h.url, timeout=600, hooks=hooks)
    at, line = next((t, x) for t, x in said if "are not in the exo model directories" in x)
    assert at < 30, f"the missing weights were said after {at:.0f} s"
    entry = paths.exo_links_dir() / paths.exo_model_dirname(NEMOTRON)
    assert f"the weights of {NEMOTRON}" in line and "mac-0 (exonode-0)" in line and "mac-1 (exonode-1)" in line
    assert str(entry) in line and f"`arthur-cluster link {NEMOTRON}`" in line and "exo said: " in line
    assert not any("card" in x and "failed" in x and "weights" not in x for _, x in said)  # no bare card error
    assert dep.engine == "mlx" and dep.model == NEMOTRON  # this machine has them
    assert "are not in the exo model directories" in dep.fallback_reason


def test_a_failed_runner_is_reported_with_its_message_and_mlx_takes_over(exo_factory, library):
    h = exo(exo_factory, "--fail-runner", "Metal out of memory while loading layer 3")
    dep = timed_up(60, catalogue(), exo_url=h.url, timeout=60)
    assert dep.engine == "mlx" and dep.model == NEMOTRON
    assert "Metal out of memory while loading layer 3" in dep.fallback_reason
    assert h.instances() == {}


def test_a_stream_error_in_the_test_question_falls_back(exo_factory, library):
    h = exo(exo_factory, "--error-after", "2")
    dep = timed_up(60, catalogue(), exo_url=h.url, timeout=60)
    assert dep.engine == "mlx" and "Runner on node exonode-1 disconnected" in dep.fallback_reason
    assert h.instances() == {}


def test_up_on_this_machine_with_mlx(library):
    dep = bringup.up(catalogue(), engine="mlx")
    assert dep.engine == "mlx" and dep.route.label == "mlx single node" and dep.endpoint is None
    assert dep.model == NEMOTRON and dep.model_path == library / NEMOTRON
    assert dep.smoke.generation_tokens > 0 and dep.smoke.answer
    assert bringup.read_record() == dep
    # The record reopens the same model for later jobs.
    engine = bringup.engine_for(dep)
    try:
        assert engine.model_id == NEMOTRON
    finally:
        engine.close()



# --- bad input: each one ends in a message and, where there is one, the fallback ----------------------------------


def test_unreachable_exo_falls_back_to_local_mlx_or_fails_clearly_when_exo_is_required(library):
    url = f"http://127.0.0.1:{free_port()}"
    dep = bringup.up(catalogue(), exo_url=url)
    assert dep.engine == "mlx" and dep.model == NEMOTRON
    assert any("exo not used" in n and url in n for n in dep.notes)
    with pytest.raises(ClusterError, match="Cannot reach exo"):
        bringup.up(catalogue(), engine="exo", exo_url=url)


@pytest.fixture
def wrong_server(tmp_path):
    """A real HTTP server that is not exo (a static file server answering HTML)."""
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_wrong_port_is_named(wrong_server, library):
    with pytest.raises(ClusterError, match="HTML page.*exo's API is on 52415"):
        bringup.up(catalogue(), engine="exo", exo_url=wrong_server)
    dep = bringup.up(catalogue(), exo_url=wrong_server)
    assert dep.engine == "mlx" and any("HTML" in n for n in dep.notes)


# --- the record and down --------------------------------------------------------------------------------------


def test_down_with_exo_gone_keeps_the_record(exo_factory, library):
    h = exo(exo_factory)
    bringup.up(catalogue(), engine="exo", exo_url=h.url, timeout=60)
    h.stop()
    with pytest.raises(bringup.DeploymentError, match="record stays"):
        bringup.down()
    assert paths.deployment_file().exists()


def test_corrupt_record_is_named(library):
    paths.deployment_file().parent.mkdir(parents=True, exist_ok=True)
    paths.deployment_file().write_text("{not json")
    out = bringup.down()  # named, and moved aside (it may have named an exo instance: the user is told)
    assert out.actions[0].startswith(str(paths.deployment_file())) and "not a deployment record" in out.actions[0]
    assert any("moved the unreadable record" in a for a in out.actions) and not paths.deployment_file().exists()


# --- the commands --------------------------------------------------------------------------------------------------


def write_catalog(tmp_path) -> str:
    path = tmp_path / "models.toml"
    path.write_text(f'target = "{NEMOTRON}"\nfallbacks = ["{LLAMA}"]\n')
    return str(path)


def test_cli_pick_up_down_json(exo_factory, library, tmp_path):
    h = exo(exo_factory)
    runner = CliRunner()
    cat = write_catalog(tmp_path)
    res = runner.invoke(cli.app, ["pick", "--engine", "exo", "--exo", h.url, "--catalog", cat, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["choice"]["model"] == NEMOTRON and out["choice"]["route"]["sharding"] == "pipeline"
    res = runner.invoke(cli.app, ["up", "--engine", "exo", "--exo", h.url, "--catalog", cat, "--json"])
    assert res.exit_code == 0, res.output
    dep = json.loads(res.stdout)
    assert dep["model"] == NEMOTRON and dep["smoke"]["generation_tokens"] > 0
    res = runner.invoke(cli.app, ["down", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["instance_id"] == dep["instance_id"]
    assert wait_for(lambda: h.instances() == {})


def test_cli_exo_address_without_a_scheme_is_exo(exo_factory, library, tmp_path):
    """`--exo HOST:PORT`, the form `up --help` shows, reaches exo (it was once a 'broken answer')."""
    h = exo(exo_factory)
    bare = h.url.removeprefix("http://")
    res = CliRunner().invoke(cli.app, ["pick", "--engine", "exo", "--exo", bare, "--catalog",
                                       write_catalog(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["choice"]["model"] == NEMOTRON and out["choice"]["route"]["engine"] == "exo"
    res = CliRunner().invoke(cli.app, ["pick", "--engine", "exo", "--exo", "ftp://" + bare, "--catalog",
                                       write_catalog(tmp_path)])
    assert res.exit_code == 1 and "HOST:PORT" in res.output and "Traceback" not in res.output


def test_up_timeout_bounds_the_whole_bring_up_with_a_frozen_exo(library, tmp_path):
    """An exo that accepts connections and never answers (a stopped process): `up --timeout 4` ends within a
    bound near 4 s (once 112-132 s for --timeout 20), saying exo did not answer."""
    frozen = socket.create_server(("127.0.0.1", 0), backlog=64)  # the kernel accepts; nobody ever answers
    try:
        port = frozen.getsockname()[1]
        start = time.monotonic()
        res = CliRunner().invoke(cli.app, ["up", "--engine", "exo", "--exo", f"127.0.0.1:{port}", "--timeout", "4",
                                           "--catalog", write_catalog(tmp_path)])
        took = time.monotonic() - start
    finally:
        frozen.close()
    assert res.exit_code == 1 and "Traceback" not in res.output and str(port) in res.output, res.output
    assert "did not" in res.output or "no time left" in res.output
    assert took < 14, f"up --timeout 4 took {took:.0f} s"


def test_cli_up_failure_is_one_clear_error(library, tmp_path):
    res = CliRunner().invoke(cli.app, ["up", "--engine", "exo", "--exo", f"http://127.0.0.1:{free_port()}",
                                       "--catalog", write_catalog(tmp_path)])
    assert res.exit_code == 1
    assert "Cannot reach exo" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli.app, ["up", "--engine", "nope"])
    assert res.exit_code == 2 and "--engine" in res.output


# --- weights on the other nodes (models.toml [cluster]) ---------------------------------------------------------


def two_node_catalog(tmp_path, ssh_script: str):
    """A [cluster] of this machine and one other node reached through ARTHUR_CLUSTER_SSH. Here the stand-in
    for ssh runs the command on this machine (there is no second Mac), recording that it ran."""
    from arthur_cluster.catalog import ClusterEntry, NodeEntry

    stand_in = tmp_path / "fake-ssh"
    stand_in.write_text(ssh_script)
    stand_in.chmod(0o755)
    big = 64 << 30
    return catalogue().model_copy(update={"cluster": ClusterEntry(backend="ring", nodes=[
        NodeEntry(name="here", ssh="localhost", memory_bytes=big), NodeEntry(name="studio-2", ssh="studio-2.local", memory_bytes=big)])}), stand_in


def test_weights_on_other_nodes_are_linked_over_ssh(library, tmp_path, monkeypatch):
    import sys

    log = tmp_path / "ssh.log"
    cat, stand_in = two_node_catalog(tmp_path, f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\nshift\nexec sh -c "$*"\n')
    monkeypatch.setenv(hostfile.SSH_ENV, str(stand_in))
    hooks = Recorder()
    dep = bringup.up(cat, engine="mlx", hooks=hooks)
    # the node's arthur-cluster by absolute path (a login's PATH would not find it in a virtual environment)
    assert f"exec {sys.executable.rsplit('/', 1)[0]}/arthur-cluster link {NEMOTRON} --json" in log.read_text()
    assert any("linking on studio-2 over ssh (studio-2.local)" in line for line in hooks.lines)
    # The nodes have no IP addresses, which the ring needs: the 2-node attempt fails before any launch and
    # says why, and the model comes up on this machine alone.
    assert dep.route.label == "mlx single node" and dep.model == NEMOTRON
    assert "pipeline/ring on 2 nodes" in dep.fallback_reason
    assert "the ring backend needs each node's IP address" in dep.fallback_reason


def test_a_node_ssh_cannot_reach_is_named(library, tmp_path, monkeypatch):
    cat, stand_in = two_node_catalog(tmp_path, '#!/bin/sh\necho "ssh: connect to host $1 port 22: Connection '
                                               'refused" >&2\nexit 255\n')
    monkeypatch.setenv(hostfile.SSH_ENV, str(stand_in))
    dep = bringup.up(cat, engine="mlx")
    assert dep.route.label == "mlx single node"
    assert "node studio-2: `" in dep.fallback_reason
    assert "--version` could not run: ssh: connect to host studio-2.local port 22" in dep.fallback_reason


def test_a_rerun_on_another_model_stops_the_previous_instance(exo_factory, library):
    h = exo(exo_factory)
    first = bringup.up(catalogue(), model=LLAMA, engine="exo", exo_url=h.url, timeout=60)
    second = bringup.up(catalogue(), engine="exo", exo_url=h.url, timeout=60)
    assert second.model == NEMOTRON
    assert wait_for(lambda: list(h.instances()) == [second.instance_id])
    assert any(first.instance_id in n for n in second.notes)


def test_a_previous_instance_that_cannot_be_stopped_is_said_so(exo_factory, library):
    old, new = exo(exo_factory), exo(exo_factory)
    first = bringup.up(catalogue(), model=LLAMA, engine="exo", exo_url=old.url, timeout=60)
    old.stop()  # the old deployment's exo is gone: its instance cannot be deleted from here
    second = bringup.up(catalogue(), engine="exo", exo_url=new.url, timeout=60)
    note = next(n for n in second.notes if first.instance_id in n)
    assert note.startswith("could not stop") and "dashboard" in note


# --- MLX ranks that stay up (--serve on one node; always across nodes) ---------------------------------------


def test_up_with_serve_keeps_the_model_behind_an_openai_endpoint_and_down_stops_it(library):
    import requests

    from arthur_cluster.engines.base import collect
    from arthur_cluster.parallel import resident

    dep = bringup.up(catalogue(), engine="mlx", serve=True)
    try:
        assert dep.resident is not None and dep.endpoint == dep.resident.url + "/v1"
        assert dep.smoke.generation_tokens > 0 and bringup.read_record() == dep
        models = requests.get(dep.endpoint + "/models", timeout=5).json()  # any OpenAI client finds it
        assert [m["id"] for m in models["data"]] == [dep.served_id]
        engine = bringup.engine_for(dep)
        result = collect(engine.stream([{"role": "user", "content": "What is 2+2?"}], max_tokens=4))
        assert result.stats.generation_tokens == 4 and engine.last_done["weight_loads"] == [1]
        assert bringup.stale_notes() == [] and not any(f.kind == "stale-record" for f in bringup.doctor().findings)
        old, dep = dep, bringup.up(catalogue(), engine="mlx", serve=True)  # again: the old ranks go first
        assert dep.resident.url != old.resident.url and not any(resident._alive(p) for p in old.resident.pids)
        assert any("stopped the previous resident ranks" in n for n in dep.notes)
        out = bringup.down()
        assert any("stopped the resident ranks" in a for a in out.actions)
        assert not paths.deployment_file().exists() and not resident.state_file().exists()
        with pytest.raises(requests.ConnectionError):
            requests.get(dep.endpoint + "/models", timeout=5)
    finally:
        if dep.resident is not None:
            resident.stop(dep.resident)


def test_doctor_names_a_stale_resident_record(library):
    from arthur_cluster.parallel.resident import Resident

    gone = Resident(url=f"http://127.0.0.1:{hostfile.free_ports(1)[0]}", model="m", model_path="/x", mode="single",
                    backend="ring", n=1, pids=[2 ** 22 + 7], started_at="2026-01-01T00:00:00+00:00")
    dep = bringup.Deployment(model="m", served_id="m", engine="mlx", route=bringup.Route(engine="mlx",
                             sharding="single"), endpoint=gone.endpoint, resident=gone,
                             smoke=bringup.Smoke(question="q", answer="a"))
    bringup.write_record(dep)
    findings = [f for f in bringup.doctor().findings if f.kind == "stale-record"]
    assert len(findings) == 1 and "nothing answers at " + gone.url in findings[0].message
    assert "all its processes are gone" in findings[0].message and "down" in findings[0].fix
    hooks = Recorder()
    with pytest.raises(bringup.BringUpError):
        bringup.up(Catalog(target="nobody/none"), engine="mlx", hooks=hooks)
    assert any("stale record" in line for line in hooks.lines)  # `up` says so too
    assert bringup.down().had_deployment and not paths.deployment_file().exists()
