"""The one MLX engine: the rank loop in a thread of this process (one node) and the same loop as resident ranks
(pipeline and tensor over ring on loopback) give the same greedy answers, and the in-process engine streams,
stops and refuses as a caller expects."""

from __future__ import annotations

import json
import threading

import pytest
import requests

from arthur_cluster import bringup, paths
from arthur_cluster.engines.base import Engine, EngineError, collect
from arthur_cluster.engines.mlx import MlxEngine
from arthur_cluster.fallback import Route
from arthur_cluster.parallel import resident
from tests.conftest import copy_model

MSGS = [{"role": "user", "content": "Summarize the document about the cluster, the pipeline and the nodes."}]
TOKENS = 8
LOGPROB_ATOL = 1e-5  # float32 activations: the split sums in another order, nothing more


def _in_process(eng: MlxEngine, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy ids and each token's log-probability from the engine in this process (the rank loop's own events)."""
    from arthur_cluster.parallel.protocol import Done, Request, Token

    got, done = [], threading.Event()

    def sink(ev):
        if isinstance(ev, Token):
            got.append((ev.id, ev.logprob))
        elif isinstance(ev, Done):
            done.set()

    eng.ranks.engine.submit(Request(prompt=prompt, max_tokens=TOKENS, logprobs=True, cache=False), sink)
    assert done.wait(120)
    return [i for i, _ in got], [lp for _, lp in got]


def _over_http(res: resident.Resident, prompt: list[int]) -> tuple[list[int], list[float]]:
    body = {"messages": MSGS, "max_tokens": TOKENS, "temperature": 0, "logprobs": True,
            "chat_template_kwargs": {"enable_thinking": False}}
    out = requests.post(res.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert out["usage"]["prompt_tokens"] == len(prompt)  # the same prompt as the engine here
    return out["arthur"]["ids"], [c["logprob"] for c in out["choices"][0]["logprobs"]["content"]]


def test_one_process_pipeline_and_tensor_ranks_agree_through_the_one_engine(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_STATE_DIR, str(tmp_path / "state"))
    path = tiny_models["nemotron_h-f32"]
    with MlxEngine(path, prefill_step=8) as eng:
        prompt = eng.prompt(MSGS, enable_thinking=False)
        ids, lps = _in_process(eng, prompt)
    assert len(ids) == TOKENS and len(set(ids)) > 1  # a random model: not one token repeated
    for mode in ("pipeline", "tensor"):
        res = bringup.start_resident(path, "tiny", Route(engine="mlx", sharding=mode, backend="ring", nodes=2),
                                     prefill_step=8, timeout=120)
        try:
            got, got_lps = _over_http(res, prompt)
        finally:
            resident.stop(res)
        assert got == ids, mode
        worst = max(abs(a - b) for a, b in zip(lps, got_lps))
        assert worst < LOGPROB_ATOL, (mode, worst)


def test_the_engine_in_this_process_streams_text_stats_and_progress(tiny_models):
    from mlx_lm.utils import load_tokenizer

    path = tiny_models["nemotron_h-f32"]
    with MlxEngine(path, prefill_step=8) as eng:
        assert isinstance(eng, Engine) and eng.model is not None and eng.tokenizer is not None
        events = list(eng.stream(MSGS, max_tokens=12, enable_thinking=False))
        thinking, plain = eng.prompt(MSGS, True), eng.prompt(MSGS, False)
        ids = list(eng.last_done["ids"])
        # a restore point where the caller's shared part ends (the prompt is shorter than one cache block):
        # kept by the first run that names it, used by the next
        point = len(plain) - 5
        kept = collect(eng.stream_ids(plain, max_tokens=12, point=point))
        again = collect(eng.stream_ids(plain, max_tokens=12, point=point))
        # the same ids under another template flag: another key, so the kept prefix is not used
        other = collect(eng.stream_ids(plain, max_tokens=12, point=point, enable_thinking=True))
    res = collect(iter(events))
    prefill = [e for e in events if e.kind == "prefill"]
    assert prefill and prefill[-1].done == prefill[-1].total == res.stats.prompt_tokens == len(plain)
    assert [e.done for e in prefill] == sorted(e.done for e in prefill)
    assert res.stats.generation_tokens == 12 and res.stats.peak_memory_bytes > 0 and res.stats.generation_tps > 0
    assert thinking != plain  # the template honours enable_thinking
    tok = load_tokenizer(path)
    assert res.text == tok.decode(ids) and res.text.strip()  # the text the ids make, not empty
    assert kept.text == again.text == res.text
    assert kept.stats.cached_tokens == 0 and again.stats.cached_tokens == point
    assert again.stats.cache_source == "memory"
    assert other.stats.cached_tokens == 0 and other.stats.cache_source == "new"


def test_closing_the_stream_stops_the_request_and_the_engine_answers_the_next(tiny_models, tmp_path):
    # No end token the model can produce: the request stops only because closing the stream cancels it.
    folder = copy_model(tiny_models["nemotron_h-8bit"], tmp_path / "model")
    for name, key in (("config.json", "eos_token_id"), ("tokenizer_config.json", "eos_token"),
                      ("special_tokens_map.json", "eos_token")):
        data = json.loads((folder / name).read_text())
        data.pop(key)
        (folder / name).write_text(json.dumps(data))
    with MlxEngine(folder, prefill_step=8) as eng:
        stream = eng.stream(MSGS, max_tokens=1_000_000)
        for ev in stream:
            if ev.kind == "token":
                break
        stream.close()  # what a consumer's Ctrl-C or break does to the generator
        res = collect(eng.stream(MSGS, max_tokens=3))  # waits behind the cancelled one: answered only if it stopped
        assert res.stats.generation_tokens == 3
        assert eng.ranks.engine.status().info["requests"] == 2
        ranks = eng.ranks
    assert ranks.closed and ranks.rank is None  # close() ended the rank loop and freed the weights


def test_refusals_are_clear(tiny_models, tmp_path):
    with pytest.raises(EngineError, match="neither a folder nor in the local Hugging Face cache"):
        MlxEngine("nobody/no-such-model")
    broken = copy_model(tiny_models["nemotron_h-8bit"], tmp_path / "broken")
    for f in broken.glob("*.safetensors"):
        f.unlink()
        f.write_bytes(b"not a safetensors file")
    with pytest.raises(EngineError, match=r"could not load .*broken"):
        MlxEngine(broken)
    with MlxEngine(tiny_models["nemotron_h-8bit"]) as eng:
        pass
    with pytest.raises(EngineError, match="closed"):
        list(eng.stream(MSGS, max_tokens=1))


def test_an_endpoint_with_nothing_behind_it_is_a_clear_error():
    from arthur_cluster.hostfile import free_ports

    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    eng = MlxEngine("some/model", endpoint=url)  # nothing is loaded here: the ranks hold it
    assert eng.model is None
    with pytest.raises(EngineError, match=rf"nothing answers at {url}/v1/chat/completions .*not running"):
        list(eng.stream(MSGS, max_tokens=1))
