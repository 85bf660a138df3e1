"""The document prefix cache gives the same greedy tokens and logits as prefilling everything, in one process
and from the disk cache in another; the Mamba snapshot is what makes it right."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import mlx.core as mx
import pytest
from mlx_lm import load, stream_generate
from mlx_lm.models.cache import make_prompt_cache

from arthur_cluster import promptcache as pc

DOC = "\n\n".join(f"Section {i}: the cluster runs the model across several machines; node {i} holds "
                  f"part {i} of the weights." for i in range(12))
QUESTIONS = ["What is two plus two?", "Summarize the document in one line."]
STEPS = 6


@pytest.fixture(scope="module", params=["nemotron_h-8bit", "llama-4bit"])
def loaded(request, tiny_models):
    folder = tiny_models[request.param]
    model, tok = load(str(folder))
    return folder, model, tok


def prompt(tok, question: str) -> tuple[list[int], list[int]]:
    prefix = tok.encode(f"<|im_start|>user\nDocument:\n\n{DOC}\n\n", add_special_tokens=False)
    suffix = tok.encode(f"Question: {question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    return prefix, suffix


def steps(model, tok, tokens, **kw) -> tuple[list[int], list]:
    ids, logprobs = [], []
    for r in stream_generate(model, tok, tokens, max_tokens=STEPS, **kw):
        ids.append(r.token)
        logprobs.append(r.logprobs)
    return ids, logprobs


def same(a, b) -> bool:
    # 1e-5 absolute on every log-probability (rtol=0: allclose's default rtol would add 1e-5 x |logprob|)
    return a[0] == b[0] and all(mx.allclose(x, y, rtol=0.0, atol=1e-5).item() for x, y in zip(a[1], b[1]))


def test_cached_prefix_matches_a_full_prefill(loaded, tmp_path):
    folder, model, tok = loaded
    refs = []
    for q in QUESTIONS:
        prefix, suffix = prompt(tok, q)
        # Same step boundaries as the cached path: the prefix in one step, then the suffix.
        refs.append(steps(model, tok, prefix + suffix, prefill_step_size=len(prefix)))
    doc = pc.obtain(model, pc.model_identity(folder), prefix, folder=tmp_path)
    assert doc.source == "prefill" and doc.nbytes > 0
    got = [steps(model, tok, prompt(tok, q)[1], prompt_cache=doc.ready()) for q in QUESTIONS]
    again = steps(model, tok, prompt(tok, QUESTIONS[0])[1], prompt_cache=doc.ready())
    assert same(got[0], refs[0]) and same(got[1], refs[1]) and same(again, refs[0])
    assert doc.uses == 3


def test_without_the_mamba_snapshot_the_answer_changes(tiny_models):
    """The check above can fail: rewinding only the KV caches leaves the Mamba state after question 1."""
    folder = tiny_models["nemotron_h-8bit"]
    model, tok = load(str(folder))
    prefix, suffix = prompt(tok, QUESTIONS[0])
    ref = steps(model, tok, prefix + suffix, prefill_step_size=len(prefix))
    cache = make_prompt_cache(model)
    pc.prefill(model, prefix, cache)
    steps(model, tok, suffix, prompt_cache=cache)
    for c in cache:
        if c.is_trimmable():
            c.trim(c.offset - len(prefix))
    assert not same(steps(model, tok, suffix, prompt_cache=cache), ref)
    assert not all(c.is_trimmable() for c in cache)  # why: ArraysCache (Mamba) cannot be trimmed


SECOND_PROCESS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from arthur_cluster import promptcache as pc
    folder, cache_dir, prefix, suffix = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
    model, tok = load(folder)
    doc = pc.obtain(model, pc.model_identity(folder), prefix, folder=cache_dir)
    out = [(r.token, r.logprobs.tolist()) for r in stream_generate(model, tok, suffix, max_tokens=%d,
                                                                     prompt_cache=doc.ready())]
    print(json.dumps({"source": doc.source, "ids": [t for t, _ in out], "logprobs": [l for _, l in out]}))
""" % STEPS)


def test_disk_cache_is_used_by_a_second_process(loaded, tmp_path):
    folder, model, tok = loaded
    prefix, suffix = prompt(tok, QUESTIONS[1])
    ref = steps(model, tok, prefix + suffix, prefill_step_size=len(prefix))
    first = pc.obtain(model, pc.model_identity(folder), prefix, folder=tmp_path)
    assert first.source == "prefill" and len(list(tmp_path.glob("*.safetensors"))) == 1
    proc = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(folder), str(tmp_path), json.dumps(prefix),
                           json.dumps(suffix)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["source"] == "disk"
    assert same((out["ids"], [mx.array(x) for x in out["logprobs"]]), ref)


def test_a_damaged_or_foreign_cache_file_is_recomputed(loaded, tmp_path):
    folder, model, tok = loaded
    prefix, _ = prompt(tok, QUESTIONS[0])
    ident = pc.model_identity(folder)
    path = pc.cache_file(pc.prefix_key(ident, prefix), tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not safetensors")
    assert pc.obtain(model, ident, prefix, folder=tmp_path).source == "prefill"
    assert pc.obtain(model, ident, prefix, folder=tmp_path).source == "disk"  # rewritten, atomically
    assert not list(tmp_path.glob(".*tmp*"))
    assert pc.prefix_key("another model", prefix) != pc.prefix_key(ident, prefix)
