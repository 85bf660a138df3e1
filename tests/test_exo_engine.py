"""ExoEngine over exo's own API code (tests/fixtures_exo.py; its runners are faked and always answer
"2 + 2 = 4.", so these tests are about the stream, not the model)."""

from __future__ import annotations

import pytest

from arthur_cluster.engines import Engine, EngineError
from arthur_cluster.engines.base import collect
from arthur_cluster.engines.exo import THINK_END, ExoEngine
from arthur_cluster.exo_client import ExoClient
from tests.fixtures_exo import LLAMA_ID
from tests.test_exo_client import ANSWER, linked_llama

ASK = [{"role": "user", "content": "What is 2+2?"}]


def engine_on(url: str, **kw) -> ExoEngine:
    client = ExoClient(url)
    client.place_and_wait(LLAMA_ID, timeout=60, poll=0.02, **kw)
    return ExoEngine(client, LLAMA_ID)


@pytest.fixture
def clean(shared_exo):
    yield shared_exo
    client = ExoClient(shared_exo.url)
    for iid in list(client.state().instances):
        client.delete_instance(iid)


def test_stream_prefill_tokens_done(clean):
    engine = engine_on(clean.url)
    assert isinstance(engine, Engine) and engine.name == "exo"
    events = list(engine.stream(ASK, max_tokens=6))
    kinds = [e.kind for e in events]
    assert kinds[0] == "prefill" and kinds[-1] == "done" and "token" in kinds
    assert kinds.index("token") > max(i for i, k in enumerate(kinds) if k == "prefill")
    assert [(e.done, e.total) for e in events if e.kind == "prefill"] == [(8, 12), (12, 12)]
    stats = events[-1].stats
    assert (stats.prompt_tokens, stats.generation_tokens, stats.finish_reason) == (12, 6, "stop")
    assert "".join(e.text for e in events if e.kind == "token") == ANSWER
    engine.close()
    assert engine.client.state().instances_of(LLAMA_ID)  # close() leaves the instance to the cluster


def test_reasoning_is_kept_in_the_text_and_closed(exo_factory, tmp_path, tiny_models):
    h = exo_factory("--thinking", links=linked_llama(tmp_path, tiny_models))
    engine = engine_on(h.url)
    raw = list(engine.client.stream_chat(LLAMA_ID, ASK, max_tokens=8))
    reasoning = "".join(e.reasoning for e in raw if e.kind == "delta")
    assert reasoning == "Simple sum."  # exo sends thinking tokens as reasoning_content
    result = collect(engine.stream(ASK, max_tokens=8))
    assert result.text == reasoning + THINK_END + ANSWER


def test_model_not_running_is_an_engine_error(clean):
    engine = ExoEngine(ExoClient(clean.url), LLAMA_ID)
    with pytest.raises(EngineError, match="No instance found for model mlx-community/Llama-3.2-1B-Instruct-4bit"):
        collect(engine.stream(ASK, max_tokens=2))


def test_a_stream_error_mid_answer_is_an_engine_error(exo_factory, tmp_path, tiny_models):
    h = exo_factory("--error-after", "1", links=linked_llama(tmp_path, tiny_models))
    engine = engine_on(h.url, min_nodes=2)
    with pytest.raises(EngineError, match="Runner on node exonode-1 disconnected"):
        collect(engine.stream(ASK, max_tokens=8))
