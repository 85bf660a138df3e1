"""NemotronH split over real ring ranks on loopback: greedy ids identical to one process, logits within tolerance.

Miniatures have every parameter random (router, correction bias, A_log, dt_bias, D, norms, conv bias), 4 Mamba
groups (2 per rank at 2 ranks; the real model has 8) and 16 experts, top 4, picked on every rank; here also 4 KV
heads (the real model has 2) so that 4-way tensor splits exist. 4-bit uses quantization group 32 so each rank's
slice of a row-split layer holds whole groups. Prompts of 40 tokens with a prefill step of 16 (chunks cross
stages), 32 decode steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from arthur_cluster import miniature, modelfiles
from arthur_cluster.parallel import equivalence, registry
from arthur_cluster.parallel.ranks import RankFailed
from tests.conftest import NEMOTRON_CONFIG, real_config

STEPS, CHUNK = 32, 16
FOUR_WAY = {"num_key_value_heads": 4}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nemotron-par")
    like = real_config(NEMOTRON_CONFIG)
    return {
        "f32": miniature.make(root / "f32", "nemotron_h", like=like, overrides=FOUR_WAY),
        "4bit": miniature.make(root / "q4", "nemotron_h", like=like, overrides=FOUR_WAY,
                               quant={"group_size": 32, "bits": 4, "mode": "affine"}),
    }


# Each mode runs over 2 and 4 ranks, each in float32 and 4-bit (four launches instead of eight).
@pytest.mark.parametrize("kind,mode,n", [("f32", "pipeline", 2), ("4bit", "pipeline", 4),
                                         ("f32", "tensor", 2), ("4bit", "tensor", 4)])
def test_split_matches_single_process(models, kind, mode, n):
    r = equivalence.check(models[kind], mode, n, max_tokens=STEPS, prefill_step=CHUNK)
    assert r.error is None and r.unsupported is None, r
    assert r.ok
    assert len(r.single_ids) == STEPS and r.dist_ids == r.single_ids
    assert len(set(r.single_ids)) > 5  # the ids vary, so equality means something
    if mode == "pipeline":  # same operations in the same order: exact
        assert r.max_abs_logit_diff == 0.0
    else:  # summation order only: float32 rounding
        assert r.max_abs_logit_diff <= 1e-5 == equivalence.TOLERANCE["quantized" if kind == "4bit" else "float"]
    assert len(r.weight_bytes) == n
    whole = modelfiles.inspect(models[kind]).weight_bytes  # what one process holds
    assert max(r.weight_bytes) < whole  # every rank holds a part only
    if mode == "pipeline":  # each layer on one rank; embeddings and head may sit on every stage
        assert sum(r.weight_bytes) >= whole
    else:  # a share of every layer, plus the replicated norms, router and embeddings on each rank
        assert sum(r.weight_bytes) > whole


def test_miniature_parameters_are_random_and_experts_run_on_every_rank(models):
    """What makes the checks above able to fail: a parameter taken from the wrong rank changes the answer only
    if ranks hold different values, and an expert-ownership bug shows only if every rank's experts are picked."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, _ = load(str(models["f32"]))
    for name, v in tree_flatten(model.parameters()):
        if v.size > 1:
            assert float(mx.max(v) - mx.min(v)) > 0.05, f"{name} is constant"
    prompt = mx.array(equivalence.default_prompt(512))[None]
    h = model.backbone.embeddings(prompt)
    for layer in model.backbone.layers:
        if layer.block_type == "E":
            inds, _ = layer.mixer.gate(layer.norm(h))
            per_quarter = [int(mx.sum((inds // 4) == q)) for q in range(4)]  # 16 experts, 4 ranks
            assert min(per_quarter) > 0.1 * inds.size, per_quarter
        h = layer(h, mask=None, cache=None)


def test_stages_without_attention_or_cached_layers(models):
    # "MEMEM*EM" over 3 ranks as 6|1|1: rank 2 holds only a Mamba layer (no attention mask), rank 1 only
    # an MoE layer (no cache at all: the hand-over is tied into its link cache).
    pattern = json.loads((models["f32"] / "config.json").read_text())["hybrid_override_pattern"]
    assert pattern[0] == "M" and pattern[1] == "E"
    r = equivalence.check(models["f32"], "pipeline", 3, split=[len(pattern) - 2, 1, 1],
                          max_tokens=STEPS, prefill_step=CHUNK)
    assert r.ok, r
    assert r.max_abs_logit_diff == 0.0


def test_tensor_refused_when_heads_do_not_divide(tiny_models):
    real = real_config(NEMOTRON_CONFIG)
    why = registry.tensor_blockers(real, 4)
    assert "num_key_value_heads=2 is not divisible by 4" in why
    assert registry.tensor_blockers(real, 2) == []
    r = equivalence.check(tiny_models["nemotron_h-8bit"], "tensor", 4)
    assert not r.ok and "num_key_value_heads=2" in r.unsupported and r.seconds < 5


def test_tensor_refusal_inside_the_ranks(tiny_models, tmp_path):
    # The ranks themselves refuse too (a launch that skipped the static check).
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"prompt_tokens": [10, 11, 12]}))
    with pytest.raises(RankFailed, match=r"ShardingError: cannot split nemotron_h 4 ways: .*num_key_value_heads=2"):
        equivalence.run_local(tiny_models["nemotron_h-8bit"], "tensor", 4, backend="ring", request=req,
                              max_tokens=2, prefill_step=16, logits=tmp_path / "x.npy", timeout=120)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
                state = (d / "stat").read_text().split()[2]
            except OSError:
                continue
            if text in cmd and state != "Z":
                found.append(int(d.name))
    return found


def test_rank_killed_mid_run_ends_the_job(models, tmp_path):
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"prompt_tokens": equivalence.default_prompt(512)}))
    with pytest.raises(RankFailed, match=r"rank 1 exited with code 137.*all ranks were stopped"):
        equivalence.run_local(models["f32"], "tensor", 2, backend="ring", request=req, max_tokens=STEPS,
                              prefill_step=CHUNK, logits=tmp_path / "x.npy", timeout=120,
                              extra=["--die-after", "5", "--die-rank", "1"])
    assert _processes_mentioning(str(models["f32"])) == []


