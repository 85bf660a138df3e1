"""Tensor-parallel MoE work per rank: one process against n ring ranks on loopback, on a randomized NemotronH
miniature made MoE-heavy (32 experts, 6 per token, as the real model's 128 and 6 in spirit).

    python bench/bench_moe_tensor.py [--tokens 1024] [--step 256] [--ranks 2] [--repeat 3] [--pin] [--json]

Three runs: one process; n ranks with each rank running only its own picks (the tensor split as it is); n ranks
with every rank running all top-k picks of every token (the split as it was, kept here as the baseline). Each
process prefills the same prompt and then decodes a few tokens greedily. Counted in every process: the
(token, expert) picks its experts computed during the prefill, and the seconds spent in the MoE layers and in
the expert matmuls alone (each timed between evaluations, best of --repeat). The ratios compare each rank with the
single process, measured in the same run. The outputs must agree: the same greedy ids and last-step logits within
float32 rounding. Unpinned, the ranks of a 2-core machine share its cores while the single process has both;
--pin gives every process one core (the single process and rank 0 the same one), as each rank would have its own
node.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DECODE = 8
OVERRIDES = {"hidden_size": 256, "moe_intermediate_size": 512, "moe_shared_expert_intermediate_size": 512,
             "n_routed_experts": 32, "num_experts_per_tok": 6}


# --- inside one process (single or one rank) --------------------------------------------------------------


def _wrap(model):
    """Time every MoE layer and its experts; count the picks the experts compute."""
    import mlx.core as mx
    import mlx.nn as nn

    stats = {"picks": 0, "moe_s": 0.0, "experts_s": 0.0}

    class Experts(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, x, indices):
            mx.eval(x, indices)
            t0 = time.perf_counter()
            y = self.inner(x, indices)
            mx.eval(y)
            stats["experts_s"] += time.perf_counter() - t0
            stats["picks"] += int(indices.size)
            return y

    class Layer(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, x):
            mx.eval(x)
            t0 = time.perf_counter()
            y = self.inner(x)
            mx.eval(y)
            stats["moe_s"] += time.perf_counter() - t0
            return y

    for layer in model.backbone.layers:
        if layer.block_type == "E":
            layer.mixer.switch_mlp = Experts(layer.mixer.switch_mlp)
            layer.mixer = Layer(layer.mixer)
    return stats


def _every_pick_on_every_rank(model) -> None:
    """The baseline: the tensor MoE as it was, every rank running all top-k picks of every token (picks it
    does not own sent to its local expert 0 with weight zero)."""
    import mlx.core as mx

    from arthur_cluster.parallel.nemotron_h import ShardedMoE

    class EveryPick(ShardedMoE):
        def __call__(self, x):
            inds, scores = self.gate(x)
            local = inds - self.first
            mine = (local >= 0) & (local < self.per_rank)
            y = self.switch_mlp(x, mx.where(mine, local, 0))
            y = (y * mx.where(mine, scores, 0)[..., None]).sum(axis=-2).astype(y.dtype)
            y = y + self.shared_experts(x)
            return mx.distributed.all_sum(y, group=self.group)

    for layer in model.backbone.layers:
        if layer.block_type == "E":
            layer.mixer.__class__ = EveryPick


def _run(model, prompt: list[int], step: int):
    """Prefill in steps, then greedy decode; (ids, last-step logits)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    ids = mx.array(prompt)[None]
    done = 0
    while len(prompt) - done > 1:
        n = min(step, len(prompt) - done - 1)
        model(ids[:, done:done + n], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
    logits = model(ids[:, done:], cache=cache)[:, -1, :]
    out = []
    for _ in range(DECODE):
        tok = mx.argmax(logits, axis=-1)
        mx.eval(tok, logits)
        out.append(int(tok.item()))
        last = logits
        logits = model(tok.reshape(1, 1), cache=cache)[:, -1, :]
    return out, last


def rank_job(args: argparse.Namespace) -> int:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_model

    from arthur_cluster.parallel import registry

    group = mx.distributed.init(backend="ring", strict=True) if args.mode != "single" else None
    rank = group.rank() if group else 0
    if args.pin:  # one core per process, as one node per rank: the single process and rank 0 get the same core
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    model, config = load_model(Path(args.model), lazy=True)
    if group is not None:
        model = registry.apply(model, "tensor", group, config)
    if args.mode == "every-pick":
        _every_pick_on_every_rank(model)
    mx.eval(model.parameters())
    prompt = json.loads(Path(args.prompt).read_text())
    stats = _wrap(model)
    _run(model, prompt[:64], args.step)  # warm-up
    best = None
    for _ in range(args.repeat):
        for k in stats:
            stats[k] = type(stats[k])(0)
        if group is not None:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # start together
        t0 = time.perf_counter()
        ids, last = _run(model, prompt, args.step)
        run = {**stats, "total_s": time.perf_counter() - t0}
        best = run if best is None or run["moe_s"] < best["moe_s"] else best
    # Picks counted over prefill and decode; the prefill's share is what tensor parallel should halve.
    out = Path(args.out)
    (out / f"{args.mode}-{rank}.json").write_text(json.dumps({"rank": rank, "ids": ids, **best}))
    if rank == 0:
        np.save(out / f"{args.mode}-logits.npy", np.array(last.astype(mx.float32)))
    return 0


# --- the launcher -------------------------------------------------------------------------------------------


def _launch(cmd: list[str], envs: list[dict[str, str]], timeout: float) -> None:
    procs = [subprocess.Popen(cmd, env={**os.environ, **e}) for e in envs]
    try:
        for p in procs:
            if p.wait(timeout=timeout) != 0:
                raise SystemExit(f"a rank exited with code {p.returncode}: {' '.join(cmd)}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--step", type=int, default=256)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--pin", action="store_true", help="each process on one core (rank r on core r)")
    ap.add_argument("--rank-job", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_job:
        return rank_job(args)

    import numpy as np

    from arthur_cluster import miniature
    from arthur_cluster.hostfile import loopback_ring, rank_env
    from arthur_cluster.parallel.equivalence import default_prompt

    real = json.loads((Path(miniature.__file__).parent / "data" /
                       "nemotron-3-nano-30b-a3b-mlx-8bit.config.json").read_text())
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        tmp = Path(tmp)
        model = miniature.make(tmp / "model", "nemotron_h", like=real, overrides=OVERRIDES)
        prompt = tmp / "prompt.json"
        prompt.write_text(json.dumps(default_prompt(512, args.tokens)))
        base = [sys.executable, os.path.abspath(__file__), "--rank-job", "--model", str(model), "--prompt",
                str(prompt), "--out", str(tmp), "--step", str(args.step), "--repeat", str(args.repeat),
                *(["--pin"] if args.pin else [])]
        _launch(base + ["--mode", "single"], [{}], 900)
        for mode in ("every-pick", "tensor"):
            ring = loopback_ring(args.ranks)
            _launch(base + ["--mode", mode],
                    [rank_env("ring", r, args.ranks, files=tmp, ring=ring) for r in range(args.ranks)], 900)
        single = json.loads((tmp / "single-0.json").read_text())
        ranks = [json.loads((tmp / f"tensor-{r}.json").read_text()) for r in range(args.ranks)]
        old = [json.loads((tmp / f"every-pick-{r}.json").read_text()) for r in range(args.ranks)]
        a, b = np.load(tmp / "single-logits.npy"), np.load(tmp / "tensor-logits.npy")
        c = np.load(tmp / "every-pick-logits.npy")
    config = miniature.tiny_config("nemotron_h", like=real, overrides=OVERRIDES)
    moe_layers = config["hybrid_override_pattern"].count("E")
    result = {
        "machine": f"{os.cpu_count()} CPU cores, mlx ring on loopback" + (", one core per process" if args.pin else ""),
        "prompt_tokens": args.tokens, "decode_tokens": DECODE, "moe_layers": moe_layers,
        "experts": config["n_routed_experts"], "top_k": config["num_experts_per_tok"], "ranks": args.ranks,
        "single": {k: single[k] for k in ("picks", "moe_s", "experts_s", "total_s")},
        "per_rank": [{k: r[k] for k in ("rank", "picks", "moe_s", "experts_s", "total_s")} for r in ranks],
        "every_pick_per_rank": [{k: r[k] for k in ("rank", "picks", "moe_s", "experts_s", "total_s")} for r in old],
        "picks_ratio": [round(r["picks"] / single["picks"], 3) for r in ranks],
        "experts_time_ratio": [round(r["experts_s"] / single["experts_s"], 3) for r in ranks],
        "moe_time_ratio": [round(r["moe_s"] / single["moe_s"], 3) for r in ranks],
        "experts_time_ratio_vs_every_pick": [round(r["experts_s"] / o["experts_s"], 3) for r, o in zip(ranks, old)],
        "moe_time_ratio_vs_every_pick": [round(r["moe_s"] / o["moe_s"], 3) for r, o in zip(ranks, old)],
        "same_ids": single["ids"] == ranks[0]["ids"] == old[0]["ids"],
        "max_abs_logit_diff": float(np.max(np.abs(a - b))),
        "every_pick_max_abs_logit_diff": float(np.max(np.abs(a - c))),
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0 if result["same_ids"] else 1


if __name__ == "__main__":
    sys.exit(main())
