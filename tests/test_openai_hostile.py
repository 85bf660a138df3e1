"""Hostile requests against the resident ranks' endpoint, on 1 rank and on 2 tensor ranks: each is answered with
an HTTP error (a bounded client wait, no hang), and the next normal request still gets the right answer."""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from urllib.parse import urlparse

import pytest
import requests

from arthur_cluster.parallel import api, resident
from tests.openai_stand import MODEL_ID, start

pytestmark = pytest.mark.slow
WAIT = 30  # seconds any answer may take here (a bound on the client, so a hang fails instead of blocking)
NORMAL = {"model": MODEL_ID, "messages": [{"role": "user", "content": "What is two plus two?"}], "max_tokens": 6,
          "temperature": 0}


@pytest.fixture(scope="module", params=[1, 2], ids=["1-rank", "2-ranks"])
def deployment(request, tiny_models, tmp_path_factory):
    res = start(tiny_models["nemotron_h-f32"], request.param, tmp_path_factory.mktemp("state"))
    yield res
    resident.stop(res)


@pytest.fixture(scope="module")
def normal(deployment):
    """The normal request's answer before anything hostile happened: every later one must equal it."""
    return _ok(deployment)


def _ok(res) -> list[int]:
    """The normal request, retried on 429 as its Retry-After says (as the openai SDK does), within WAIT."""
    end = time.monotonic() + WAIT
    while True:
        r = requests.post(res.url + "/v1/chat/completions", json=NORMAL, timeout=WAIT)
        if r.status_code != 429 or time.monotonic() > end:
            break
        time.sleep(float(r.headers["Retry-After"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == len(body["arthur"]["ids"]) > 0
    return body["arthur"]["ids"]


def _raw(res, data: bytes, read: bool = True) -> bytes:
    u = urlparse(res.url)
    with socket.create_connection((u.hostname, u.port), timeout=WAIT) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and b"Content-Length" not in out.split(b"\r\n\r\n")[0]:
                break
            head, _, body = out.partition(b"\r\n\r\n")
            if b"content-length:" in head.lower():
                n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= n:
                    break
        return out


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode() + body


def _chat(**over) -> dict:
    return {**NORMAL, **over}


HOSTILE_JSON = {
    "seed -1": _chat(seed=-1), "seed 2**64": _chat(seed=2**64), "seed 2**31+5": _chat(seed=2**31 + 5),
    "seed -7": _chat(seed=-7), "max_tokens 2**31+5": _chat(max_tokens=2**31 + 5), "max_tokens 0": _chat(max_tokens=0),
    "max_tokens -1": _chat(max_tokens=-1), "temperature 1e30": _chat(temperature=1e30),
    "temperature -1": _chat(temperature=-1), "top_p 2": _chat(top_p=2), "n 1000": _chat(n=1000),
    "top_logprobs 10**9": _chat(logprobs=True, top_logprobs=10**9),
    "a caller's chat template": _chat(chat_template_kwargs={
        "chat_template": "{% for a in range(99999) %}{% for b in range(99999) %}x{% endfor %}{% endfor %}"}),
    "a template argument beyond the flags": _chat(chat_template_kwargs={"add_generation_prompt": False}),
    "10,000 messages": _chat(messages=[{"role": "user", "content": "hi"}] * 10_000),
    "a message without role": _chat(messages=[{"content": "hi"}]),
    "a message without content": _chat(messages=[{"role": "user"}]),
    "a user message with null content": _chat(messages=[{"role": "user", "content": None}]),
    "an unknown role": _chat(messages=[{"role": "tool", "content": "hi"}]),
    "no messages": _chat(messages=[]), "messages not a list": _chat(messages="hi"),
    "stream 'no'": _chat(stream="no"), "unknown parameter": _chat(frobnicate=True),
    "tools": _chat(tools=[{"type": "function", "function": {"name": "f"}}]), "not an object": [1, 2, 3],
    "stop of 5": _chat(stop=list("abcde")), "empty stop": _chat(stop=""),
    "model not a string": _chat(model=["x"]), "unknown model": _chat(model="other"),
}


def test_hostile_json_bodies_are_answered_and_the_next_request_is_right(deployment, normal):
    for name, body in HOSTILE_JSON.items():
        r = requests.post(deployment.url + "/v1/chat/completions", json=body, timeout=WAIT)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:200])
        assert r.json()["error"]["message"], name
    assert _ok(deployment) == normal
    h = requests.get(deployment.url + "/health", timeout=WAIT).json()
    assert h["status"] == "ok"


def test_malformed_bodies_and_headers_get_http_answers(deployment, normal):
    cases = {
        "max_tokens 1e400": b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}'
                            % MODEL_ID.encode(),
        "temperature NaN": b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
                           % MODEL_ID.encode(),
        "deep JSON": b"[" * 100_000 + b"]" * 100_000,
        "not JSON": b"{nope",
        "not UTF-8": b'{"model": "\xff\xfe"}',
    }
    for name, body in cases.items():
        out = _raw(deployment, _post("/v1/chat/completions", body))
        assert out.startswith(b"HTTP/1.1 4"), (name, out[:200])
    for name, data in {
        "Content-Length abc": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        "garbage request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    }.items():
        out = _raw(deployment, data)
        assert out == b"" or out.startswith(b"HTTP/1.1 4"), (name, out[:200])
    assert _ok(deployment) == normal


def test_too_much_input_is_refused_naming_the_numbers(deployment, normal):
    words = " ".join(["cluster"] * 12_000)  # about 12,000 tokens on a 4,096-token context
    r = requests.post(deployment.url + "/v1/chat/completions", timeout=WAIT,
                      json=_chat(messages=[{"role": "user", "content": words}]))
    assert r.status_code == 400 and "4096" in r.json()["error"]["message"], r.text[:300]
    assert int(re.search(r"prompt is (\d+) tokens", r.json()["error"]["message"]).group(1)) > 4096
    r = requests.post(deployment.url + "/v1/chat/completions", json=_chat(max_tokens=4090), timeout=WAIT)
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "4090" in msg and "4096" in msg and r.json()["error"]["param"] == "max_tokens"
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * 3_000_000 + b'"}]}'
    r = requests.post(deployment.url + "/v1/chat/completions", data=big, timeout=WAIT,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and str(api.BODY_BASE + 32 * 4096) in r.json()["error"]["message"]
    assert _ok(deployment) == normal


def _long(**over) -> bytes:
    return json.dumps(_chat(**{"max_tokens": 3000, "temperature": 1.0, **over})).encode()


def _idle(res) -> dict:
    end = time.monotonic() + WAIT
    while (h := requests.get(res.url + "/health", timeout=WAIT).json())["status"] != "ok":
        assert time.monotonic() < end, h
        time.sleep(0.05)
    return h


def test_clients_that_leave_cancel_their_requests(deployment, normal):
    # a seed whose first 100 sampled tokens hold no end token: 3,000 of them end by being cancelled
    r = requests.post(deployment.url + "/v1/chat/completions", json=_chat(max_tokens=100, temperature=1.0, seed=1),
                      timeout=WAIT * 4)
    assert r.json()["choices"][0]["finish_reason"] == "length"
    for stream in (False, True):  # a client that leaves while the answer runs (tokens flowing)
        _raw(deployment, _post("/v1/chat/completions", _long(stream=stream, seed=1)), False)
        time.sleep(0.3)
        assert _idle(deployment)["last"]["finish_reason"] == "cancelled", stream
    # a streaming client that leaves mid-answer, then 100 that send a long request and leave at once
    u = urlparse(deployment.url)
    with socket.create_connection((u.hostname, u.port), timeout=WAIT) as s:
        s.sendall(_post("/v1/chat/completions", _long(stream=True)))
        assert b"data: " in s.recv(65536) + s.recv(65536)
    threads = [threading.Thread(target=_raw, args=(deployment, _post("/v1/chat/completions", _long()), False))
               for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _ok(deployment) == normal  # within WAIT: the abandoned requests were cancelled, not run


def test_a_full_queue_answers_429_and_health_says_busy(deployment, normal):
    held = []
    codes = []
    try:
        for _ in range(12):  # more than the queue holds (8) plus the one running
            r = requests.post(deployment.url + "/v1/chat/completions", data=_long(stream=True), stream=True,
                              timeout=WAIT, headers={"Content-Type": "application/json"})
            codes.append(r.status_code)
            held.append(r)
        h = requests.get(deployment.url + "/health", timeout=WAIT)
        assert h.status_code == 200 and h.json()["status"] == "busy"
    finally:
        for r in held:
            r.close()
    assert 429 in codes and codes[0] == 200
    assert _ok(deployment) == normal


def test_idle_connections_are_capped_and_normal_clients_still_get_in(deployment, normal):
    u = urlparse(deployment.url)
    with socket.create_connection((u.hostname, u.port), timeout=api.IDLE_WAIT + 10) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # headers that never end
        assert slow.recv(10) == b""  # closed after IDLE_WAIT, not held open
    idle = [socket.create_connection((u.hostname, u.port), timeout=WAIT) for _ in range(api.MAX_CONNECTIONS + 40)]
    try:
        assert _ok(deployment) == normal
        readable, _, _ = select.select(idle, [], [], 5)
        assert sum(s.recv(10) == b"" for s in readable) >= 40  # idle ones were closed to make room
    finally:
        for s in idle:
            s.close()
