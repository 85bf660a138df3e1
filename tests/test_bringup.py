"""Bring-up against the exo contract simulator (exo itself cannot run here) and the real local MLX engine.

Every bad input of the issue is driven through the simulator's fault switches or a real wrong server, and
must end in a clear message and, where a fallback exists, in that fallback: never a hang or a traceback.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest
from typer.testing import CliRunner

from arthur_cluster import bringup, cli, hostfile, paths
from arthur_cluster.catalog import Catalog
from arthur_cluster.cluster import ClusterError
from tests.conftest import copy_model
from tests.fixtures_exo import SIM_LLAMA_ID, SIM_LMSTUDIO_NEMOTRON_ID

NEMOTRON = SIM_LMSTUDIO_NEMOTRON_ID
LLAMA = SIM_LLAMA_ID


@pytest.fixture
def library(lmstudio_home, tiny_models):
    """LM Studio holding the miniatures under the real ids (as the user's library would)."""
    models = lmstudio_home / "models"
    copy_model(tiny_models["nemotron_h-8bit"], models / NEMOTRON)
    copy_model(tiny_models["llama-4bit"], models / LLAMA)
    return models


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


# --- the paths that work ---------------------------------------------------------------------------------------


def test_up_on_exo_links_registers_places_answers_and_down_deletes(exo_sim, library):
    hooks = Recorder()
    dep = bringup.up(catalogue(), engine="exo", exo_url=exo_sim.url, timeout=60, hooks=hooks)
    assert dep.model == NEMOTRON and dep.engine == "exo" and dep.fallback_reason is None
    assert dep.route.label == "exo pipeline/ring on 2 nodes" and dep.nodes == ["simnode-0", "simnode-1"]
    assert dep.smoke.question == "What is 2+2?" and dep.smoke.answer and dep.smoke.generation_tokens > 0
    assert dep.smoke.generation_tokens <= 50 and dep.smoke.generation_tps > 0
    # The weights were linked for exo, the card registered, the instance is the one running.
    assert (paths.exo_links_dir() / "lmstudio-community--NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit").is_dir()
    assert NEMOTRON in exo_sim.custom
    assert list(exo_sim.instances) == [dep.instance_id]
    assert hooks.waits and hooks.waits[-1][0] == hooks.waits[-1][1] > 0  # progress ended at every layer
    assert any("EXO_MODELS_READ_ONLY_DIRS=" in n for n in dep.notes)
    assert any(n.startswith("on node sim-mac-1") and "arthur-cluster link" in n for n in dep.notes)
    record = json.loads(paths.deployment_file().read_text())
    assert record["endpoint"] == exo_sim.url and record["instance_id"] == dep.instance_id
    assert record["route"]["sharding"] == "pipeline" and record["smoke"]["answer"] == dep.smoke.answer

    # Rerunning is safe: the running instance is reused, not placed twice.
    again = bringup.up(catalogue(), engine="exo", exo_url=exo_sim.url, timeout=60)
    assert again.instance_id == dep.instance_id and len(exo_sim.instances) == 1

    res = bringup.down()
    assert res.had_deployment and res.instance_id == dep.instance_id
    assert exo_sim.instances == {} and not paths.deployment_file().exists()
    assert bringup.down().had_deployment is False


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


def test_html_instead_of_json_falls_back(exo_sim_factory, library):
    sim = exo_sim_factory(html=True)
    dep = bringup.up(catalogue(), exo_url=sim.url)
    assert dep.engine == "mlx"
    assert any("HTML" in n for n in dep.notes)


def test_exo_of_another_version(exo_sim_factory, library):
    sim = exo_sim_factory(version_mismatch="0.3.1")
    with pytest.raises(ClusterError, match="different versions.*0.3.1"):
        bringup.up(catalogue(), engine="exo", exo_url=sim.url)
    dep = bringup.up(catalogue(), exo_url=sim.url)
    assert dep.engine == "mlx" and any("0.3.1" in n for n in dep.notes)


def test_card_exo_rejects_falls_back_to_the_llama(exo_sim_factory, library, tiny_models):
    sim = exo_sim_factory(models={LLAMA: tiny_models["llama-4bit"]})  # this exo cannot build a card for Nemotron
    dep = bringup.up(catalogue(), engine="exo", exo_url=sim.url, timeout=60)
    assert dep.model == LLAMA and dep.engine == "exo"
    assert dep.fallback_reason.startswith(f"{NEMOTRON} could not run")
    assert "rejects a card" in dep.fallback_reason
    assert sim.instances and all(NEMOTRON not in json.dumps(i) for i in sim.instances.values())


def test_instance_never_ready_is_bounded_then_falls_back(exo_sim_factory, library):
    sim = exo_sim_factory(never_ready=True)
    with pytest.raises(bringup.BringUpError) as e:
        bringup.up(catalogue(), engine="exo", exo_url=sim.url, timeout=1.5)
    text = str(e.value)
    assert "not ready after 1.5 s" in text and NEMOTRON in text and LLAMA in text
    assert sim.instances == {}  # every half-loaded instance was deleted
    dep = bringup.up(catalogue(), exo_url=sim.url, timeout=1.5)  # exo and MLX: MLX here takes over
    assert dep.engine == "mlx" and dep.model == NEMOTRON
    assert "preferred routes failed" in dep.fallback_reason and "not ready" in dep.fallback_reason


def test_runner_failure_falls_back(exo_sim_factory, library):
    sim = exo_sim_factory(runner_failure="Metal out of memory while loading layer 3")
    hooks = Recorder(on_say=lambda t: t.startswith("failed:") and sim.set_faults(runner_failure=None))
    dep = bringup.up(catalogue(), engine="exo", exo_url=sim.url, timeout=30, hooks=hooks)
    assert dep.model == NEMOTRON and dep.route.label == "exo single node"
    assert "Metal out of memory" in dep.fallback_reason and "simnode-1" in dep.fallback_reason


def test_node_lost_mid_stream_falls_back(exo_sim_factory, library):
    sim = exo_sim_factory(nodes=3, node_loss_after=2)
    hooks = Recorder(on_say=lambda t: t.startswith("failed:") and sim.set_faults(node_loss_after=None))
    dep = bringup.up(catalogue(), engine="exo", exo_url=sim.url, timeout=30, hooks=hooks)
    assert "disconnected" in dep.fallback_reason
    assert len(sim.nodes) == 2 and dep.route.label == "exo pipeline/ring on 2 nodes"
    assert dep.smoke.generation_tokens > 0


# --- the record and down --------------------------------------------------------------------------------------


def test_down_with_exo_gone_keeps_the_record(exo_sim_factory, library):
    sim = exo_sim_factory()
    bringup.up(catalogue(), engine="exo", exo_url=sim.url, timeout=60)
    sim.stop()
    with pytest.raises(bringup.DeploymentError, match="record stays"):
        bringup.down()
    assert paths.deployment_file().exists()


def test_corrupt_record_is_named(library):
    paths.deployment_file().parent.mkdir(parents=True, exist_ok=True)
    paths.deployment_file().write_text("{not json")
    with pytest.raises(bringup.DeploymentError, match=str(paths.deployment_file())):
        bringup.down()


# --- the commands --------------------------------------------------------------------------------------------------


def write_catalog(tmp_path) -> str:
    path = tmp_path / "models.toml"
    path.write_text(f'target = "{NEMOTRON}"\nfallbacks = ["{LLAMA}"]\n')
    return str(path)


def test_cli_pick_up_down_json(exo_sim, library, tmp_path):
    runner = CliRunner()
    cat = write_catalog(tmp_path)
    res = runner.invoke(cli.app, ["pick", "--engine", "exo", "--exo", exo_sim.url, "--catalog", cat, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["choice"]["model"] == NEMOTRON and out["choice"]["route"]["sharding"] == "pipeline"
    res = runner.invoke(cli.app, ["up", "--engine", "exo", "--exo", exo_sim.url, "--catalog", cat, "--json"])
    assert res.exit_code == 0, res.output
    dep = json.loads(res.stdout)
    assert dep["model"] == NEMOTRON and dep["smoke"]["generation_tokens"] > 0
    res = runner.invoke(cli.app, ["down", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["instance_id"] == dep["instance_id"]


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
    cat, stand_in = two_node_catalog(tmp_path, f'#!/bin/sh\necho "$@" >> {log}\nshift\n'
                                               f'PATH={sys.executable.rsplit("/", 1)[0]}:$PATH exec "$@"\n')
    monkeypatch.setenv(hostfile.SSH_ENV, str(stand_in))
    hooks = Recorder()
    dep = bringup.up(cat, engine="mlx", hooks=hooks)
    assert f"studio-2.local arthur-cluster link {NEMOTRON} --json" in log.read_text()
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
    assert "failed on studio-2 (studio-2.local): ssh: connect to host studio-2.local" in dep.fallback_reason


def test_a_rerun_on_another_model_stops_the_previous_instance(exo_sim, library):
    first = bringup.up(catalogue(), model=LLAMA, engine="exo", exo_url=exo_sim.url, timeout=60)
    second = bringup.up(catalogue(), engine="exo", exo_url=exo_sim.url, timeout=60)
    assert second.model == NEMOTRON and list(exo_sim.instances) == [second.instance_id]
    assert any(first.instance_id in n for n in second.notes)


def test_a_previous_instance_that_cannot_be_stopped_is_said_so(exo_sim_factory, library):
    old_sim, new_sim = exo_sim_factory(), exo_sim_factory()
    first = bringup.up(catalogue(), model=LLAMA, engine="exo", exo_url=old_sim.url, timeout=60)
    old_sim.stop()  # the old deployment's exo is gone: its instance cannot be deleted from here
    second = bringup.up(catalogue(), engine="exo", exo_url=new_sim.url, timeout=60)
    note = next(n for n in second.notes if first.instance_id in n)
    assert note.startswith("could not stop") and "dashboard" in note


# --- MLX ranks that stay up (--serve on one node; always across nodes) ---------------------------------------


def test_up_with_serve_keeps_the_model_behind_an_openai_endpoint_and_down_stops_it(library):
    import requests

    from arthur_cluster import linker
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
        assert bringup.stale_notes() == [] and not any(f.kind == "stale-record" for f in linker.doctor().findings)
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
    from arthur_cluster import linker
    from arthur_cluster.parallel.resident import Resident

    gone = Resident(url=f"http://127.0.0.1:{hostfile.free_ports(1)[0]}", model="m", model_path="/x", mode="single",
                    backend="ring", n=1, pids=[2 ** 22 + 7], started_at="2026-01-01T00:00:00+00:00")
    dep = bringup.Deployment(model="m", served_id="m", engine="mlx", route=bringup.Route(engine="mlx",
                             sharding="single"), endpoint=gone.endpoint, resident=gone,
                             smoke=bringup.Smoke(question="q", answer="a"))
    bringup.write_record(dep)
    findings = [f for f in linker.doctor().findings if f.kind == "stale-record"]
    assert len(findings) == 1 and "nothing answers at " + gone.url in findings[0].message
    assert "all its processes are gone" in findings[0].message and "down" in findings[0].fix
    hooks = Recorder()
    with pytest.raises(bringup.BringUpError):
        bringup.up(Catalog(target="nobody/none"), engine="mlx", hooks=hooks)
    assert any("stale record" in line for line in hooks.lines)  # `up` says so too
    assert bringup.down().had_deployment and not paths.deployment_file().exists()
