"""Memory plans against the real Nemotron-3-Nano / Llama-3.2-1B shapes, the catalogue, and MLX's own peak."""

from __future__ import annotations

import json

import pytest

from arthur_cluster import catalog, memory, miniature, modelfiles
from tests import realshape
from tests.conftest import LLAMA_CONFIG, NEMOTRON_CONFIG, NEMOTRON_ID

GIB = 1 << 30


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    return modelfiles.inspect(realshape.build(tmp_path_factory.mktemp("rs") / "nemotron", NEMOTRON_CONFIG))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return modelfiles.inspect(realshape.build(tmp_path_factory.mktemp("rs") / "llama", LLAMA_CONFIG))


def test_weights_from_config_equal_the_headers(nemotron, llama):
    for info in (nemotron, llama):
        d = memory.dims(info.config)
        headers = memory.weights_from_headers(info.path, info.shards, len(d.pattern))
        assert headers.total == info.data_bytes
        assert memory.weights_from_config(d).total == headers.total  # computed layer by layer, byte-exact


def test_nemotron_caches_match_the_catalogue_figures(nemotron):
    entry = catalog.load().entry(NEMOTRON_ID)
    d = memory.dims(nemotron.config)
    assert d.attention_layers == 6 and d.mamba_layers == 23
    # KV per token over all attention layers, bf16: 6 x 2 x 2 heads x 128 x 2 bytes.
    assert 6 * memory.kv_layer_bytes(d, memory.KV_STEP) // memory.KV_STEP == entry.kv_bytes_per_token
    assert 23 * memory.mamba_layer_bytes(d) == entry.state_bytes
    plan = memory.plan(nemotron, context=1000)
    assert plan.nodes[0].kv_cache == 6 * 2 * 2 * 128 * 1024 * 2  # 1000 tokens allocate 4 steps of 256
    assert plan.nodes[0].mamba_state == entry.state_bytes  # constant in the context


def test_pipeline_stages_follow_mlx_lm(nemotron):
    stages = memory.even_stages(52, 3)
    assert [(s.start, s.stop) for s in stages] == [(34, 52), (17, 34), (0, 17)]  # rank 0: the last 18 layers
    plan = memory.plan(nemotron, context=8192, nodes=3, split="pipeline")
    wm = memory.weights_from_headers(nemotron.path, nemotron.shards, 52)
    # Every stage keeps embeddings, final norm and head (mlx-lm's sharded_load does).
    assert sum(n.weights for n in plan.nodes) == wm.total + 2 * wm.other
    assert sum(n.kv_cache for n in plan.nodes) == memory.plan(nemotron, context=8192).nodes[0].kv_cache
    assert plan.fits is None and "node memory unknown" in plan.notes[-1]


def test_tensor_split_and_fit_verdicts(nemotron):
    nodes = [memory.NodeMemory(name="a", memory_bytes=64 * GIB), memory.NodeMemory(name="b", memory_bytes=24 * GIB)]
    plan = memory.plan(nemotron, context=32768, nodes=nodes, split="tensor")
    single = memory.plan(nemotron, context=32768)
    assert plan.nodes[0].weights < single.nodes[0].weights / 2 + 1 * GIB
    assert plan.nodes[0].kv_cache == single.nodes[0].kv_cache // 2
    assert [n.fits for n in plan.nodes] == [True, False] and plan.fits is False
    assert plan.nodes[1].headroom == int(24 * GIB * 0.75) - plan.nodes[1].total
    fused = memory.plan(nemotron, context=32768, attention="fused")
    assert fused.nodes[0].activation < single.nodes[0].activation / 10  # the score matrix dominates otherwise


def test_plan_from_the_catalogue_alone():
    cat = catalog.load()
    e = cat.entry(NEMOTRON_ID)
    plan = memory.plan(e, context=262144, nodes=[memory.NodeMemory(name=f"m{i}", memory_bytes=64 * GIB)
                                                 for i in range(2)], split="pipeline")
    assert plan.source == "catalog"
    assert plan.nodes[0].weights == -(-e.storage_bytes // 2)
    assert plan.nodes[0].kv_cache == e.kv_bytes_per_token * 262144 // 2
    assert plan.fits is True
    with pytest.raises(memory.PlanError, match="storage_bytes"):
        memory.plan(catalog.ModelEntry(), context=10)
    # With the architecture's config the same entry gets the full per-layer plan.
    full = memory.plan(e, config=json.loads(NEMOTRON_CONFIG.read_text()), context=4096)
    assert full.source == "config" and full.nodes[0].activation > 0


def test_bad_requests_are_plan_errors(llama):
    with pytest.raises(memory.PlanError):
        memory.plan(llama, context=0)
    with pytest.raises(memory.PlanError, match="one node"):
        memory.plan(llama, context=10, nodes=2, split="single")
    with pytest.raises(memory.PlanError, match="stages"):
        memory.plan(llama, context=10, nodes=2, split="pipeline", stages=[range(0, 16)])


@pytest.mark.parametrize("arch,context,step", [("llama", 2048, 512), ("nemotron_h", 4096, 2048)])
def test_plan_tracks_mlx_peak_memory(tmp_path, arch, context, step):
    """Real prefill through mlx-lm on CPU: the planned total against MLX's measured peak."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    over = {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32} \
        if arch == "llama" else {}
    like = json.loads(NEMOTRON_CONFIG.read_text()) if arch == "nemotron_h" else None
    folder = miniature.make(tmp_path / arch, arch, like=like, overrides=over)
    model, _ = load(str(folder))
    mx.eval(model.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    prompt = mx.array([(i * 7) % 500 + 5 for i in range(context)])
    for _ in zip(generate_step(prompt, model, max_tokens=1, prefill_step_size=step), range(1)):
        pass
    peak = mx.get_peak_memory()
    plan = memory.plan(modelfiles.inspect(folder), context=context, prefill_step=step)
    assert plan.nodes[0].weights == pytest.approx(mx.get_active_memory(), rel=0.5)  # sanity: same model
    assert 0.85 <= peak / plan.nodes[0].total <= 1.15, (peak, plan.nodes[0])
