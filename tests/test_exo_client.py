"""The exo client against the contract simulator: every call, every quirk and fault, every wait bounded."""

from __future__ import annotations

import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from arthur_cluster.exo_client import (
    ExoClient, ExoHTTPError, ExoProtocolError, ExoUnreachable, ExoVersionMismatch, InstanceNotReady,
    ModelNotRunning, PlacementFailed, RunnerFailed, StreamError, parse_sse,
)
from tests.exo_simulator import GIB
from tests.fixtures_exo import SIM_LLAMA_ID, SIM_LMSTUDIO_NEMOTRON_ID, SIM_NEMOTRON_ID

ASK = [{"role": "user", "content": "What is 2+2?"}]
WAIT = 60.0  # generous bound for loading on a busy 2-core machine; never reached when things work


def placed(sim, model_id=SIM_LLAMA_ID, **kw):
    client = ExoClient(sim.url)
    return client, client.place_and_wait(model_id, timeout=WAIT, poll=0.05, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- cluster state ----------------------------------------------------------------------------------------


def test_state_is_parsed_into_typed_nodes(exo_sim_factory):
    sim = exo_sim_factory(nodes=[{"ram_total": 128 * GIB, "ram_available": 100 * GIB, "rdma": True,
                                  "backends": ["MlxMetal"]}, {"ram_available": 20 * GIB}])
    client = ExoClient(sim.url)
    assert client.node_id() == "simnode-0"
    state = client.state()
    a, b = state.nodes["simnode-0"], state.nodes["simnode-1"]
    assert (a.ram_total, a.ram_available, a.rdma_enabled, a.backends) == (128 * GIB, 100 * GIB, True, ["MlxMetal"])
    assert (b.ram_available, b.rdma_enabled, b.backends) == (20 * GIB, False, ["MlxCpu"])
    assert state.topology.nodes == ["simnode-0", "simnode-1"]
    assert ("simnode-0", "simnode-1") in state.topology.connections
    assert client.check_versions() == {"simnode-0": "0.3.70", "simnode-1": "0.3.70"}
    assert client.state_path("nodeMemory/simnode-1/ramAvailable") == {"inBytes": 20 * GIB}


def test_version_mismatch_and_missing_nodes_are_refused(exo_sim_factory):
    sim = exo_sim_factory(nodes=3, version_mismatch="0.3.12")
    client = ExoClient(sim.url)
    with pytest.raises(ExoVersionMismatch, match="simnode-2=0.3.12") as err:
        client.check_versions()
    assert err.value.versions["simnode-0"] == "0.3.70"
    sim.set_faults(version_mismatch=None)
    with pytest.raises(ExoVersionMismatch, match="expected 0.4.0"):
        client.check_versions(expected="0.4.0")
    with pytest.raises(ExoVersionMismatch, match="studio-2 are not in the cluster"):
        client.check_versions(nodes=["simnode-0", "studio-2"])


def test_models_catalogue_and_downloaded_filter(exo_sim):
    client = ExoClient(exo_sim.url)
    every = {m.id: m for m in client.models()}
    assert every[SIM_LLAMA_ID].storage_size_megabytes == pytest.approx(729.8, abs=0.1)
    assert every[SIM_NEMOTRON_ID].supports_tensor is True
    assert "mlx-community/Llama-3.2-3B-Instruct-4bit" in every  # in the catalogue, not on disk
    downloaded = {m.id for m in client.models(downloaded=True)}
    assert SIM_LLAMA_ID in downloaded and "mlx-community/Llama-3.2-3B-Instruct-4bit" not in downloaded
    assert SIM_LMSTUDIO_NEMOTRON_ID not in every  # no card until a custom one is added


def test_custom_card_add_use_and_delete(exo_sim):
    client = ExoClient(exo_sim.url)
    with pytest.raises(PlacementFailed, match="card not found"):
        client.place_instance(SIM_LMSTUDIO_NEMOTRON_ID)
    entry = client.add_model(SIM_LMSTUDIO_NEMOTRON_ID)
    assert entry.is_custom and entry.id == SIM_LMSTUDIO_NEMOTRON_ID
    assert SIM_LMSTUDIO_NEMOTRON_ID in client.state().custom_model_cards
    inst = client.place_and_wait(SIM_LMSTUDIO_NEMOTRON_ID, timeout=WAIT, poll=0.05)
    assert client.chat(inst.model_id, ASK, max_tokens=4, enable_thinking=False).usage.completion_tokens > 0
    client.delete_custom_model(SIM_LMSTUDIO_NEMOTRON_ID)
    assert SIM_LMSTUDIO_NEMOTRON_ID not in client.state().custom_model_cards
    with pytest.raises(ExoHTTPError) as err:
        client.delete_custom_model(SIM_LMSTUDIO_NEMOTRON_ID)
    assert err.value.status == 404
    with pytest.raises(ExoHTTPError, match="Hugging Face"):
        client.add_model("someone/not-on-this-disk")


# --- placement ------------------------------------------------------------------------------------------------


def test_place_wait_chat_stream_bench_delete(exo_sim):
    progress: list[tuple[int, int]] = []
    exo_sim.set_faults(load_step=0.05)
    client, inst = placed(exo_sim, on_progress=lambda done, total: progress.append((done, total)))
    assert inst.model_id == SIM_LLAMA_ID and inst.meta == "MlxRing" and inst.sharding == "Pipeline"
    assert inst.node_ids == ["simnode-0"]  # smallest group wins
    assert progress[-1] == (16, 16) and any(d < t for d, t in progress)  # saw RunnerLoading on the way
    assert client.instance(inst.instance_id).shards == inst.shards
    assert client.state().is_ready(inst)

    reply = client.chat(SIM_LLAMA_ID, ASK, max_tokens=6)
    assert reply.text and reply.finish_reason in ("length", "stop") and reply.usage.prompt_tokens > 0
    events = list(client.stream_chat(SIM_LLAMA_ID, ASK, max_tokens=6))
    kinds = [e.kind for e in events]
    assert kinds[0] == "keepalive" and "prefill" in kinds and kinds[-1] == "stats"
    prefill = [e for e in events if e.kind == "prefill"]
    assert prefill[-1].processed == prefill[-1].total == reply.usage.prompt_tokens
    assert "".join(e.content for e in events if e.kind == "delta") == reply.text  # greedy: same text
    finish = next(e for e in events if e.kind == "finish")
    assert finish.usage.completion_tokens == reply.usage.completion_tokens
    bench = client.bench(SIM_LLAMA_ID, ASK, max_tokens=4)
    assert bench.generation_stats.generation_tokens == bench.usage.completion_tokens
    assert bench.generation_stats.peak_memory_bytes > 0

    client.delete_instance(inst.instance_id)
    with pytest.raises(ModelNotRunning, match="No instance found for model"):
        client.chat(SIM_LLAMA_ID, ASK, max_tokens=2)
    with pytest.raises(ExoHTTPError) as err:
        client.delete_instance(inst.instance_id)
    assert err.value.status == 404


def test_short_names_are_not_resolved(exo_sim):
    client, _ = placed(exo_sim)
    with pytest.raises(ModelNotRunning) as err:
        list(client.stream_chat("llama-3.2-1b", ASK, max_tokens=2))
    assert err.value.status == 404 and "full Hugging Face id" in str(err.value)


def test_preview_instance_created_directly_and_placement_query(exo_sim_factory):
    sim = exo_sim_factory(nodes=2)
    client = ExoClient(sim.url)
    inst = client.placement(SIM_LLAMA_ID, "Tensor", "MlxRing", min_nodes=2)
    assert inst.sharding == "Tensor" and [s.end_layer for s in inst.shards] == [16, 16]
    client.create_instance(inst)
    ready = client.wait_ready(SIM_LLAMA_ID, timeout=WAIT, poll=0.05)
    assert ready.instance_id == inst.instance_id and ready.node_ids == ["simnode-0", "simnode-1"]
    three = ExoClient(exo_sim_factory(nodes=3).url)
    with pytest.raises(PlacementFailed, match="hidden_size 2048 is not divisible by 3"):
        three.placement(SIM_LLAMA_ID, "Tensor", "MlxRing", 3)


def test_placement_rejected_by_the_master_shows_only_as_no_instance(exo_sim_factory):
    sim = exo_sim_factory(nodes=[{"ram_available": 8 * GIB}, {"ram_available": 8 * GIB}])
    client = ExoClient(sim.url)
    assert client.place_instance(SIM_NEMOTRON_ID).command_id  # accepted...
    with pytest.raises(PlacementFailed, match="no instance appeared") as err:  # ...then nothing happens
        client.wait_ready(SIM_NEMOTRON_ID, timeout=1.0, poll=0.05)
    assert err.value.model_id == SIM_NEMOTRON_ID
    with pytest.raises(PlacementFailed, match="Previews say: No cycles found with sufficient memory"):
        client.place_and_wait(SIM_NEMOTRON_ID, timeout=1.0, poll=0.05)
    assert any("failed" in line for line in sim.log)


def test_runner_failure_names_node_and_message_and_cleans_up(exo_sim_factory):
    sim = exo_sim_factory(nodes=2, runner_failure="Metal out of memory while loading layer 9")
    client = ExoClient(sim.url)
    with pytest.raises(RunnerFailed, match="node simnode-1.*Metal out of memory") as err:
        client.place_and_wait(SIM_LLAMA_ID, min_nodes=2, timeout=WAIT, poll=0.05)
    assert err.value.node_id == "simnode-1" and err.value.error_message.startswith("Metal out of memory")
    assert client.state().instances == {}  # deleted so it holds no memory


def test_missing_weights_fail_the_runner(exo_sim):
    client = ExoClient(exo_sim.url)
    with pytest.raises(RunnerFailed, match="not found on node simnode-0"):
        client.place_and_wait("mlx-community/Llama-3.2-3B-Instruct-4bit", timeout=WAIT, poll=0.05)


def test_never_ready_instance_times_out_with_statuses(exo_sim_factory):
    sim = exo_sim_factory(nodes=2, never_ready=True)
    client = ExoClient(sim.url)
    with pytest.raises(InstanceNotReady, match="not ready after 4 s.*Loading 15/16 layers") as err:
        client.place_and_wait(SIM_LLAMA_ID, timeout=4.0, poll=0.05)
    assert isinstance(err.value, TimeoutError)
    assert err.value.statuses == {"simnode-0": "Loading 15/16 layers"}
    assert client.state().instances == {}


def test_slow_placement_is_waited_for(exo_sim_factory):
    sim = exo_sim_factory(nodes=2, placement_delay=0.5)
    client = ExoClient(sim.url)
    client.place_instance(SIM_LLAMA_ID)
    assert client.state().instances == {}  # not yet
    assert client.wait_ready(SIM_LLAMA_ID, timeout=WAIT, poll=0.05).model_id == SIM_LLAMA_ID


# --- generation faults --------------------------------------------------------------------------------------------


def test_keep_alives_during_a_slow_stream(exo_sim):
    client, _ = placed(exo_sim)
    exo_sim.set_faults(token_delay=0.06, keepalive_interval=0.02)
    events = list(client.stream_chat(SIM_LLAMA_ID, ASK, max_tokens=5))
    assert sum(e.kind == "keepalive" for e in events) > 2
    assert sum(e.kind == "delta" for e in events) >= 1 and events[-1].kind == "stats"


def test_node_lost_mid_stream(exo_sim_factory):
    sim = exo_sim_factory(nodes=2)
    client, inst = placed(sim, min_nodes=2)
    sim.set_faults(node_loss_after=2)
    got = []
    with pytest.raises(StreamError, match="mid-stream.*simnode-1 disconnected"):
        for ev in client.stream_chat(SIM_LLAMA_ID, ASK, max_tokens=8):
            got.append(ev.kind)
    assert got.count("delta") == 2
    state = client.state()
    assert "simnode-1" not in state.nodes and inst.instance_id not in state.instances


def test_broken_200_on_non_streaming_failure(exo_sim):
    client, _ = placed(exo_sim)
    exo_sim.set_faults(broken_200=True)
    with pytest.raises(StreamError, match="broke off after its headers \\(a broken HTTP 200"):
        client.chat(SIM_LLAMA_ID, ASK, max_tokens=4)


def test_stream_cut_without_done_is_an_error():
    lines = iter([": keep-alive", "", 'data: {"choices":[{"index":0,"delta":{"content":"4"}}]}', ""])
    with pytest.raises(StreamError, match="without \\[DONE\\]"):
        list(parse_sse(lines, "test"))


def test_reasoning_and_older_named_prefill_events_parse():
    lines = ["event: prefill_progress", 'data: {"processed": 3, "total": 9}', "",
             'data: {"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]}', "",
             'data: {"choices":[{"index":0,"delta":{"content":"4"},"finish_reason":"stop"}],'
             '"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}', "", "data: [DONE]"]
    evs = list(parse_sse(iter(lines), "test"))
    assert [(e.kind, e.processed, e.reasoning, e.content) for e in evs[:3]] == [
        ("prefill", 3, "", ""), ("delta", 0, "hmm", ""), ("delta", 0, "", "4")]
    assert evs[3].kind == "finish" and evs[3].usage.total_tokens == 11


# --- wrong endpoints ----------------------------------------------------------------------------------------------


def test_unreachable_port_after_retries():
    client = ExoClient(f"http://127.0.0.1:{free_port()}", retries=1)
    with pytest.raises(ExoUnreachable, match="Cannot reach exo at http://127.0.0.1:.*EXO_API"):
        client.state()


def test_wrong_port_serving_something_else(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ExoClient(f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(ExoProtocolError, match="something else is listening.*52415"):
            client.node_id()
    finally:
        server.shutdown()
        server.server_close()


def test_html_instead_of_json(exo_sim_factory):
    sim = exo_sim_factory(html=True)
    client = ExoClient(sim.url)
    with pytest.raises(ExoProtocolError, match="HTML page instead of exo's JSON"):
        client.state()
    with pytest.raises(ExoProtocolError, match="HTML"):
        list(client.stream_chat(SIM_LLAMA_ID, ASK))


def test_exo_api_env_sets_the_default(monkeypatch):
    assert ExoClient().url == "http://localhost:52415"
    monkeypatch.setenv("EXO_API", "http://studio-1.local:6000/")
    assert ExoClient().url == "http://studio-1.local:6000"
