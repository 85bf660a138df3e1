"""The ranks' prefix cache in one process: every answer equals a from-scratch run, whichever restore point the
cache rewinds to, and a restore point survives the requests that reuse it (its Mamba state is copied back)."""

from __future__ import annotations

import pytest

from arthur_cluster.parallel import server
from arthur_cluster.parallel.worker import generate, load

BLOCK, WINDOW, STEP, N = 8, 96, 32, 5


@pytest.fixture(scope="module")
def model(tiny_models):
    return load(tiny_models["nemotron_h-f32"])[0]


def _ids(start: int, n: int) -> list[int]:
    return [(start + 7 * i) % 400 + 20 for i in range(n)]


def test_each_answer_equals_a_scratch_run_from_whichever_point_it_resumes(model):
    pc = server.PrefixCache(model, block=BLOCK, window=WINDOW)
    doc = _ids(0, 290)
    a = doc + _ids(1000, 40)  # a long tail: restore points lie past what `b` shares with it
    b = doc + _ids(2000, 12)
    d = doc + _ids(4000, 6)  # resumes from the point `b` resumed from: its saved state must be intact
    c = doc[:150] + _ids(3000, 8)  # leaves the document before any restore point of `d`
    cached = []
    answers = {}
    for name, prompt in (("a", a), ("b", b), ("d", d), ("c", c), ("b", b)):
        info = server.run_request(model, pc, prompt, server.Params(max_tokens=N), step=STEP, eos=set(),
                                  emit=lambda ev: None)
        scratch = [t for t, _ in generate(model, prompt, max_tokens=N, prefill_step=STEP)]
        assert info["ids"] == scratch, (name, len(cached))
        assert info["prefilled_tokens"] == len(prompt) - info["cached_tokens"]
        answers[name] = scratch
        cached.append(info["cached_tokens"])
    assert len(set(map(tuple, answers.values()))) >= 3  # the prompts give different answers
    # a: nothing cached; b: the last point inside the shared document; d: the same point (kept, not aliased
    # by b's cache); c: diverges before the first point of the last prompt, so from empty; b: c's last point.
    assert cached == [0, 288, 288, 0, 144]


def test_a_prompt_repeated_exactly_still_prefills_its_last_token(model):
    pc = server.PrefixCache(model, block=BLOCK, window=WINDOW)
    p = _ids(5, 64)
    first = server.run_request(model, pc, p, server.Params(max_tokens=N), step=STEP, eos=set(), emit=lambda e: None)
    again = server.run_request(model, pc, p, server.Params(max_tokens=N), step=STEP, eos=set(), emit=lambda e: None)
    assert again["ids"] == first["ids"] and again["cached_tokens"] == 56 and again["prefilled_tokens"] == 8


def test_a_prefix_reused_once_is_saved_and_a_new_process_resumes_from_disk(model, tmp_path):
    doc = _ids(0, 290)
    a, b, d = doc + _ids(1000, 40), doc + _ids(2000, 12), doc + _ids(4000, 6)
    store = server.DiskStore(tmp_path, "model-identity:single:0/1")
    first = server.PrefixCache(model, block=BLOCK, window=WINDOW, disk=store)
    for prompt in (a, b):
        server.run_request(model, first, prompt, server.Params(max_tokens=N), step=STEP, eos=set(),
                           emit=lambda e: None)
        first.flush()
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # only the point b resumed from: the document
    fresh = server.PrefixCache(model, block=BLOCK, window=WINDOW, disk=store)  # as after `down` and `up`
    info = server.run_request(model, fresh, d, server.Params(max_tokens=N), step=STEP, eos=set(), emit=lambda e: None)
    assert info["cached_tokens"] == 288
    assert {c.offset for c in fresh.cache if c.is_trimmable()} == {len(d) + N - 1}  # KV holds exactly the tokens
    assert info["ids"] == [t for t, _ in generate(model, d, max_tokens=N, prefill_step=STEP)]
    other = server.PrefixCache(model, block=BLOCK, window=WINDOW, disk=server.DiskStore(tmp_path, "other-weights"))
    info = server.run_request(model, other, d, server.Params(max_tokens=N), step=STEP, eos=set(), emit=lambda e: None)
    assert info["cached_tokens"] == 0  # another model's (or split's, or rank's) files are never used
