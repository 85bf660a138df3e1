"""The static probe: real Nemotron-3-Nano / Llama-3.2-1B shapes, remote code, broken folders, no mlx_lm import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arthur_cluster import catalog, probe
from tests import realshape
from tests.conftest import LLAMA_CONFIG, NEMOTRON_CONFIG, NEMOTRON_ID

GIB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("realshape")
    return {"nemotron": realshape.build(root / "lmstudio-community" / NEMOTRON_ID.split("/")[1], NEMOTRON_CONFIG),
            "llama": realshape.build(root / "mlx-community" / "Llama-3.2-1B-Instruct-4bit", LLAMA_CONFIG)}


def linked_copy(src: Path, dst: Path) -> Path:
    """The folder with every file a symlink to the original (sparse shards are never copied), config copied."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "config.json":
            shutil.copyfile(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f)
    return dst


def errors(route: probe.Route) -> list[str]:
    return [f.what for f in route.findings if f.severity == "error"]


def test_nemotron_kv_heads_block_tensor_on_3_and_4_nodes(shapes):
    r = probe.run(shapes["nemotron"], static_only=True, use_cache=False)
    assert r.model == NEMOTRON_ID and r.model_type == "nemotron_h"
    assert r.layer_counts == {"mamba": 23, "moe": 23, "attention": 6}
    assert r.caches == {"kv": 6, "mamba": 23}
    for n in (3, 4):
        for engine in ("exo", "mlx"):
            route = r.find(f"{engine}/tensor/ring/{n}")
            assert route.verdict == "blocked"
            assert any(f"num_key_value_heads=2 is not divisible by {n}" in e for e in errors(route))
        assert any(f.check == "tensor.divisibility" and f"over {n} nodes is impossible" in f.what
                   and "num_key_value_heads=2" in f.what for f in r.findings)
    assert r.find("mlx/tensor/ring/2").verdict == "ok"
    for n in (2, 3, 4):
        pipe = r.find(f"mlx/pipeline/ring/{n}")
        assert pipe.verdict == "ok" and any(f.check == "pipeline" and "layers 0-" in f.what for f in pipe.findings)
    # Without exo nothing is known about exo's acceptance; JACCL cannot be verified from here.
    assert r.find("exo/pipeline/ring/2").verdict == "unknown"
    assert r.find("mlx/pipeline/jaccl/2").verdict == "unknown"
    arch = next(f for f in r.findings if f.check == "architecture")
    assert arch.severity == "info" and "nemotron_h.py" in arch.what
    assert r.memory["single/1"].nodes[0].weights == 33_559_880_448


def test_llama_divisibility(shapes):
    r = probe.run(shapes["llama"], static_only=True, nodes=4, use_cache=False)
    t3 = r.find("mlx/tensor/ring/3")
    assert t3.verdict == "blocked"
    assert any("num_attention_heads=32 is not divisible by 3" in e for e in errors(t3))
    assert any("num_key_value_heads=8 is not divisible by 3" in e for e in errors(t3))
    assert r.find("mlx/tensor/ring/4").verdict == "ok" and r.find("mlx/tensor/ring/2").verdict == "ok"
    assert r.caches == {"kv": 16, "mamba": 0}


def test_memory_blocks_routes_on_a_small_cluster(shapes):
    cluster = catalog.ClusterEntry(nodes=[catalog.NodeEntry(name=f"mini{i}", memory_bytes=24 * GIB) for i in range(2)])
    r = probe.run(shapes["nemotron"], static_only=True, cluster=cluster, context=8192, use_cache=False,
                  route="mlx/single")
    single = r.find("mlx/single/local/1")
    assert single.verdict == "blocked" and single.fits is False
    assert any(f.check == "memory" and "on mini0" in f.what for f in single.findings)
    assert r.find("mlx/pipeline/ring/2").fits is True  # 2 x 24 GiB (18 usable each) hold the stages
    assert r.verdict == "blocked" and probe.exit_code(r) == 3
    assert r.node_counts == [2] and r.attention == "fused"  # a Mac cluster: Metal's fused attention


