"""Faults exo's real code cannot produce, served by tests/exo_faults.py: the client must stay bounded and turn
every malformed answer into one ExoProtocolError naming the URL."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from arthur_cluster.exo_client import ExoClient, ExoProtocolError, ExoTimeout, InstanceNotReady
from tests.exo_faults import MALFORMED, WELL_FORMED_BY_KIT, FaultServer
from tests.fixtures_exo import KITS, exo_python

CHECK = """
import importlib, json, sys
from pydantic import TypeAdapter
answers = json.load(sys.stdin)
for path, (type_path, answer) in answers.items():
    module, name = type_path.split(":")
    TypeAdapter(getattr(importlib.import_module(module), name)).validate_json(json.dumps(answer))
    print("valid", path)
"""


@pytest.fixture
def fault_server():
    started: list[FaultServer] = []

    def make(fault: str | None = None, trickle: float = 0.0, answers: dict | None = None) -> FaultServer:
        started.append(FaultServer(fault, trickle, answers))
        return started[-1]

    yield make
    for s in started:
        s.stop()


def validate_with_exo(answers: dict, tmp_path, kit: str = "main") -> None:
    """Every answer parses as exo's own pydantic type (in that version's exo-real venv, from its source)."""
    res = subprocess.run([exo_python(kit), "-c", CHECK], input=json.dumps(answers), capture_output=True,
                         text=True, timeout=120, env={"EXO_HOME": str(tmp_path), "HOME": str(tmp_path),
                                                      "PYTHONPATH": str(KITS[kit].vendor_src)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(res.stdout.split()[1::2]) == sorted(answers)


def test_the_stand_ins_well_formed_answers_are_exos_own_types(tmp_path, fault_server, exo_kit):
    answers = WELL_FORMED_BY_KIT[exo_kit.name]
    validate_with_exo(answers, tmp_path, exo_kit.name)
    client = ExoClient(fault_server(answers=answers).url)  # and the client reads every one of them
    node = client.state().nodes["exonode-0"]
    assert client.node_id() == "exonode-0" and node.ram_available == 48 << 30
    # what the version says: main's backends; v1.0.71 has none (unknown, not "none"): the chip says Apple
    assert node.backends == (["MlxMetal"] if "nodeBackends" in answers["/state"][1] else None) and node.apple
    assert [m.id for m in client.models()] == [answers["/v1/models"][1]["data"][0]["id"]]
    assert client.previews("x") == []


def test_the_stand_in_state_of_each_version_is_rejected_by_the_other_where_they_differ(tmp_path):
    """v1.0.71's State forbids nodeBackends: main's answer is not valid there (so each must be its own)."""
    res = subprocess.run([exo_python("v1.0.71"), "-c", CHECK], input=json.dumps({"/state": WELL_FORMED_BY_KIT[
        "main"]["/state"]}), capture_output=True, text=True, timeout=120,
        env={"EXO_HOME": str(tmp_path), "HOME": str(tmp_path), "PYTHONPATH": str(KITS["v1.0.71"].vendor_src)})
    assert res.returncode != 0 and "nodeBackends" in res.stderr


def test_an_answer_trickling_in_one_byte_every_2_s_is_cut_at_the_total_limit(fault_server):
    server = fault_server(trickle=2.0)
    client = ExoClient(server.url, read_timeout=3.0, retries=2)
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            client.state()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            outcome.append(exc)

    worker = threading.Thread(target=call, daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(timeout=30)  # the answer would take minutes to trickle in
    assert not worker.is_alive(), "the call hung past its total limit"
    assert isinstance(outcome[0], ExoTimeout), outcome
    assert "within 3 s (a limit on the whole answer)" in str(outcome[0]) and server.url in str(outcome[0])
    assert time.monotonic() - start < 30


CALLS = {"/state": lambda c: c.state(), "/v1/models": lambda c: c.models(),
         "/instance/previews": lambda c: c.previews("mlx-community/Llama-3.2-1B-Instruct-4bit")}


@pytest.mark.parametrize("fault", sorted(MALFORMED))
def test_a_malformed_answer_is_one_protocol_error_naming_the_url(fault_server, fault):
    server = fault_server(fault)
    (path,) = MALFORMED[fault]
    with pytest.raises(ExoProtocolError) as err:
        CALLS[path](ExoClient(server.url, retries=0))
    text = str(err.value)
    assert server.url in text and "\n" not in text and len(text) < 600


def test_an_ongoing_download_is_progress_and_the_wait_says_where_it_stood(shared_exo, fault_server, tmp_path):
    """exo-real never downloads; a state with DownloadOngoing is built from the state exo's own code made for
    a placed instance, checked against exo's State type, and served by the stand-in."""
    from tests.fixtures_exo import LLAMA_ID

    client = ExoClient(shared_exo.url)
    inst = client.place_and_wait(LLAMA_ID, timeout=60, poll=0.02)
    state = shared_exo.get("/state")
    client.delete_instance(inst.instance_id)
    tagged = state["instances"][inst.instance_id]
    body = next(iter(tagged.values()))
    rid, shard = next(iter(body["shardAssignments"]["runnerToShard"].items()))
    node = next(n for n, r in body["shardAssignments"]["nodeToRunner"].items() if r == rid)
    total, done = 729_808_896, 182_452_224

    def mem(n: int) -> dict:
        return {"inBytes": n}

    ongoing = {"DownloadOngoing": {"nodeId": node, "shardMetadata": shard, "modelDirectory": "/models/x",
                                   "downloadProgress": {"total": mem(total), "downloaded": mem(done),
                                                        "downloadedThisSession": mem(done), "completedFiles": 1,
                                                        "totalFiles": 4, "speed": 1e6, "etaMs": 9000,
                                                        "files": {}}}}
    fake = {**state, "instances": {inst.instance_id: tagged}, "runners": {rid: {"RunnerIdle": {}}},
            "downloads": {node: [ongoing]}, "tasks": {}}
    answers = {"/state": ("exo.shared.types.state:State", fake)}
    validate_with_exo(answers, tmp_path, shared_exo.kit.name)
    seen: list[tuple[int, int]] = []
    with pytest.raises(InstanceNotReady, match=f"node {node}: downloading 174/696 MiB"):
        ExoClient(fault_server(answers=answers).url).wait_ready(LLAMA_ID, timeout=1.0, poll=0.1,
                                                                on_download=lambda d, t: seen.append((d, t)))
    assert seen and set(seen) == {(done, total)}


