"""ExoEngine over the contract simulator (whose generation is real mlx-lm on the tiny models)."""

from __future__ import annotations

import pytest

from arthur_cluster.engines import Engine, EngineError
from arthur_cluster.engines.base import collect
from arthur_cluster.engines.exo import ExoEngine
from arthur_cluster.exo_client import ExoClient
from tests.fixtures_exo import SIM_LLAMA_ID, SIM_NEMOTRON_ID

ASK = [{"role": "user", "content": "What is 2+2?"}]


def engine_for(sim, model_id, **kw) -> ExoEngine:
    client = ExoClient(sim.url)
    client.place_and_wait(model_id, timeout=60, poll=0.05, **kw)
    return ExoEngine(client, model_id)


def test_stream_prefill_tokens_done(exo_sim):
    engine = engine_for(exo_sim, SIM_LLAMA_ID)
    assert isinstance(engine, Engine) and engine.name == "exo"
    events = list(engine.stream(ASK, max_tokens=6))
    kinds = [e.kind for e in events]
    assert kinds[0] == "prefill" and kinds[-1] == "done" and "token" in kinds
    assert kinds.index("token") > max(i for i, k in enumerate(kinds) if k == "prefill")
    last_prefill = [e for e in events if e.kind == "prefill"][-1]
    stats = events[-1].stats
    assert last_prefill.done == last_prefill.total == stats.prompt_tokens
    assert stats.generation_tokens == 6 and stats.finish_reason == "length"
    assert stats.generation_tps > 0 and stats.peak_memory_bytes > 0
    # Greedy decoding: the streamed text equals exo's non-streaming answer for the same request.
    text = "".join(e.text for e in events if e.kind == "token")
    assert text == engine.client.chat(SIM_LLAMA_ID, ASK, max_tokens=6).text
    engine.close()
    assert engine.client.state().instances_of(SIM_LLAMA_ID)  # close() leaves the instance to the cluster


def test_nemotron_reasoning_is_kept_in_the_text(exo_sim_factory):
    sim = exo_sim_factory(nodes=2)
    engine = engine_for(sim, SIM_NEMOTRON_ID, min_nodes=2)
    thinking = collect(engine.stream(ASK, max_tokens=5))
    plain = collect(engine.stream(ASK, max_tokens=5, enable_thinking=False))
    raw = list(engine.client.stream_chat(SIM_NEMOTRON_ID, ASK, max_tokens=5))
    # The simulator sends text inside the open <think> block as reasoning_content; the engine keeps it as text.
    reasoning = "".join(e.reasoning for e in raw if e.kind == "delta")
    assert reasoning and thinking.text.startswith(reasoning)
    assert plain.text and plain.stats.generation_tokens == 5


def test_model_not_running_is_an_engine_error(exo_sim):
    engine = ExoEngine(ExoClient(exo_sim.url), SIM_LLAMA_ID)
    with pytest.raises(EngineError, match="No instance found for model mlx-community/Llama-3.2-1B-Instruct-4bit"):
        collect(engine.stream(ASK, max_tokens=2))


def test_node_loss_is_an_engine_error(exo_sim_factory):
    sim = exo_sim_factory(nodes=2)
    engine = engine_for(sim, SIM_LLAMA_ID, min_nodes=2)
    sim.set_faults(node_loss_after=1)
    with pytest.raises(EngineError, match="simnode-1 disconnected"):
        collect(engine.stream(ASK, max_tokens=8))
