"""The exo client against exo's own API code (tests/fixtures_exo.py): every call, exo's real quirks and
failures, every wait bounded."""

from __future__ import annotations

import socket
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from arthur_cluster import linker, modelfiles
from arthur_cluster.types import Route
from arthur_cluster.exo_client import (
    DownloadFailed, ExoClient, ExoHTTPError, ExoProtocolError, ExoUnreachable, ModelNotRunning, PlacementFailed,
    RunnerFailed, StreamError, parse_sse,
)
from tests.fixtures_exo import EXO_NEMOTRON_ID, GIB, LLAMA_ID

ASK = [{"role": "user", "content": "What is 2+2?"}]
WAIT = 60.0  # generous bound for loading on a busy 2-core machine; never reached when things work
ANSWER = "2 + 2 = 4."  # what the harness's fake runners always say


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def linked_llama(root: Path, tiny_models) -> Path:
    """A links dir holding the tiny Llama under exo's built-in Llama id (for a harness of its own)."""
    links = root / "links"
    info = modelfiles.inspect(tiny_models["llama-4bit"], repo_id=LLAMA_ID)
    linker.link(info, repo_id=LLAMA_ID, exo_dir=links, hf=False)
    return links


@pytest.fixture
def client(shared_exo):
    c = ExoClient(shared_exo.url)
    yield c
    for iid in list(c.state().instances):  # the harness is shared by the module: leave it empty
        c.delete_instance(iid)


# --- cluster state ----------------------------------------------------------------------------------------


def test_state_is_parsed_into_typed_nodes(client):
    assert client.node_id() == "exonode-0"
    state = client.state()
    assert sorted(state.nodes) == ["exonode-0", "exonode-1"]
    a = state.nodes["exonode-0"]
    assert (a.ram_total, a.ram_available, a.rdma_enabled) == (64 * GIB, 48 * GIB, False)
    # main publishes node backends; v1.0.71 does not: unknown (None), never "no backend", and the chip says Apple
    assert a.backends == (["MlxMetal"] if "nodeBackends" in state.raw else None)
    assert a.apple is True and a.chip == "Apple M4 Pro" and a.rdma_ctl is False and a.rdma_peers == []
    assert a.memory().model_dump() == {"name": "exonode-0", "memory_bytes": 64 * GIB, "available_bytes": 48 * GIB,
                                       "usable_fraction": 0.75, "apple": True}
    assert a.friendly_name == "mac-0" and not hasattr(a, "exo_version")  # exo's API reports no version
    assert ("exonode-0", "exonode-1") in state.topology.connections
    assert client.state_path("nodeMemory/exonode-1/ramAvailable") == {"inBytes": 48 * GIB}
    # exo's read-only-dir scan found the linked Llama on every node
    assert {d.status for n in state.nodes for d in state.downloads.get(n, []) if d.model_id == LLAMA_ID} \
        == {"Completed"}


def test_models_catalogue_holds_exos_own_cards(client):
    models = {m.id: m for m in client.models()}
    assert {LLAMA_ID, EXO_NEMOTRON_ID} <= set(models)
    llama = models[LLAMA_ID]
    assert llama.storage_size_megabytes == 729808896 // (1 << 20) and llama.supports_tensor and not llama.is_custom


# --- placement ------------------------------------------------------------------------------------------------


def test_place_wait_chat_stream_bench_delete(client):
    progress: list[tuple[int, int]] = []
    inst = client.place_and_wait(LLAMA_ID, timeout=WAIT, poll=0.02,
                                 on_progress=lambda done, total: progress.append((done, total)))
    assert inst.model_id == LLAMA_ID and inst.meta == "MlxRing" and inst.sharding == "Pipeline"
    assert inst.node_ids == ["exonode-0"]  # exo's smallest group wins
    assert progress[-1] == (16, 16) and any(d < t for d, t in progress)  # saw RunnerLoading on the way
    assert client.instance(inst.instance_id).shards == inst.shards and client.state().is_ready(inst)

    reply = client.chat(LLAMA_ID, ASK, max_tokens=6)
    assert reply.text == ANSWER and reply.finish_reason == "stop" and reply.usage.prompt_tokens == 12
    events = list(client.stream_chat(LLAMA_ID, ASK, max_tokens=6))
    prefill = [(e.processed, e.total) for e in events if e.kind == "prefill"]
    assert prefill == [(8, 12), (12, 12)]  # exo's tagged PrefillProgressChunk, real numbers
    assert "".join(e.content for e in events if e.kind == "delta") == ANSWER
    finish = next(e for e in events if e.kind == "finish")
    assert finish.finish_reason == "stop" and finish.usage.completion_tokens == 6
    bench = client.bench(LLAMA_ID, ASK, max_tokens=6)
    assert bench.text == ANSWER

    client.delete_instance(inst.instance_id)
    with pytest.raises(ModelNotRunning, match="No instance found for model"):
        client.chat(LLAMA_ID, ASK, max_tokens=2)
    with pytest.raises(ExoHTTPError) as err:
        client.delete_instance(inst.instance_id)
    assert err.value.status == 404


def test_short_names_are_not_resolved(client):
    client.place_and_wait(LLAMA_ID, timeout=WAIT, poll=0.02)
    with pytest.raises(ModelNotRunning) as err:
        list(client.stream_chat("llama-3.2-1b", ASK, max_tokens=2))
    assert err.value.status == 404 and "full Hugging Face id" in str(err.value)