@pytest.mark.parametrize("fault", ["node-memory-string", "deep-state"])
def test_the_commands_say_one_line_naming_exo_never_a_traceback(fault_server, fault, tmp_path):
    from typer.testing import CliRunner

    from arthur_cluster import cli

    server = fault_server(fault)
    res = CliRunner().invoke(cli.app, ["up", "--engine", "exo", "--exo", server.url])
    assert res.exit_code == 1 and server.url in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli.app, ["pick", "--exo", server.url, "--json"])
    assert "Traceback" not in res.output and not isinstance(res.exception, RecursionError)


def test_an_instance_whose_runners_are_running_is_ready_and_up_reuses_it(shared_exo, fault_server, tmp_path):
    """A runner answering a request is RunnerRunning, not RunnerReady: the instance is serving. exo-real's
    runners pass through Running only for the ~0.1 s of an answer, so the state exo's own code made for a
    placed instance is served with its runners Running (checked against exo's State type)."""
    from arthur_cluster import bringup
    from tests.fixtures_exo import LLAMA_ID

    client = ExoClient(shared_exo.url)
    inst = client.place_and_wait(LLAMA_ID, timeout=60, poll=0.02)
    state = shared_exo.get("/state")
    client.delete_instance(inst.instance_id)
    running = {**state, "runners": {r: {"RunnerRunning": {}} for r in state["runners"]}, "tasks": {}}
    answers = {"/state": ("exo.shared.types.state:State", running)}
    validate_with_exo(answers, tmp_path, shared_exo.kit.name)
    stand_in = ExoClient(fault_server(answers=answers).url)
    assert stand_in.wait_ready(LLAMA_ID, timeout=1.0, poll=0.1).instance_id == inst.instance_id
    said: list[str] = []
    got, placed = bringup._place(stand_in, None, LLAMA_ID, 1.0, bringup.Hooks(say=said.append))
    assert (got.instance_id, placed) == (inst.instance_id, False) and "reusing it" in said[-1]


class _Flood(threading.Thread):
    """An event stream that sends one endless line (no newline), then holds the connection open."""

    def __init__(self, size: int, hold: float):
        import socket

        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.size, self.hold, self.sent = size, hold, 0

    def run(self) -> None:
        conn, _ = self.sock.accept()
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: ")
            block = b"x" * 65536
            while self.sent < self.size:
                conn.sendall(block)
                self.sent += len(block)
            time.sleep(self.hold)
        except OSError:
            pass  # the client gave up: what the test wants
        finally:
            conn.close()
            self.sock.close()


def test_a_stream_line_past_the_cap_is_refused_while_it_grows_not_at_its_end(monkeypatch):
    """A line without a newline must be cut once it passes MAX_LINE, not buffered until it ends (it may
    never end: memory would grow for the stream's whole time limit)."""
    from arthur_cluster import exo_client

    monkeypatch.setattr(exo_client, "MAX_LINE", 1 << 18)
    flood = _Flood(size=4 << 20, hold=60.0)
    flood.start()
    with pytest.raises(ExoProtocolError, match="longer than 262144 bytes"):
        list(ExoClient(flood.url).stream_chat("m", [{"role": "user", "content": "hi"}], timeout=20))
