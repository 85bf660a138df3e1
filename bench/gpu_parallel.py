"""One GPU vs 2-rank pipeline vs 2-rank tensor for a Nemotron-3-Nano-30B-A3B-shaped model (random weights, 8-bit).

    python bench/gpu_parallel.py                          # real shape; nccl and ring on 2 GPUs
    python bench/gpu_parallel.py --prompts 2048 --tiny    # miniature shape: a smoke run on any machine (CPU too)

Each rank builds the model from the real config with random weights, lazily, in memory (nothing is saved),
quantizes it to 8-bit (group 64), keeps only its share (pipeline stage or tensor slice), then evaluates.
Reported per configuration and prompt length: prefill and decode tok/s, peak memory and weight bytes per rank,
and whether the greedy ids of the first --decode tokens equal the one-GPU ids.

With a single GPU (or none), nccl is skipped (NCCL cannot put two ranks on one device) and the 2-rank runs
share the one device over ring; the output says so. Timings of shared-device runs say nothing about speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "arthur_cluster" / "data" / "nemotron-3-nano-30b-a3b-mlx-8bit.config.json"


# --- one rank --------------------------------------------------------------------------------------------


def build(config: dict, seed: int = 0):
    """The model with random bf16 weights, quantized to 8-bit, all lazy (nothing evaluated yet)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    keep = getattr(model, "cast_predicate", lambda _: True)
    model.update(tree_unflatten([(k, v.astype(mx.bfloat16)) for k, v in tree_flatten(model.parameters())
                                 if keep(k) and mx.issubdtype(v.dtype, mx.floating)]))
    q = config.get("quantization") or {"group_size": 64, "bits": 8, "mode": "affine"}
    nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                class_predicate=lambda _p, m: hasattr(m, "to_quantized")
                and m.weight.shape[-1] % q["group_size"] == 0)
    return model


def rank_main(args) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from arthur_cluster.parallel import registry
    from arthur_cluster.parallel.worker import gather_ints, generate, weight_bytes

    config = json.loads(Path(args.config).read_text())
    group = mx.distributed.init(backend=args.backend, strict=True) if args.mode != "single" else None
    rank = group.rank() if group else 0
    t0 = time.perf_counter()
    model = build(config)
    if group is not None:
        model = registry.apply(model, args.mode, group, config)
    for _, v in tree_flatten(model.parameters()):  # one tensor at a time keeps the transient peak low
        mx.eval(v)
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    load_s = time.perf_counter() - t0
    vocab = int(config["vocab_size"])
    # Warm-up: the first calls compile kernels (tens of seconds on CUDA); keep that out of the figures.
    for _ in generate(model, list(range(8, 8 + min(args.prefill_step + 8, 600))), max_tokens=3,
                      prefill_step=args.prefill_step):
        pass
    out = []
    for length in [int(x) for x in args.prompts.split(",")]:
        prompt = (mx.random.randint(8, vocab, (length,), key=mx.random.key(length))).tolist()
        mx.clear_cache()
        mx.reset_peak_memory()
        ids, tic, t_first = [], time.perf_counter(), None
        for tid, logits in generate(model, prompt, max_tokens=args.decode, prefill_step=args.prefill_step,
                                    keep_logits=bool(args.logits_dir)):
            if t_first is None:
                t_first = time.perf_counter()
                if args.logits_dir and rank == 0:  # the first token's logits, to compare beyond greedy ids
                    mx.save(str(Path(args.logits_dir) / f"{args.mode}-{length}.npy"), logits)
            ids.append(tid)
        end = time.perf_counter()
        peaks = gather_ints([int(mx.get_peak_memory()), weight_bytes(model)], group)
        out.append({"prompt": length, "prefill_tps": length / (t_first - tic),
                    "decode_tps": (len(ids) - 1) / (end - t_first) if len(ids) > 1 else 0.0,
                    "ids": ids, "peak_bytes": [p[0] for p in peaks], "weight_bytes": [p[1] for p in peaks]})
    if rank == 0:
        print(json.dumps({"event": "done", "load_s": load_s, "runs": out}), flush=True)


# --- the driver ------------------------------------------------------------------------------------------


def gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def launch(mode: str, n: int, backend: str, args, config_path: Path, tmp: Path, share_gpu: bool) -> dict:
    from arthur_cluster.hostfile import free_ports, loopback_ring, rank_env
    from arthur_cluster.parallel.ranks import RankProcesses

    cmd = [sys.executable, str(Path(__file__).resolve()), "--rank", "--mode", mode, "--backend", backend,
           "--config", str(config_path), "--prompts", args.prompts, "--decode", str(args.decode),
           "--prefill-step", str(args.prefill_step)] + (["--logits-dir", args.logits_dir] if args.logits_dir else [])
    if mode == "single":
        envs = [{"CUDA_VISIBLE_DEVICES": "0"} if args.gpus else {}]
    else:
        ring = loopback_ring(n) if backend == "ring" else None
        port = free_ports(1)[0] if backend == "nccl" else None
        envs = [rank_env(backend, r, n, files=tmp, ring=ring, nccl_port=port) for r in range(n)]
        for e in envs:
            if share_gpu or not args.gpus:
                e.pop("CUDA_VISIBLE_DEVICES", None)
                if args.gpus:
                    e["CUDA_VISIBLE_DEVICES"] = "0"
            elif backend == "ring":
                e["CUDA_VISIBLE_DEVICES"] = e["MLX_RANK"]
    procs = RankProcesses([cmd] * len(envs), envs, cwd=ROOT)
    for ev in procs.events(timeout=args.timeout):
        if ev.get("event") == "done":
            return ev
    raise RuntimeError("rank 0 gave no result")