def test_previews_carry_no_min_nodes_and_placement_query(client):
    previews = client.previews(LLAMA_ID)
    ok = {(p.sharding, p.instance_meta, p.nodes) for p in previews if p.ok}
    assert ("Pipeline", "MlxRing", 1) in ok and ("Pipeline", "MlxRing", 2) in ok
    # no RDMA on these nodes: no JACCL route (v1.0.71 turns a 1-node JACCL preview into a ring of one)
    assert all(p.route is None for p in previews if p.instance_meta == "MlxJaccl")
    assert {p.route for p in previews if p.ok and p.instance_meta == "MlxRing"} >= {
        Route.single("exo"), Route(engine="exo", sharding="pipeline", backend="ring", nodes=2)}
    inst = client.placement(LLAMA_ID, "Tensor", "MlxRing", min_nodes=2)
    assert inst.sharding == "Tensor" and len(inst.shards) == 2
    assert inst.route == Route(engine="exo", sharding="tensor", backend="ring", nodes=2)
    assert (inst.card.model_id, inst.card.n_layers, inst.card.hidden_size) == (LLAMA_ID, 16, 2048)
    client.create_instance(inst)
    assert client.wait_ready(LLAMA_ID, timeout=WAIT, poll=0.02).instance_id == inst.instance_id


def test_missing_weights_are_exos_download_error_and_the_instance_goes(client):
    other = "mlx-community/Llama-3.2-3B-Instruct-4bit"  # exo has its card; no node has its weights
    with pytest.raises(DownloadFailed, match="Model files not found locally in offline mode") as err:
        client.place_and_wait(other, timeout=WAIT, poll=0.02)
    assert err.value.node_id == "exonode-0" and other in err.value.error_message
    assert client.state().instances_of(other) == []  # deleted so it holds no memory


def test_a_placement_the_master_rejects_is_seen_within_seconds_with_exos_reason(exo_factory):
    h = exo_factory("--nodes", "2", "--ram-gib", "10")
    client = ExoClient(h.url)
    assert client.place_instance(EXO_NEMOTRON_ID).command_id  # accepted, then only logged by the master
    with pytest.raises(PlacementFailed, match="did not place .*No cycles found with sufficient memory"):
        client.wait_ready(EXO_NEMOTRON_ID, timeout=600, poll=0.05, placement=("Pipeline", "MlxRing", 1),
                          appear_timeout=2)
    start = time.monotonic()
    with pytest.raises(PlacementFailed, match="sufficient memory") as err:
        client.place_and_wait(EXO_NEMOTRON_ID, timeout=600, poll=0.05)
    assert "memory" in err.value.reason and time.monotonic() - start < 30
    assert h.instances() == {}
    errors = [p.error for p in client.previews(EXO_NEMOTRON_ID) if not p.ok]
    assert errors and all(p.error for p in client.previews(EXO_NEMOTRON_ID))


def test_a_failed_runners_message_is_shown_and_the_instance_goes(exo_factory, tmp_path, tiny_models):
    h = exo_factory("--fail-runner", "Metal out of memory while loading layer 9",
                    links=linked_llama(tmp_path, tiny_models))
    client = ExoClient(h.url)
    with pytest.raises(RunnerFailed, match="node exonode-.*Metal out of memory while loading layer 9") as err:
        client.place_and_wait(LLAMA_ID, min_nodes=2, timeout=WAIT, poll=0.02)
    assert err.value.error_message == "Metal out of memory while loading layer 9"
    assert h.instances() == {}


def test_a_stream_error_mid_answer_is_reported(exo_factory, tmp_path, tiny_models):
    h = exo_factory("--error-after", "2", links=linked_llama(tmp_path, tiny_models))
    client = ExoClient(h.url)
    client.place_and_wait(LLAMA_ID, timeout=WAIT, poll=0.02)
    got = []
    with pytest.raises(StreamError, match="mid-stream.*Runner on node exonode-1 disconnected"):
        for ev in client.stream_chat(LLAMA_ID, ASK, max_tokens=8):
            got.append(ev.kind)
    assert got.count("delta") == 2


# --- the stream parser on its own --------------------------------------------------------------------------------


def test_stream_cut_without_done_is_an_error():
    lines = iter([": keep-alive", "", 'data: {"choices":[{"index":0,"delta":{"content":"4"}}]}', ""])
    with pytest.raises(StreamError, match="without \\[DONE\\]"):
        list(parse_sse(lines, "test"))


def test_a_flat_prefill_payload_is_not_exos():
    lines = iter([': prefill_progress {"processed_tokens": 3, "total_tokens": 9}'])
    with pytest.raises(ExoProtocolError, match="tagged object"):
        list(parse_sse(lines, "test"))


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
        with pytest.raises(ExoProtocolError, match="HTML"):
            list(client.stream_chat(LLAMA_ID, ASK))
    finally:
        server.shutdown()
        server.server_close()


def test_exo_api_env_sets_the_default(monkeypatch):
    assert ExoClient().url == "http://localhost:52415"
    monkeypatch.setenv("EXO_API", "http://studio-1.local:6000/")
    assert ExoClient().url == "http://studio-1.local:6000"


def test_exo_addresses_as_users_write_them():
    from arthur_cluster.exo_client import BadExoURL, normalize_url

    assert normalize_url("mac1:52415") == "http://mac1:52415"  # the form `up --help` shows
    assert normalize_url("mac1") == "http://mac1:52415" and normalize_url(" http://10.0.0.2:8000/ ") == \
        "http://10.0.0.2:8000"
    assert normalize_url("[::1]") == "http://[::1]:52415" and normalize_url("https://h:1") == "https://h:1"
    for bad in ("ftp://mac1", ":52415", "http://", ""):
        with pytest.raises(BadExoURL, match="HOST:PORT"):
            normalize_url(bad)
