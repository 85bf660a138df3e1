"""The resident ranks' OpenAI endpoint through the official `openai` SDK, on 1 rank and on 2 tensor ranks (ring on
loopback, real processes): the text equals mlx_lm.server's on the same folder, streamed equals whole, and the
sampling values reach every rank (seeded samples equal a one-process run of the same request)."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlparse

import openai
import pytest
import requests

from arthur_cluster.parallel import protocol, resident, server
from arthur_cluster.parallel.worker import load
from tests.openai_stand import MODEL_ID, QUESTIONS, MlxLmServer, ask, client, said, start

pytestmark = pytest.mark.slow
MAX = 24


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    """mlx_lm.server's greedy answers (thinking on and off) for every question, and its completions text."""
    ref = MlxLmServer(tiny_models["nemotron_h-f32"], tmp_path_factory.mktemp("mlx-lm") / "server.log")
    try:
        c = client(ref.url)
        chat = {(q, t): said(ask(c, q, thinking=t, model=ref.model, max_tokens=MAX, temperature=0).choices[0].message)
                for q in QUESTIONS for t in (None, False)}
        text = c.completions.create(model=ref.model, prompt="The cluster", max_tokens=MAX, temperature=0)
        return {"chat": chat, "completion": text.choices[0].text}
    finally:
        ref.stop()


@pytest.fixture(scope="module")
def local(tiny_models):
    """The model in this process: the one-rank reference for sampled answers."""
    model, tok, _ = load(tiny_models["nemotron_h-f32"])
    return model, tok


@pytest.fixture(scope="module", params=[1, 2], ids=["1-rank", "2-ranks"])
def deployment(request, tiny_models, tmp_path_factory):
    res = start(tiny_models["nemotron_h-f32"], request.param, tmp_path_factory.mktemp("state"))
    yield res
    resident.stop(res)


@pytest.fixture
def sdk(deployment):
    return client(deployment.url)


def test_greedy_text_equals_mlx_lm_server_and_is_not_empty(sdk, reference):
    for (q, thinking), want in reference["chat"].items():
        r = ask(sdk, q, thinking=thinking, max_tokens=MAX, temperature=0)
        assert said(r.choices[0].message) == want, (q, thinking)
        # thinking on: the answer so far is reasoning (where mlx_lm.server puts it); off: it is the content
        assert (want[1] if thinking is None else want[0]), (q, thinking)
    text = sdk.completions.create(model=MODEL_ID, prompt="The cluster", max_tokens=MAX, temperature=0)
    assert text.choices[0].text == reference["completion"] and text.object == "text_completion"
    streamed = sdk.completions.create(model=MODEL_ID, prompt="The cluster", max_tokens=MAX, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reference["completion"]


def test_stream_equals_whole(sdk):
    for q in QUESTIONS[1:3]:
        for thinking in (None, False):
            whole = ask(sdk, q, thinking=thinking, max_tokens=MAX, temperature=0)
            chunks = list(ask(sdk, q, thinking=thinking, max_tokens=MAX, temperature=0, stream=True,
                              stream_options={"include_usage": True}))
            assert {c.object for c in chunks} == {"chat.completion.chunk"}
            assert len({c.id for c in chunks}) == 1
            content = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
            reasoning = "".join(getattr(ch.delta, "reasoning", None) or "" for c in chunks for ch in c.choices)
            assert (content, reasoning) == said(whole.choices[0].message)
            finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
            assert finishes == [whole.choices[0].finish_reason]
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
            assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
            assert whole.usage.prompt_tokens_details.cached_tokens >= 0
            assert chunks[-1].model_extra["arthur"]["ids"] == whole.model_extra["arthur"]["ids"]
    whole = ask(sdk, QUESTIONS[0], max_tokens=8, temperature=1.0, seed=11, n=2)
    chunks = list(ask(sdk, QUESTIONS[0], max_tokens=8, temperature=1.0, seed=11, n=2, stream=True))
    for i in (0, 1):  # n choices streamed one after the other, each told apart by its index
        text = "".join(getattr(ch.delta, "reasoning", None) or "" for c in chunks for ch in c.choices if ch.index == i)
        assert text == said(whole.choices[i].message)[1]
    plain = list(ask(sdk, QUESTIONS[0], max_tokens=4, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text_and_finish_with_stop(sdk):
    full = ask(sdk, QUESTIONS[1], thinking=False, max_tokens=MAX, temperature=0).choices[0].message.content
    assert len(full) > 6
    cut = full[3:6]
    want = full[:full.index(cut)]
    for stop in (cut, ["zzzz-not-there", cut]):
        r = ask(sdk, QUESTIONS[1], thinking=False, max_tokens=MAX, temperature=0, stop=stop)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop")
        assert r.usage.completion_tokens < MAX
        streamed = list(ask(sdk, QUESTIONS[1], thinking=False, max_tokens=MAX, temperature=0, stop=stop,
                            stream=True))
        assert "".join(ch.delta.content or "" for c in streamed for ch in c.choices) == want
        assert streamed[-1].choices[0].finish_reason == "stop"


def test_length_exactly_when_max_tokens_cut(sdk, local):
    eos = set(local[1].eos_token_ids)
    reasons = set()
    for q in QUESTIONS:
        r = ask(sdk, q, max_tokens=MAX, temperature=0)
        ids = r.model_extra["arthur"]["ids"]
        ended = ids[-1] in eos
        assert r.choices[0].finish_reason == ("stop" if ended else "length"), q
        assert r.usage.completion_tokens == len(ids) and (ended or len(ids) == MAX)
        reasons.add(r.choices[0].finish_reason)
    assert reasons == {"stop", "length"}  # both cases ran
    r = ask(sdk, QUESTIONS[0], max_tokens=1, temperature=0)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 1)


def _prompt(tok, q: str) -> list[int]:
    return [int(t) for t in tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                     tokenize=True)]


def test_sampling_seeds_n_and_temperature_reach_every_rank(sdk, local):
    model, tok = local
    kw = dict(max_tokens=12, temperature=0.7, top_p=0.9)
    a = ask(sdk, QUESTIONS[0], seed=1234, **kw)
    b = ask(sdk, QUESTIONS[0], seed=1234, **kw)
    assert said(a.choices[0].message) == said(b.choices[0].message)
    # the same request in one process: the ranks sampled with the seed and temperature rank 0 was given
    params = server.Params.of(protocol.Request(prompt=_prompt(tok, QUESTIONS[0]), seed=1234, **kw))
    one = server.run_request(model, server.PrefixCache(model), _prompt(tok, QUESTIONS[0]), params, step=32,
                             eos=set(tok.eos_token_ids), emit=lambda ev: None)
    assert a.model_extra["arthur"]["ids"] == one["ids"]
    unseeded = [said(ask(sdk, QUESTIONS[0], max_tokens=12, temperature=1.0).choices[0].message) for _ in range(2)]
    assert unseeded[0] != unseeded[1]
    two = ask(sdk, QUESTIONS[0], max_tokens=12, temperature=1.0, n=2, seed=7)
    assert [c.index for c in two.choices] == [0, 1] and said(two.choices[0].message) != said(two.choices[1].message)
    greedy = ask(sdk, QUESTIONS[2], max_tokens=12, temperature=0)
    cold = ask(sdk, QUESTIONS[2], max_tokens=12, temperature=0.001, seed=3)
    assert said(cold.choices[0].message) == said(greedy.choices[0].message)  # temperature divides the logits


def test_logprobs_and_top_logprobs(sdk):
    r = ask(sdk, QUESTIONS[1], thinking=False, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    for entry in lp:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy: the chosen token is the likeliest
    s = list(ask(sdk, QUESTIONS[1], thinking=False, max_tokens=8, temperature=0, logprobs=True, stream=True))
    streamed = [e.logprob for c in s for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in lp])


def test_content_parts_equal_the_same_text(sdk):
    parts = [{"type": "text", "text": "What is two "}, {"type": "text", "text": "plus two?"}]
    a = sdk.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": parts}], max_tokens=MAX,
                                    temperature=0)
    b = ask(sdk, "What is two plus two?", max_tokens=MAX, temperature=0)
    assert said(a.choices[0].message) == said(b.choices[0].message)
    with pytest.raises(openai.BadRequestError, match="content"):
        sdk.chat.completions.create(model=MODEL_ID, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])