def test_pipeline_over_nccl_is_blocked_tensor_is_not(shapes, monkeypatch):
    """MLX's NCCL backend has all_sum but no send/recv (measured on two H200s): pipeline stages cannot pass
    activations over it. This Linux CPU build has no NCCL, so the backend list is stood in for (a CUDA build's)."""
    monkeypatch.setattr(probe, "local_backends", lambda: {"ring": True, "jaccl": False, "nccl": True})
    r = probe.run(shapes["nemotron"], static_only=True, use_cache=False)
    pipe, tensor = r.find("mlx/pipeline/nccl/2"), r.find("mlx/tensor/nccl/2")
    assert pipe.verdict == "blocked" and any("send/recv" in e for e in errors(pipe))
    assert tensor.verdict == "unknown" and not errors(tensor)  # only "CUDA nodes only" stays open
    assert r.find("mlx/pipeline/ring/2").verdict == "ok"


def test_route_spec_answers_the_asked_route(shapes):
    r = probe.run(shapes["nemotron"], static_only=True, route="mlx/tensor/ring/4", use_cache=False)
    assert r.route.key == "mlx/tensor/ring/4" and r.verdict == "blocked"
    r = probe.run(shapes["nemotron"], static_only=True, route="mlx/pipeline", use_cache=False)
    assert r.verdict == "ok" and r.route.sharding == "pipeline" and probe.exit_code(r) == 0
    with pytest.raises(probe.ProbeError, match="engine"):
        probe.RouteSpec.parse("vllm/tensor")


def test_static_results_are_cached_by_identity(shapes):
    first = probe.run(shapes["llama"], static_only=True)
    again = probe.run(shapes["llama"], static_only=True)
    assert not first.static_cached and again.static_cached
    assert [f.what for f in again.findings] == [f.what for f in first.findings]
    os.utime(shapes["llama"] / "config.json", ns=(1, 1))  # a changed file is a new identity
    assert not probe.run(shapes["llama"], static_only=True).static_cached


def _with_remote_code(src: Path, dst: Path, model_type: str) -> Path:
    folder = linked_copy(src, dst)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_custom.py").write_text(
        "import math\nimport torch\nfrom mamba_ssm.ops import selective_scan_fn\nfrom .helpers import x\n")
    return folder


def test_remote_code_is_detected_and_refused(shapes, tmp_path):
    folder = _with_remote_code(shapes["llama"], tmp_path / "org" / "custom", "my_custom_arch")
    r = probe.run(folder, static_only=True, use_cache=False)
    rc = [f for f in r.findings if f.check == "remote_code"]
    assert any(f.severity == "error" and "mamba_ssm" in f.what and "arm64" in f.what for f in rc)
    assert any(f.severity == "error" and "--trust-remote-code" in f.fix and "torch" in f.what for f in rc)
    assert any(f.check == "architecture" and f.severity == "error" and "my_custom_arch" in f.what for f in r.findings)
    assert all(route.verdict == "blocked" for route in r.routes)
    trusted = probe.run(folder, static_only=True, use_cache=False, trust_remote_code=True)
    assert any(f.check == "remote_code" and f.severity == "warning" and "trusted" in f.what for f in trusted.findings)
    assert all(route.verdict == "blocked" for route in trusted.routes)  # mamba_ssm still cannot install on a Mac


def test_remote_code_beside_a_native_architecture_is_only_flagged(shapes, tmp_path):
    folder = _with_remote_code(shapes["llama"], tmp_path / "org" / "llama-remote", "llama")
    r = probe.run(folder, static_only=True, use_cache=False)
    rc = [f for f in r.findings if f.check == "remote_code"]
    assert rc and all(f.severity != "error" for f in rc)
    assert any("natively" in f.what for f in rc)
    assert r.find("mlx/single/local/1").verdict == "ok"


