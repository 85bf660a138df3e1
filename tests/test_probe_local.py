"""Local proof on this machine's MLX: miniature smoke and distributed equivalence over real ring ranks."""

from __future__ import annotations

import json


from arthur_cluster import miniature, probe
from tests.conftest import NEMOTRON_CONFIG


def proof(report: probe.ProbeReport, check: str) -> list[probe.Finding]:
    return [f for f in report.findings if f.check == check]


def test_llama_miniature_and_tensor_equivalence_on_2_ranks(tiny_models):
    r = probe.run(tiny_models["llama-4bit"], nodes=2, use_cache=False)
    assert r.proved
    smoke = proof(r, "proof.miniature")
    assert smoke and smoke[0].severity == "info" and "finite=True" in smoke[0].what
    eq = {f.what.split(" on ")[0]: f for f in proof(r, "proof.equivalence")}
    assert eq["tensor"].severity == "info" and "greedy ids equal the single process" in eq["tensor"].what
    assert r.find("mlx/tensor/ring/2").proven and r.find("mlx/tensor/ring/2").verdict == "ok"
    assert not r.find("mlx/tensor/jaccl/2").proven  # proven over ring only
    jaccl = proof(r, "proof.jaccl")[0]
    assert "unavailable" in jaccl.what and "is_available('jaccl') is False" in jaccl.what
    assert "Cannot initialize jaccl" in jaccl.what  # MLX's own answer, not an assumption


def test_nemotron_miniature_with_every_block_type(tiny_models):
    r = probe.run(tiny_models["nemotron_h-8bit"], nodes=2, use_cache=False, prove_ranks=(2,))
    smoke = proof(r, "proof.miniature")[0]
    assert smoke.severity == "info" and "quantized 8-bit" in smoke.what
    pattern = smoke.what.split("pattern ")[1].split(")")[0]
    assert set(pattern) == {"M", "E", "*"}
    for mode in ("pipeline", "tensor"):
        assert r.find(f"mlx/{mode}/ring/2").proven, [f.what for f in proof(r, "proof.equivalence")]


def test_unsupported_architecture_gets_honest_verdicts(tmp_path):
    """gpt2: mlx-lm runs it, but neither mlx-lm nor this project can split it, and no miniature exists."""
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_ctx": 256, "n_embd": 64, "n_head": 2,
           "n_layer": 2, "n_positions": 256, "layer_norm_epsilon": 1e-5, "vocab_size": 512}
    model = miniature.build_model(cfg)
    folder = miniature.save_folder(tmp_path / "org" / "tiny-gpt2", model, cfg)
    r = probe.run(folder, nodes=2, use_cache=False)
    for mode in ("pipeline", "tensor"):
        route = r.find(f"mlx/{mode}/ring/2")
        assert route.verdict == "blocked" and not route.proven
        assert any(f.check == "sharding" and f"no {mode} split for gpt2" in f.what for f in route.findings)
    assert r.find("mlx/single/local/1").verdict == "ok"
    assert any(f.check == "proof.miniature" and "no miniature for gpt2" in f.what for f in r.findings)


def test_miniature_keeps_the_real_pattern_kinds():
    real = json.loads(NEMOTRON_CONFIG.read_text())
    cfg = miniature.tiny_config("nemotron_h", like=real)
    assert set(cfg["hybrid_override_pattern"]) == set(real["hybrid_override_pattern"])