def compare_logits(folder: Path) -> list[dict]:
    """Each sharded configuration's first-token logits against the one-device ones: greedy ids can part on
    near-ties (random weights give a flat distribution), so the size of the difference is the evidence."""
    import mlx.core as mx

    rows = []
    for single in sorted(folder.glob("single-*.npy")):
        base = mx.load(str(single)).astype(mx.float32)
        top2 = mx.sort(base)[-2:]
        for other in sorted(folder.glob(f"*-{single.stem.split('-', 1)[1]}.npy")):
            if other == single:
                continue
            x = mx.load(str(other)).astype(mx.float32)
            diff = mx.abs(x - base)
            top10 = set(mx.argsort(-base)[:10].tolist()) & set(mx.argsort(-x)[:10].tolist())
            rows.append({"compare": f"{other.stem} vs {single.stem}", "max_abs_diff": mx.max(diff).item(),
                         "mean_abs_diff": mx.mean(diff).item(), "logit_std": mx.std(base).item(),
                         "top1_margin": (top2[1] - top2[0]).item(), "top1_equal": mx.argmax(x).item()
                         == mx.argmax(base).item(), "top10_overlap": len(top10)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="single")
    p.add_argument("--backend", default="ring")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--prompts", default="2048,32768")
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--backends", default="nccl,ring")
    p.add_argument("--modes", default="single,pipeline,tensor")
    p.add_argument("--tiny", action="store_true", help="miniature shape of the same architecture (smoke run)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json-out", help="write all results here")
    p.add_argument("--logits-dir", help="save each configuration's first-token logits here and compare them")
    args = p.parse_args()
    if args.rank:
        rank_main(args)
        return 0

    args.gpus = gpu_count()
    tmp = Path(tempfile.mkdtemp(prefix="bench-par-"))
    config_path = Path(args.config)
    if args.tiny:
        from arthur_cluster import miniature

        real = json.loads(CONFIG.read_text())
        tiny = miniature.tiny_config("nemotron_h", like=real)
        tiny["quantization"] = miniature.quantization_like(real)
        config_path = tmp / "tiny.json"
        config_path.write_text(json.dumps(tiny))
    share = args.gpus < 2
    backends = [b for b in args.backends.split(",") if b]
    if share and "nccl" in backends:
        print(f"# {args.gpus} GPU(s): nccl skipped (NCCL needs one device per rank); "
              "2-rank runs share one device over ring, so their timings show no speed-up", flush=True)
        backends = [b for b in backends if b != "nccl"] or ["ring"]
    print(f"# machine: {args.gpus} GPU(s), config {config_path.name}, prompts {args.prompts}, "
          f"decode {args.decode}, prefill step {args.prefill_step}", flush=True)
    results = []
    modes = args.modes.split(",")
    plan = [("single", 1, "-")] if "single" in modes else []
    plan += [(m, 2, b) for b in backends for m in ("pipeline", "tensor") if m in modes]
    for mode, n, backend in plan:
        t = time.perf_counter()
        try:
            ev = launch(mode, n, backend if n > 1 else "ring", args, config_path, tmp, share)
        except Exception as e:  # one failed configuration does not stop the others
            print(json.dumps({"mode": mode, "backend": backend, "error": str(e)}), flush=True)
            results.append({"mode": mode, "n": n, "backend": backend, "error": str(e)})
            continue
        for run in ev["runs"]:
            row = {"mode": mode, "n": n, "backend": backend, "shared_device": share and n > 1,
                   "load_s": round(ev["load_s"], 1), "wall_s": round(time.perf_counter() - t, 1), **run}
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ids"}), flush=True)
        if args.json_out:  # after every configuration: a run stopped by a time limit keeps what it measured
            Path(args.json_out).write_text(json.dumps(results, indent=1))
    base = {r["prompt"]: r for r in results if r.get("mode") == "single" and "ids" in r}
    print("\n| config | backend | prompt | prefill tok/s | decode tok/s | peak GB per rank | weights GB per rank "
          "| leading ids = 1 GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['mode']} x{r['n']} | {r['backend']} | - | error: {r['error'][:80]} | | | | |")
            continue
        ref = base.get(r["prompt"], {}).get("ids") or []
        same = next((i for i, (a, b) in enumerate(zip(ref, r["ids"])) if a != b), min(len(ref), len(r["ids"])))
        gb = lambda xs: " / ".join(f"{x / 1e9:.1f}" for x in xs)  # noqa: E731
        print(f"| {r['mode']} x{r['n']}{' (shared device)' if r['shared_device'] else ''} | {r['backend']} | "
              f"{r['prompt']} | {r['prefill_tps']:.1f} | {r['decode_tps']:.1f} | {gb(r['peak_bytes'])} | "
              f"{gb(r['weight_bytes'])} | {same} of {len(r['ids'])} |")
    if args.logits_dir:
        for row in compare_logits(Path(args.logits_dir)):
            print(json.dumps(row), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