def test_missing_modelargs_fields_are_named(shapes, tmp_path):
    folder = linked_copy(shapes["nemotron"], tmp_path / "org" / "nemo")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["ssm_state_size"], cfg["conv_kernel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    r = probe.run(folder, static_only=True, use_cache=False)
    arch = next(f for f in r.findings if f.check == "architecture")
    assert arch.severity == "error" and "ssm_state_size" in arch.what and "conv_kernel" in arch.what
    assert r.find("mlx/single/local/1").verdict == "blocked"


def test_unquantized_experts_warn_about_cpu(tmp_path):
    """A bf16 MoE checkpoint: gather_mm on CPU needs float32."""
    cfg = json.loads(NEMOTRON_CONFIG.read_text())
    cfg.pop("quantization"), cfg.pop("quantization_config")
    cfg["hybrid_override_pattern"], cfg["num_hidden_layers"] = "ME*", 3
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    folder = realshape.build(tmp_path / "org" / "bf16", tmp_path / "c.json")
    r = probe.run(folder, static_only=True, use_cache=False)
    q = [f for f in r.findings if f.check == "quantization"]
    assert any(f.severity == "warning" and "experts" in f.what and "float32" in f.why for f in q)


@pytest.mark.parametrize("damage", ["truncate", "bad-config", "no-config", "lfs-pointer"])
def test_corrupt_models_yield_findings_not_tracebacks(shapes, tmp_path, damage):
    folder = linked_copy(shapes["llama"], tmp_path / "org" / "broken")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    if damage == "truncate":  # a new, shorter file in place of the link: the original stays intact
        with open(shard.resolve(), "rb") as f:
            data = f.read(1 << 20)
        shard.unlink()
        shard.write_bytes(data)
    elif damage == "bad-config":
        (folder / "config.json").write_text("{not json")
    elif damage == "no-config":
        (folder / "config.json").unlink()
    else:
        shard.unlink()
        shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    r = probe.run(folder, static_only=True, use_cache=False)
    assert any(f.check == "files" and f.severity == "error" for f in r.findings)
    assert all(route.verdict == "blocked" for route in r.routes)
    out = subprocess.run([sys.executable, "-m", "arthur_cluster.cli", "probe", str(folder), "--static-only"],
                         capture_output=True, text=True, cwd=ROOT, env=os.environ)
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_static_probe_imports_neither_mlx_lm_nor_transformers(shapes):
    code = ("import sys, json\nfrom arthur_cluster import probe\n"
            f"r = probe.run({str(shapes['nemotron'])!r}, static_only=True, use_cache=False)\n"
            "print(json.dumps({'routes': len(r.routes), 'heavy': sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('mlx_lm', 'transformers'))}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["routes"] > 10 and res["heavy"] == []


def test_cli_json_and_exit_codes(shapes):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "arthur_cluster.cli", "probe", str(shapes["nemotron"]),
                               "--static-only", "--json", *args], capture_output=True, text=True, cwd=ROOT)

    ok = cli("--route", "mlx/pipeline/ring/2")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["verdict"] == "ok" and data["route"]["engine"] == "mlx" and data["memory"]["pipeline/2"]["nodes"]
    blocked = cli("--route", "exo/tensor/ring/4")
    assert blocked.returncode == 3 and json.loads(blocked.stdout)["verdict"] == "blocked"
    unknown = cli("--route", "exo/pipeline/ring/2")  # sound statically, but no exo was asked
    assert unknown.returncode == 4 and json.loads(unknown.stdout)["verdict"] == "unknown"
    bad = cli("--route", "exo/sideways")
    assert bad.returncode == 1 and "sharding" in json.loads(bad.stdout)["error"]
    missing = subprocess.run([sys.executable, "-m", "arthur_cluster.cli", "probe", "nobody/nothing", "--json"],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1 and "arthur-cluster models" in json.loads(missing.stdout)["error"]


def test_model_types_mlx_lm_remaps_use_their_module():
    from arthur_cluster.parallel import registry

    assert registry.module_of("mistral") == "llama"  # mlx-lm loads mistral with its llama module
    assert registry.supported("mistral") == registry.supported("llama") == {"pipeline": True, "tensor": True}


def test_sliding_window_layers_keep_a_kv_cache():
    from arthur_cluster import modelfiles

    cfg = {"layer_types": ["sliding_attention", "full_attention"] * 2, "num_hidden_layers": 4}
    assert modelfiles.layer_pattern(cfg) == "****"
