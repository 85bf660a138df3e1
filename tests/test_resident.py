"""Resident MLX ranks: real rank processes (ring on loopback) that load once, serve OpenAI chat completions from
rank 0, keep a prefix cache per rank, and end clearly when a rank dies."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import requests

from arthur_cluster import bringup, docjob, documents, paths
from arthur_cluster.engines.base import EngineError, collect
from arthur_cluster.fallback import Route
from arthur_cluster.parallel import resident, server
from arthur_cluster.parallel.worker import encode_request, generate, load

DOC = ("The cluster has four nodes named ash, birch, cedar and dove. Ash holds the first layers, dove the last. "
       "A pipeline hands the hidden state from node to node; the tensor split cuts every layer in two. ") * 6
QUESTIONS = ["What is it?", "How many nodes?", "Why?", "Name three colors.", "zebra quantum 42", "!!!??"]
MAX_TOKENS = 6
BLOCK = 8  # restore points every 8 tokens in the prompt's last 64: a question shorter than 56 tokens always hits


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _messages(q: str) -> list[dict]:
    return [{"role": "user", "content": DOC + "\n\nQuestion: " + q}]


def _start(path, mode: str, home) -> resident.Resident:
    with pytest.MonkeyPatch.context() as mp:  # module scope: its own state folder
        mp.setenv(paths.ENV_STATE_DIR, str(home))
        return bringup.start_resident(path, "tiny-nemotron", Route(engine="mlx", sharding=mode, backend="ring",
                                                                   nodes=2),
                                      prefill_step=32, cache_block=BLOCK, cache_window=64, timeout=120)


@pytest.fixture(scope="module")
def scratch(tiny_models):
    """One-process, from-scratch greedy answers for every candidate question (the reference)."""
    path = tiny_models["nemotron_h-f32"]
    model, tok, _ = load(path)
    out = {}
    for q in QUESTIONS:
        ids = encode_request(tok, {"messages": _messages(q)})
        out[q] = (ids, [t for t, _ in generate(model, ids, max_tokens=MAX_TOKENS, prefill_step=32)])
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("resident")


@pytest.fixture(scope="module")
def served(tiny_models, home):
    res = _start(tiny_models["nemotron_h-f32"], "tensor", home)
    yield res
    resident.stop(res)


def _deployment(res: resident.Resident) -> bringup.Deployment:
    return bringup.Deployment(model="tiny", served_id=res.model, engine="mlx",
                              route=Route(engine="mlx", sharding=res.mode, backend="ring", nodes=res.n),
                              endpoint=res.endpoint, resident=res, model_path=res.model_path,
                              smoke=bringup.Smoke(question="", answer=""))


def test_three_questions_load_once_prefill_the_document_once_and_match_scratch_runs(served, scratch):
    # Three questions whose from-scratch answers are not all the same (the model is random).
    qs = sorted(QUESTIONS, key=lambda q: -sum(scratch[q][1] != scratch[o][1] for o in QUESTIONS))[:3]
    assert len({tuple(scratch[q][1]) for q in qs}) > 1
    eng = bringup.engine_for(_deployment(served))
    infos = []
    for q in qs:
        result = collect(eng.stream(_messages(q), max_tokens=MAX_TOKENS))
        info = eng.last_done
        assert info["ids"] == scratch[q][1], q  # token-exact against one process from scratch
        assert result.stats.prompt_tokens == len(scratch[q][0]) and result.stats.generation_tokens == MAX_TOKENS
        assert result.stats.cached_tokens == info["cached_tokens"]
        infos.append(info)
    assert [i["weight_loads"] for i in infos] == [[1, 1]] * 3  # each rank loaded the weights once
    assert len({tuple(i["rank_pids"]) for i in infos}) == 1
    first, later = infos[0], infos[1:]
    assert first["cached_tokens"] == 0 and first["prefilled_per_rank"] == [first["prompt_tokens"]] * 2
    for prev, q, i in zip(qs, qs[1:], later):  # only the question (and at most a block before it) is prefilled
        shared = server.common_prefix(scratch[prev][0], scratch[q][0])
        assert shared > 0.8 * len(scratch[q][0])  # the document
        assert shared - BLOCK < i["cached_tokens"] <= shared
        assert i["prefilled_per_rank"] == [i["prompt_tokens"] - i["cached_tokens"]] * 2
    h = requests.get(served.url + "/health", timeout=5).json()
    assert h["status"] == "ok" and h["weight_loads"] == [1, 1] and h["requests"] >= 3


def test_openai_routes_plain_and_streaming(served, scratch):
    models = requests.get(served.url + "/v1/models", timeout=5).json()
    assert models["data"][0]["id"] == "tiny-nemotron"
    body = {"model": "tiny-nemotron", "messages": _messages("Why?"), "max_tokens": MAX_TOKENS, "temperature": 0}
    plain = requests.post(served.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert plain["object"] == "chat.completion" and plain["choices"][0]["finish_reason"] in ("stop", "length")
    assert plain["usage"]["completion_tokens"] == MAX_TOKENS and plain["arthur"]["ids"] == scratch["Why?"][1]
    r = requests.post(served.url + "/v1/chat/completions", json={**body, "stream": True, "stream_options": {
        "include_usage": True}}, stream=True, timeout=60)
    lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    text = "".join(c["delta"].get("content") or "" for ch in chunks for c in ch["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == []  # the usage chunk
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the same prompt again
    bad = requests.post(served.url + "/v1/chat/completions", json={"messages": []}, timeout=10)
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]


def test_document_job_on_a_multi_node_deployment_prefills_the_document_once(served, tmp_path, tiny_models):
    bringup.write_record(_deployment(served))
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    result = docjob.run([str(doc)], asks=["What is it?", "Why?", "zebra quantum 42"], max_tokens=MAX_TOKENS,
                        out=tmp_path / "job")
    t = result["tokens"]
    assert result["mode"] == "single" and result["cache_hits"]["resident"] == 2, result
    assert t["cached"] > t["document"] and t["prefilled"] < t["document"] + 3 * 64, t
    # Each answer is the one a single process gives from scratch for the job's own prompt (the document and
    # the question, as the job sends them), and the questions' answers are not all alike (random weights).
    model, tok, _ = load(tiny_models["nemotron_h-f32"])
    text = documents.load([str(doc)]).text
    seen = set()
    for a in result["answers"]:
        task = docjob.Task(id=a["task"], kind="ask", text=a["question"])
        prompt = docjob.Prompt(docjob.single_head(text), docjob.task_tail(task, "single"))
        ids = encode_request(tok, {"messages": prompt.messages()})
        want = [t for t, _ in generate(model, ids, max_tokens=MAX_TOKENS, prefill_step=32)]
        assert a["answer"] == docjob.Answer(unit="", text=tok.decode(want)).answer, a["question"]  # stripped alike
        assert a["finish_reason"] in ("stop", "length")
        seen.add(a["answer"])
    assert len(seen) > 1


def test_new_ranks_resume_a_document_from_their_own_disks(served, home, scratch, tiny_models):
    eng = bringup.engine_for(_deployment(served))
    for q in ("What is it?", "How many nodes?"):  # a document asked twice: each rank saves its shard
        collect(eng.stream(_messages(q), max_tokens=MAX_TOKENS))
    files = list((home / "prompt-cache" / "resident").glob("*.safetensors"))
    assert len(files) >= 2  # one per rank
    again = _start(tiny_models["nemotron_h-f32"], "tensor", home)  # as after `down` and `up`
    try:
        eng = bringup.engine_for(_deployment(again))
        result = collect(eng.stream(_messages("zebra quantum 42"), max_tokens=MAX_TOKENS))
        assert eng.last_done["weight_loads"] == [1, 1] and result.stats.cached_tokens > 0.8 * len(
            scratch["zebra quantum 42"][0])
        assert eng.last_done["ids"] == scratch["zebra quantum 42"][1]
    finally:
        resident.stop(again)


def test_a_killed_rank_ends_the_deployment_clearly_and_down_cleans_up(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_STATE_DIR, str(tmp_path / "state"))
    res = _start(tiny_models["nemotron_h-f32"], "pipeline", tmp_path / "state")
    try:
        dep = _deployment(res)
        bringup.write_record(dep)
        eng = bringup.engine_for(dep)
        assert collect(eng.stream(_messages("Why?"), max_tokens=2)).stats.generation_tokens == 2
        os.kill(res.pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EngineError, match=r"rank 1 \(pid \d+ .*\) is gone"):
            collect(eng.stream(_messages("Why?"), max_tokens=2))
        assert time.monotonic() - t0 < 10  # fails fast, no hang
        h = requests.get(res.url + "/health", timeout=5)
        assert h.status_code == 503 and "rank 1" in h.json()["reason"]
        assert any("have failed" in n for n in bringup.stale_notes())
        with pytest.raises(bringup.DeploymentError, match="have failed"):
            bringup.engine_for(dep)
        out = bringup.down()
        assert out.had_deployment and any("stopped the resident ranks" in a for a in out.actions)
        assert not any(_alive(p) for p in res.pids)
        assert not paths.deployment_file().exists() and not resident.state_file().exists()
    finally:
        resident.stop(res)


def test_killing_rank_0_stops_the_others_and_leaves_a_stale_record(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_STATE_DIR, str(tmp_path / "state"))
    res = bringup.start_resident(tiny_models["nemotron_h-8bit"], "tiny",
                                 Route(engine="mlx", sharding="pipeline", backend="ring", nodes=2), timeout=120)
    try:
        bringup.write_record(_deployment(res))
        os.kill(res.pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while _alive(res.pids[1]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(res.pids[1])  # it saw rank 0's connection close and exited
        notes = bringup.stale_notes()
        assert len(notes) == 1 and "stale record: nothing answers" in notes[0] and "all its processes are gone" \
            in notes[0]
        with pytest.raises(bringup.DeploymentError, match="stale record"):
            bringup.engine_for(bringup.read_record())
        assert bringup.down().had_deployment and not paths.deployment_file().exists()
    finally:
        resident.stop(res)


def test_ranks_outlive_an_up_killed_while_they_load_and_down_stops_them(tiny_models, tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv(paths.ENV_STATE_DIR, str(tmp_path / "state"))
    script = ("import sys; from pathlib import Path; from arthur_cluster import bringup; "
              "from arthur_cluster.fallback import Route; "
              "bringup.start_resident(Path(sys.argv[1]), 'tiny', Route(engine='mlx', sharding='pipeline', "
              "backend='ring', nodes=2), timeout=120)")
    up = subprocess.Popen([sys.executable, "-c", script, str(tiny_models["nemotron_h-8bit"])])
    deadline = time.monotonic() + 60
    while resident.read_state() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(up.pid, signal.SIGKILL)  # before the ranks are ready, and before any deployment record
    up.wait()
    res = resident.read_state()
    assert res is not None and len(res.pids) == 2 and not paths.deployment_file().exists()
    try:
        while resident.problem(res) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert resident.problem(res) is None and all(_alive(p) for p in res.pids)  # detached: they live on
        notes = bringup.stale_notes()  # healthy, but no deployment record: listed, with their pids
        assert len(notes) == 1 and "no deployment record names them" in notes[0]
        assert all(str(p) in notes[0] for p in res.pids)
        out = bringup.down()
        assert out.had_deployment and any("stopped the resident ranks" in a for a in out.actions)
        assert not any(_alive(p) for p in res.pids) and not resident.state_file().exists()
    finally:
        resident.stop(res)


def test_a_multi_node_route_starts_rank_0_here_and_the_others_over_ssh(tiny_models, tmp_path, monkeypatch):
    # Rank 0 on this machine, rank 1 on "far" through ssh. The stand-in for ssh runs the node's command here
    # (tests/test_hosts.py does it across real hosts): options and host dropped, the command line kept.
    monkeypatch.setenv(paths.ENV_STATE_DIR, str(tmp_path / "state"))
    stand_in = tmp_path / "ssh-here"
    stand_in.write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nshift\nexec sh -c "$*"\n')
    stand_in.chmod(0o755)
    monkeypatch.setenv("ARTHUR_CLUSTER_SSH", str(stand_in))
    here = {"ssh": "here", "ips": ["127.0.0.1"], "local": True}
    far = {"ssh": "far", "ips": ["127.0.0.1"], "program": [sys.executable, "-m", "arthur_cluster.cli"]}
    res = bringup.start_resident(tiny_models["nemotron_h-8bit"], "tiny",
                                 Route(engine="mlx", sharding="pipeline", backend="ring", nodes=2), [here, far],
                                 timeout=120)
    try:
        assert len(res.pids) == 2 and res.hosts == ["here", "far"]  # rank 0 itself, the ssh to rank 1
        assert "arthur_cluster.cli rank --model" in Path(f"/proc/{res.pids[1]}/cmdline").read_bytes().replace(
            b"\0", b" ").decode()
        eng = bringup.engine_for(_deployment(res))
        assert collect(eng.stream(_messages("Why?"), max_tokens=2)).stats.generation_tokens == 2
        assert len(eng.rank_pids) == 2
        resident.stop(res)
        assert not any(_alive(p) for p in [*eng.rank_pids, *res.pids])
    finally:
        resident.stop(res)
