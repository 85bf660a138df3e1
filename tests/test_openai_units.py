"""The endpoint's parts without ranks: rank 0's queue and its /health status, the header every rank decodes, and
the text side (stop strings and thinking split across token boundaries) on a miniature's real tokenizer."""

from __future__ import annotations

import time

import pytest

from arthur_cluster.parallel import api, protocol, server
from arthur_cluster.parallel.protocol import Done, EngineBusy, EngineDown, Failed, Request


def _req(**kw) -> Request:
    return Request(prompt=[1, 2, 3], max_tokens=kw.pop("max_tokens", 4), **kw)


def test_the_queue_is_bounded_and_health_tells_busy_stuck_failed():
    eng = server.RankEngine(max_queue=2, stuck_after=3600)
    with pytest.raises(EngineDown, match="loading"):
        eng.submit(_req(), lambda ev: None)
    assert eng.status().status == "loading"
    eng.ready(ranks=1)
    assert eng.status().status == "ok"
    got: list = []
    a = eng.submit(_req(), got.append)
    b = eng.submit(_req(), got.append)
    assert eng.status().status == "busy"
    with pytest.raises(EngineBusy, match="queue holds 2"):
        eng.submit(_req(), got.append)
    eng.cancel(b)
    assert got == [Done("cancelled", {})]
    assert eng.next() is a and eng.status().status == "busy"
    eng.stuck_after = 0.0
    time.sleep(0.01)
    st = eng.status()
    assert st.status == "stuck" and "no progress" in st.reason
    eng.fail("rank 1 is gone")
    assert got[-1] == Failed("rank 1 is gone") and eng.status() == protocol.Status("failed", "rank 1 is gone",
                                                                                     eng.status().info)
    with pytest.raises(EngineDown, match="rank 1"):
        eng.submit(_req(), got.append)


def test_the_header_carries_bounded_values_exactly():
    for r in (_req(), _req(temperature=0.7, top_p=0.9, seed=protocol.SEED_MAX, logprobs=True, top_logprobs=20,
                           max_tokens=protocol.TOKEN_MAX), _req(temperature=2.0, top_p=1e-6, seed=0)):
        p = server.Params.of(r)
        words = server._words(server.OP_GENERATE, 3, p)
        assert len(words) == server.HEADER and all(-2**31 <= w < 2**31 for w in words)  # int32 words
        assert server._params(words) == p
    for bad in ({"seed": -1}, {"seed": 2**31}, {"temperature": 1e30}, {"max_tokens": 0}, {"top_logprobs": 21},
                {"temperature": float("nan")}, {"top_p": 0.0}, {"seed": True}):
        with pytest.raises(ValueError):
            _req(**bad)


@pytest.fixture(scope="module")
def tok(tiny_models):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_models["nemotron_h-f32"])


def _decode(tok, text: str, stops: list[str], reasoning: bool = False):
    d = api.Decoder(tok, set(tok.eos_token_ids), stops, reasoning)
    parts = []
    for t in tok.encode(text, add_special_tokens=False):
        parts += d.add(t)
    parts += d.finish()
    joined: dict[str, str] = {}
    for state, t in parts:
        joined[state] = joined.get(state, "") + t
    return joined, d.stopped


def test_stop_strings_end_the_text_across_token_boundaries(tok):
    text = "The cluster runs the model across several machines."
    assert _decode(tok, text, []) == ({"normal": text}, False)
    assert _decode(tok, text, ["model acr"]) == ({"normal": "The cluster runs the "}, True)
    assert _decode(tok, text, ["zzz", "s the"]) == ({"normal": "The cluster run"}, True)
    assert _decode(tok, text, ["machines.!"]) == ({"normal": text}, False)  # a partial match at the end is sent


def test_thinking_goes_to_reasoning_and_its_markers_are_not_sent(tok):
    joined, _ = _decode(tok, "weigh it</think>The answer is four.", [], reasoning=True)
    assert joined == {"reasoning": "weigh it", "normal": "The answer is four."}
    joined, _ = _decode(tok, "Sure.<think>hmm</think>Four.", [])
    assert joined == {"normal": "Sure.Four.", "reasoning": "hmm"}


def test_a_template_that_raises_is_a_400_naming_messages(tiny_models):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_models["nemotron_h-f32"])
    tok._tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    front = api.Front(server.RankEngine(), "tiny", "")
    front.ready(tok, 4096)
    req = api.parse({"messages": [{"role": "user", "content": "hi"}]}, api.ChatRequest)
    with pytest.raises(api.ApiError, match="roles must alternate") as e:
        front._encode_chat(req)
    assert (e.value.status, e.value.param) == (400, "messages")
