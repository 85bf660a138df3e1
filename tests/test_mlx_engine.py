"""MlxEngine: in-process mlx-lm, and real rank processes (ring on loopback) streamed from rank 0."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from arthur_cluster.engines.base import Engine, EngineError, collect
from arthur_cluster.engines.mlx import MlxEngine
from tests.conftest import copy_model

MSGS = [{"role": "user", "content": "Summarize the document about the cluster, the pipeline and the nodes."}]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_single_and_distributed_answer_alike(tiny_models):
    path = tiny_models["nemotron_h-f32"]
    with MlxEngine(path, prefill_step=8) as local:
        assert isinstance(local, Engine) and local.model is not None and local.tokenizer is not None
        events = list(local.stream(MSGS, max_tokens=12, enable_thinking=False))
        thinking_prompt, plain_prompt = local._prompt(MSGS, True), local._prompt(MSGS, False)
    single = collect(iter(events))
    prefill = [e for e in events if e.kind == "prefill"]
    assert prefill and prefill[-1].done == prefill[-1].total == single.stats.prompt_tokens
    assert single.stats.generation_tokens == 12 and single.stats.peak_memory_bytes > 0
    assert thinking_prompt != plain_prompt  # the template honours enable_thinking
    assert len(plain_prompt) == single.stats.prompt_tokens

    dist = MlxEngine(path, mode="pipeline", n=2, prefill_step=8)
    events = list(dist.stream(MSGS, max_tokens=12, enable_thinking=False))
    res = collect(iter(events))
    assert res.text == single.text and res.stats.prompt_tokens == single.stats.prompt_tokens
    assert res.stats.generation_tps > 0 and res.stats.peak_memory_bytes > 0
    assert len(dist.last_done["weight_bytes"]) == 2
    assert any(e.kind == "prefill" for e in events)
    assert not any(_alive(p) for p in dist.rank_pids)
    dist.close()


def test_rank_death_mid_stream_is_a_clear_error(tiny_models):
    eng = MlxEngine(tiny_models["nemotron_h-f32"], mode="tensor", n=2, prefill_step=8)
    stream = eng.stream(MSGS, max_tokens=400)
    tokens = 0
    with pytest.raises(EngineError, match=r"rank 1 was killed by signal 9.*all ranks were stopped"):
        for ev in stream:
            if ev.kind == "token":
                tokens += 1
                if tokens == 3:
                    os.kill(eng.rank_pids[1], signal.SIGKILL)
    pids = eng.rank_pids
    assert tokens >= 3 and len(pids) == 2
    assert not any(_alive(p) for p in pids)


def test_closing_the_stream_stops_the_ranks(tiny_models, tmp_path):
    # No end token the model can produce, and far more tokens than the ranks make in the 10 s below: they stop
    # only if closing the stream stops them (with an end token they might finish on their own first).
    folder = copy_model(tiny_models["nemotron_h-8bit"], tmp_path / "model")
    for name, key in (("config.json", "eos_token_id"), ("tokenizer_config.json", "eos_token"),
                      ("special_tokens_map.json", "eos_token")):
        data = json.loads((folder / name).read_text())
        data.pop(key)
        (folder / name).write_text(json.dumps(data))
    eng = MlxEngine(folder, mode="pipeline", n=2, prefill_step=8)
    stream = eng.stream(MSGS, max_tokens=1_000_000)
    for ev in stream:
        if ev.kind == "token":
            break
    pids = eng.rank_pids
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    try:
        stream.close()  # what a consumer's Ctrl-C or break does to the generator
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        for p in pids:  # the test's own clean-up when the check above failed
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        eng.close()


def test_refusals_are_clear(tiny_models):
    with pytest.raises(EngineError, match="num_key_value_heads=2 is not divisible by 4"):
        MlxEngine(tiny_models["nemotron_h-8bit"], mode="tensor", n=4)
    with pytest.raises(EngineError, match=r"jaccl .*macOS 26\.2"):
        MlxEngine(tiny_models["nemotron_h-8bit"], mode="pipeline", n=2, backend="jaccl")
    with pytest.raises(EngineError, match="neither a folder nor in the local Hugging Face cache"):
        MlxEngine("nobody/no-such-model")
    with pytest.raises(EngineError, match="ring backend needs IP addresses; give them for mac2"):
        eng = MlxEngine(tiny_models["nemotron_h-8bit"], mode="pipeline", hosts=["mac1=10.0.0.1", "mac2"])
        list(eng.stream(MSGS, max_tokens=1))


def test_an_endpoint_with_nothing_behind_it_is_a_clear_error():
    from arthur_cluster.hostfile import free_ports

    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    eng = MlxEngine("some/model", mode="tensor", endpoint=url)  # nothing is loaded here: the ranks hold it
    assert eng.model is None
    with pytest.raises(EngineError, match=rf"nothing answers at {url}/v1/chat/completions .*not running"):
        list(eng.stream(MSGS, max_tokens=1))
