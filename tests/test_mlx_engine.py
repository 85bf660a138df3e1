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
from tests.test_parallel_nemotron_h import bf16_models  # noqa: F401 - a fixture

MSGS = [{"role": "user", "content": "Summarize the document about the cluster, the pipeline and the nodes."}]
TOKENS = 8
LOGPROB_ATOL = 1e-5  # float32 activations: the split sums in another order, nothing more


TOP = 20  # log-probabilities compared per step: the 20 most likely tokens (the most OpenAI's API gives)


def _in_process(eng: MlxEngine, prompt: list[int]) -> tuple[list[int], list[dict[int, float]]]:
    """Greedy ids and, per step, the top tokens' log-probabilities, from the engine in this process (the rank
    loop's own events)."""
    from arthur_cluster.parallel.protocol import Done, Request, Token

    got, done = [], threading.Event()

    def sink(ev):
        if isinstance(ev, Token):
            got.append(ev)
        elif isinstance(ev, Done):
            done.set()

    eng.ranks.engine.submit(Request(prompt=prompt, max_tokens=TOKENS, logprobs=True, top_logprobs=TOP,
                                    cache=False), sink)
    assert done.wait(120)
    return [t.id for t in got], [dict(t.top) for t in got]


def _over_http(res: resident.Resident, prompt: list[int], tok) -> tuple[list[int], list[dict[int, float]]]:
    body = {"messages": MSGS, "max_tokens": TOKENS, "temperature": 0, "logprobs": True, "top_logprobs": TOP,
            "chat_template_kwargs": {"enable_thinking": False}}
    out = requests.post(res.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert out["usage"]["prompt_tokens"] == len(prompt)  # the same prompt as the engine here
    ids = out["arthur"]["ids"]
    steps = out["choices"][0]["logprobs"]["content"]
    return ids, [_unique({t["token"]: t["logprob"] for t in step["top_logprobs"]}.items(),
                         [t["token"] for t in step["top_logprobs"]]) for step in steps]


def _unique(pairs, texts: list[str]) -> dict[str, float]:
    """Tokens named by their text, leaving out texts that several tokens share (the API names tokens by text)."""
    return {k: v for k, v in pairs if texts.count(k) == 1}


def _gap(a: list[dict], b: list[dict], upto: int) -> float:
    """The largest log-probability difference of a token both runs rank among their top ones, steps 0..upto."""
    return max(abs(x[k] - y[k]) for x, y in zip(a[:upto + 1], b[:upto + 1]) for k in x.keys() & y.keys())


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a) - 1)


def _bf16_tolerance(models: dict) -> tuple[float, float]:
    """(D, the tolerance) on log-probabilities, for a split of the bf16 model against one process of it.

    D is one process's own bf16 rounding: the largest log-probability difference between the bf16 model and its
    float32 twin (the same weights), over their top tokens at the steps that still follow the same ids, both
    through this engine. A split rounds to bf16 at the same places plus once per partial sum before its all_sum
    (the MoE's shares meet in float32); if each run stays within D of the float32 result, they are within 2 D of
    each other (triangle inequality): the tolerance is 2 D. Two runs can then pick different tokens only where
    the reference's top-2 margin is within twice the tolerance (each of the two moved by at most the tolerance)."""
    runs = {}
    for kind in ("bf16", "f32"):
        with MlxEngine(models[kind], prefill_step=8) as eng:
            runs[kind] = _in_process(eng, eng.prompt(MSGS, enable_thinking=False))
    (a, ta), (b, tb) = runs["bf16"], runs["f32"]
    d = _gap(ta, tb, _first_difference(a, b))
    return d, 2 * d


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_one_process_pipeline_and_tensor_ranks_agree_through_the_one_engine(tiny_models, bf16_models, dtype,
                                                                           tmp_path, monkeypatch):
    from mlx_lm.utils import load_tokenizer

    monkeypatch.setenv(paths.ENV_STATE_DIR, str(tmp_path / "state"))
    path = tiny_models["nemotron_h-f32"] if dtype == "float32" else bf16_models["bf16"]
    tol = LOGPROB_ATOL
    if dtype == "bf16":
        d, tol = _bf16_tolerance(bf16_models)
        assert 1e-4 < d < 1.0, d  # bf16 rounding is visible, and the two runs still answer alike
    with MlxEngine(path, prefill_step=8) as eng:
        prompt = eng.prompt(MSGS, enable_thinking=False)
        ids, tops = _in_process(eng, prompt)
    assert len(ids) == TOKENS and len(set(ids)) > 1  # a random model: not one token repeated
    tok = load_tokenizer(path)
    # the API names tokens by their text: compare by text, tokens whose text is unique among the top ones
    named = [_unique(((tok.decode([k]), v) for k, v in t.items()), [tok.decode([k]) for k in t]) for t in tops]
    for mode in ("pipeline", "tensor"):
        res = bringup.start_resident(path, "tiny", Route(engine="mlx", sharding=mode, backend="ring", nodes=2),
                                     prefill_step=8, timeout=120)
        try:
            got, got_tops = _over_http(res, prompt, tok)
        finally:
            resident.stop(res)
        if dtype == "float32" or mode == "pipeline":  # pipeline: the same operations in the same order
            assert got == ids, mode
            worst = _gap(named, got_tops, len(ids) - 1)
            assert worst < tol if dtype == "float32" else worst == 0.0, (mode, worst)
            continue
        # bf16 tensor: compared while both runs have fed the same ids; another pick only at a near tie
        first = _first_difference(ids, got)
        worst = _gap(named, got_tops, first)
        assert worst <= tol, (worst, tol)
        if ids[first] != got[first]:
            margin = sorted(tops[first].values())[-1] - sorted(tops[first].values())[-2]
            assert margin <= 2 * tol, (first, margin, tol)


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


def test_a_prefix_asked_twice_is_written_to_disk_once_the_engine_is_idle_not_before_the_next_question(
        tiny_models):
    from arthur_cluster.parallel import prefix

    path = tiny_models["nemotron_h-f32"]
    with MlxEngine(path, prefill_step=8, options=["--save-after", "600"]) as eng:
        prompt = eng.prompt(MSGS, enable_thinking=False)
        point = len(prompt) - 6
        store = prefix.node_store(path, "single")
        saved = lambda: store.longest(prompt, 128, 2048, prefix.thinking_flags(None), point)  # noqa: E731
        first = collect(eng.stream_ids(prompt, max_tokens=4, point=point))
        again = collect(eng.stream_ids(prompt, max_tokens=4, point=point))  # resumes: its point is kept for disk
        third = collect(eng.stream_ids(prompt, max_tokens=4, point=point))  # did not wait for a disk write
        assert again.stats.cached_tokens == third.stats.cached_tokens == point and first.text == third.text
        assert saved() == 0  # not yet: the engine has not been idle long enough
    assert saved() == point  # written when the engine stopped
    with MlxEngine(path, prefill_step=8) as eng:  # a new engine resumes from this node's disk
        res = collect(eng.stream_ids(prompt, max_tokens=4, point=point))
    assert res.stats.cache_source == "disk" and res.stats.cached_tokens == point and res.text == first.text


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
