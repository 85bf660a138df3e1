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


# --- bf16 activations, as the real 8-bit model runs ----------------------------------------------------------

BF16_STEPS = 16
EIGHT_BIT = {"group_size": 32, "bits": 8, "mode": "affine"}


def _float32_twin(folder: Path, out: Path) -> Path:
    """The same quantized weights with every floating tensor (scales, norms, embeddings' scales) in float32:
    the one-process run of this folder is the bf16 folder's run without bf16 rounding."""
    import shutil

    import mlx.core as mx

    shutil.copytree(folder, out)
    for f in out.glob("*.safetensors"):
        weights = mx.load(str(f))
        mx.save_safetensors(str(f), {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
                                     for k, v in weights.items()}, metadata={"format": "mlx"})
    return out


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nemotron-bf16")
    bf16 = miniature.make(root / "bf16", "nemotron_h", like=real_config(NEMOTRON_CONFIG), overrides=FOUR_WAY,
                          quant=EIGHT_BIT, dtype="bfloat16", seed=5)
    return {"bf16": bf16, "f32": _float32_twin(bf16, root / "f32")}


def _single_logits(model: Path, prompt: list[int], tmp: Path) -> tuple[list[int], object]:
    import numpy as np

    req = tmp / f"{model.name}.json"
    req.write_text(json.dumps({"prompt_tokens": prompt}))
    out = tmp / f"{model.name}.npy"
    done = equivalence.run_local(model, "single", 1, backend="ring", request=req, max_tokens=BF16_STEPS,
                                 prefill_step=CHUNK, logits=out, timeout=300)
    return done["ids"], np.load(out)


def bf16_tolerance(bf16_models, tmp: Path) -> tuple[float, float]:
    """(D, the tolerance) for a split of the bf16 model against one process of it.

    Derivation: D is one process's own bf16 rounding, the largest |logit| difference between the bf16 run and
    the float32 run of the same weights, over the steps whose inputs are still the same ids. A split runs the same
    weights and rounds to bf16 at the same places, plus once per partial sum before its all_sum (the Mamba and
    attention output projections; the MoE's shares meet in float32). If each run stays within D of the float32
    result, they are within 2 D of each other (triangle inequality): the tolerance is 2 D. On this miniature
    (random weights, peaked attention) D is large, about 0.37 on logits up to 2.5, and one process's bf16 and
    float32 runs already pick different ids from step 1 (a top-2 margin of 0.03): greedy ids of bf16 runs can be
    compared only while the reference's margin exceeds the tolerance.
    """
    import numpy as np

    prompt = equivalence.default_prompt(512)
    ids16, a = _single_logits(bf16_models["bf16"], prompt, tmp)
    ids32, b = _single_logits(bf16_models["f32"], prompt, tmp)
    same = next((i for i, (x, y) in enumerate(zip(ids16, ids32)) if x != y), len(ids16) - 1)
    d = float(np.max(np.abs(a[:same + 1] - b[:same + 1])))
    return d, 2 * d


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_bf16_split_matches_single_process_within_its_own_bf16_rounding(bf16_models, tmp_path, mode):
    import numpy as np

    d, tol = bf16_tolerance(bf16_models, tmp_path)
    assert 1e-3 < d < 1.0, d  # bf16 rounding is visible, and the two runs still answer alike
    prompt = equivalence.default_prompt(512)
    ids, ref = _single_logits(bf16_models["bf16"], prompt, tmp_path)
    req = tmp_path / "split.json"
    req.write_text(json.dumps({"prompt_tokens": prompt}))
    done = equivalence.run_local(bf16_models["bf16"], mode, 2, backend="ring", request=req, max_tokens=BF16_STEPS,
                                 prefill_step=CHUNK, logits=tmp_path / "split.npy", timeout=300)
    got = np.load(tmp_path / "split.npy")
    if mode == "pipeline":  # the same operations in the same order, bf16 or not
        assert done["ids"] == ids and float(np.max(np.abs(got - ref))) == 0.0
        return
    # Logits compared while both runs have fed the same ids; a different pick is allowed only at a near tie
    # (the reference's top-2 margin within the tolerance), after which the inputs differ.
    first = next((i for i, (x, y) in enumerate(zip(ids, done["ids"])) if x != y), len(ids) - 1)
    diff = float(np.max(np.abs(got[:first + 1] - ref[:first + 1])))
    assert diff <= tol, (diff, d)
    if ids[first] != done["ids"][first]:
        top = np.sort(ref[first])
        assert top[-1] - top[-2] <= tol, (first, top[-1] - top[-2], tol)


class _StandInGroup:
    """Stand-in for an mlx group of n ranks seen from rank r: only the arithmetic of one rank's share runs,
    no collective (the real ranks are covered above)."""

    def __init__(self, r: int, n: int):
        self.r, self.n = r, n

    def rank(self) -> int:
        return self.r

    def size(self) -> int:
        return self.n


def test_moe_routed_sum_is_accumulated_in_float32(bf16_models):
    """mlx-lm sums a token's weighted expert outputs in float32 (the router's scores are float32) and casts once;
    a split that sums them in bf16 rounds after every pick. With the whole width on one rank the routed sum must
    be the one-process float32 sum bit for bit; split two ways, the shares are float32 and add up to it within
    float32 rounding of the bf16 expert outputs' partial products."""
    import copy

    import mlx.core as mx
    from mlx_lm import load

    from arthur_cluster.parallel.nemotron_h import WidthMoE

    model, _ = load(str(bf16_models["bf16"]))
    layer = next(x for x in model.backbone.layers if x.block_type == "E")
    x = layer.norm(model.backbone.embeddings(mx.array(equivalence.default_prompt(512, length=96))[None]))
    assert x.dtype == mx.bfloat16
    moe = layer.mixer
    inds, scores = moe.gate(x)
    reference = (moe.switch_mlp(x, inds) * scores[..., None]).sum(axis=-2)  # mlx-lm's own arithmetic
    assert reference.dtype == mx.float32
    whole = WidthMoE(copy.deepcopy(moe), _StandInGroup(0, 1)).routed(x)
    assert whole.dtype == mx.float32 and mx.array_equal(whole, reference).item()
    shares = [WidthMoE(copy.deepcopy(moe), _StandInGroup(r, 2)) for r in range(2)]
    assert [s.width for s in shares] == [64, 64]
    parts = [s.routed(x) for s in shares]
    assert all(p.dtype == mx.float32 for p in parts)
    scale = float(mx.max(mx.abs(reference)))
    assert float(mx.max(mx.abs(parts[0] + parts[1] - reference))) < 0.02 * scale  # bf16 partial products