def test_models_and_unknown_model(sdk):
    assert [m.id for m in sdk.models.list()] == [MODEL_ID]
    assert sdk.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("other")
    with pytest.raises(openai.NotFoundError, match="other"):
        ask(sdk, "hi", model="other", max_tokens=2)


def test_a_404_then_a_request_on_the_same_connection_are_both_answered(deployment):
    u = urlparse(deployment.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/nothing-here", body=json.dumps({"x": "y" * 5000}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 404 and json.loads(r.read())["error"]["message"]
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 3}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 3
    conn.close()


def test_cors_and_options(deployment):
    pre = requests.options(deployment.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in ("*", "http://example.test")
    plain = requests.options(deployment.url + "/v1/models", timeout=10)
    assert plain.status_code == 204 and "POST" in plain.headers["allow"]
    got = requests.get(deployment.url + "/v1/models", headers={"Origin": "http://example.test"}, timeout=10)
    assert got.headers["access-control-allow-origin"] == "*"


def test_every_sdk_parameter_is_supported_or_refused_by_name(sdk):
    from openai.types.chat.completion_create_params import CompletionCreateParamsBase

    names = set(CompletionCreateParamsBase.__annotations__) - {"messages", "model"}
    assert len(names) > 20
    for name in sorted(names):  # a value no parameter takes: each answer names the parameter
        with pytest.raises(openai.BadRequestError) as e:
            sdk.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                        extra_body={name: {"no": ["such", "value"]}})
        assert name in str(e.value), name


def test_bad_values_are_400_naming_the_parameter(sdk):
    bad = {"temperature": -1, "top_p": 0, "max_tokens": 0, "n": 0, "seed": -1, "top_logprobs": 50,
           "stop": ["a", "b", "c", "d", "e"], "stream": "no", "frequency_penalty": 0.5, "presence_penalty": 1,
           "logit_bias": {"5": 10}, "response_format": {"type": "json_object"}}
    for name, value in bad.items():
        with pytest.raises(openai.BadRequestError) as e:
            sdk.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=4, extra_body={name: value})
        assert name in str(e.value), (name, str(e.value))
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        ask(sdk, "hi", max_tokens=2, top_logprobs=2)  # without logprobs
