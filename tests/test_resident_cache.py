"""The ranks' prefix cache in one process: every answer equals a from-scratch run, whichever restore point and
whichever kept document the cache rewinds to, a restore point survives the requests that reuse it (its Mamba state
is copied back), documents beyond the memory budget go least recently used first, and the disk refuses shards of
another split, other weights or other template flags."""

from __future__ import annotations

import pytest

import os
import shutil

from arthur_cluster.parallel import prefix, server
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
    # by b's cache); c: diverges before the first point of the last prompt, so a new entry from empty; b: the
    # document's entry is still kept, so its point again (not c's last point, 144).
    assert cached == [0, 288, 288, 0, 288]
    assert len(pc.entries) == 2


def test_a_prompt_repeated_exactly_still_prefills_its_last_token(model):
    pc = server.PrefixCache(model, block=BLOCK, window=WINDOW)
    p = _ids(5, 64)
    first = server.run_request(model, pc, p, server.Params(max_tokens=N), step=STEP, eos=set(), emit=lambda e: None)
    again = server.run_request(model, pc, p, server.Params(max_tokens=N), step=STEP, eos=set(), emit=lambda e: None)
    assert again["ids"] == first["ids"] and again["cached_tokens"] == 56 and again["prefilled_tokens"] == 8


def test_a_prefix_reused_once_is_saved_and_a_new_process_resumes_from_disk(model, tmp_path):
    doc = _ids(0, 290)
    a, b, d = doc + _ids(1000, 40), doc + _ids(2000, 12), doc + _ids(4000, 6)
    store = prefix.DiskStore(tmp_path, "model-identity:single:0/1")
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
    other = server.PrefixCache(model, block=BLOCK, window=WINDOW, disk=prefix.DiskStore(tmp_path, "other-weights"))
    info = server.run_request(model, other, d, server.Params(max_tokens=N), step=STEP, eos=set(), emit=lambda e: None)
    assert info["cached_tokens"] == 0  # another model's (or split's, or rank's) files are never used


def _answer(model, pc, prompt):
    info = server.run_request(model, pc, prompt, server.Params(max_tokens=N), step=STEP, eos=set(),
                              emit=lambda e: None)
    pc.flush()
    return info


def test_three_documents_interleaved_each_cached_answer_equals_a_scratch_run(model):
    docs = [_ids(100 * k, 200) for k in range(3)]
    questions = [[doc + _ids(5000 + 37 * q, 7 + q) for q in range(2)] for doc in docs]
    pc = prefix.PrefixCache(model, block=BLOCK, window=WINDOW)
    order = [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (1, 1)]
    answers = {}
    for d, q in order:
        prompt = questions[d][q]
        info = _answer(model, pc, prompt)
        scratch = [t for t, _ in generate(model, prompt, max_tokens=N, prefill_step=STEP)]
        assert info["ids"] == scratch, (d, q)
        answers[(d, q)] = scratch
        # first questions start empty; every second question resumes inside its own document
        assert info["cached_tokens"] == (0 if q == 0 else 200), (d, q, info["cached_tokens"])
    assert len(set(map(tuple, answers.values()))) >= 4  # different prompts, different answers
    assert len(pc.entries) == 3


def test_documents_beyond_the_budget_go_least_recently_used_first(model):
    docs = [_ids(100 * k, 200) for k in range(3)]
    probe = prefix.PrefixCache(model, block=BLOCK, window=WINDOW)
    _answer(model, probe, docs[0] + _ids(7000, 6))
    one = probe.current.nbytes
    pc = prefix.PrefixCache(model, block=BLOCK, window=WINDOW, budget=int(2.5 * one))  # room for two
    for d in (0, 1, 0, 2):  # 1 is now the least recently used
        _answer(model, pc, docs[d] + _ids(7000 + d, 6))
    assert [e.tokens[:200] for e in pc.entries] == [docs[0], docs[2]]
    # 1 again: from empty, and 0 (now least recently used) goes; 2 is kept; 0 from empty, 1 goes
    for d, cached in ((1, 0), (2, 200), (0, 0)):
        prompt = docs[d] + _ids(8000 + d, 5)
        info = _answer(model, pc, prompt)
        assert info["cached_tokens"] == cached, d
        assert info["ids"] == [t for t, _ in generate(model, prompt, max_tokens=N, prefill_step=STEP)]
    assert [e.tokens[:200] for e in pc.entries] == [docs[2], docs[0]]


class _Flagged(prefix.PrefixCache):
    """The cache as a request with these template flags uses it (run_request passes none of its own)."""

    def __init__(self, *args, flags: str, **kw):
        super().__init__(*args, **kw)
        self.flags = flags

    def begin(self, prompt, flags="", extra=0):
        return super().begin(prompt, self.flags, extra)


def _saved_then_resumed(model, folder, identity: str, resume_identity: str, flags=("", "")) -> int:
    doc = _ids(0, 290)
    store = prefix.DiskStore(folder, identity)
    first = _Flagged(model, block=BLOCK, window=WINDOW, disk=store, flags=flags[0])
    for tail in (1000, 2000):
        _answer(model, first, doc + _ids(tail, 12))
    fresh = _Flagged(model, block=BLOCK, window=WINDOW, disk=prefix.DiskStore(folder, resume_identity),
                     flags=flags[1])
    prompt = doc + _ids(4000, 6)
    info = _answer(model, fresh, prompt)
    assert info["ids"] == [t for t, _ in generate(model, prompt, max_tokens=N, prefill_step=STEP)]
    return info["cached_tokens"]


def test_the_disk_refuses_another_split_other_weights_and_other_template_flags(model, tiny_models, tmp_path):
    weights = tmp_path / "model"
    shutil.copytree(tiny_models["nemotron_h-f32"], weights)
    files = prefix.files_identity(weights)
    a = prefix.rank_identity(files, "pipeline", 0, 2, range(4, 8))
    assert _saved_then_resumed(model, tmp_path / "same", a, a) == 288  # the same everything: resumed
    # another split with the same rank count: rank 0 holds other layers
    assert _saved_then_resumed(model, tmp_path / "split", a, prefix.rank_identity(files, "pipeline", 0, 2,
                                                                                 range(3, 8))) == 0
    assert _saved_then_resumed(model, tmp_path / "route", a, prefix.rank_identity(files, "tensor", 0, 2)) == 0
    # other template flags (e.g. thinking on against off)
    on, off = prefix.template_flags({"enable_thinking": True}), prefix.template_flags({"enable_thinking": False})
    assert _saved_then_resumed(model, tmp_path / "flags", a, a, flags=(on, off)) == 0
    assert _saved_then_resumed(model, tmp_path / "flags2", a, a, flags=(on, on)) == 288
    # weights replaced in place: same name, same size, the old mtime put back
    w = next(weights.glob("*.safetensors"))
    st = w.stat()
    replacement = w.with_name("new.tmp")
    shutil.copyfile(w, replacement)
    os.replace(replacement, w)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert w.stat().st_size == st.st_size and w.stat().st_mtime_ns == st.st_mtime_ns
    files2 = prefix.files_identity(weights)
    assert files2 != files
    assert _saved_then_resumed(model, tmp_path / "weights", a, prefix.rank_identity(files2, "pipeline", 0, 2,
                                                                                   range(4, 8))) == 0
    # and rewritten in place (the same inode), the old mtime put back
    data = w.read_bytes()
    with open(w, "r+b") as f:
        f.write(data[:64])
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert prefix.files_identity(weights) != files2