def test_pipeline_split_by_memory():
    real = real_config(NEMOTRON_CONFIG)
    even = registry.pipeline_split(real, 2)
    assert [r.start for r in even][::-1][0] == 0 and even[0].stop == 52  # rank 1 first layers, rank 0 last
    assert all(len(r) for r in even)
    costs = registry.layer_costs(real)
    w = [sum(costs[i] for i in r) for r in even]
    assert abs(w[0] - w[1]) / sum(w) < 0.1
    skew = registry.pipeline_split(real, 2, memory_per_node=[3, 1])  # rank 0 has 3x the memory
    w = [sum(costs[i] for i in r) for r in skew]
    assert 0.65 < w[0] / sum(w) < 0.85
    assert all(len(r) for r in registry.pipeline_split(real, 52))
    with pytest.raises(registry.ShardingError, match="needs at least 53 layers"):
        registry.pipeline_split(real, 53)


def test_registry_static_half_imports_no_mlx():
    import subprocess
    import sys

    code = ("import sys, json; from arthur_cluster.parallel import registry as r; "
            "print(json.dumps([r.supported('nemotron_h'), r.supported('llama'), "
            "'mlx_lm' in sys.modules, 'mlx.core' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ}).stdout
    nem, llama, has_lm, has_mx = json.loads(out)
    assert nem == {"pipeline": True, "tensor": True} and llama == {"pipeline": True, "tensor": True}
    assert not has_lm and not has_mx


def test_imports_run_one_way():
    """registry -> model files -> split: the model files and split never import the registry (no circle)."""
    import ast

    from arthur_cluster import parallel

    folder = Path(parallel.__file__).parent

    def imports(name: str) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
        return found

    for model_file in ("nemotron_h", "llama", "stage"):
        assert "registry" not in imports(model_file), model_file
    assert imports("split") == set()
    assert {"nemotron_h", "llama"} <= imports("registry")
