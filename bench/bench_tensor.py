"""Is a split faster than one process? Prefill and decode tokens per second of one process pinned to one core
against 2 ranks pinned to one core each, on a randomized NemotronH miniature large enough that compute dominates.

    python bench/bench_tensor.py [--tokens 512] [--decode 32] [--step 256] [--repeat 2] [--json]

Four runs in one invocation, the same model, prompt and greedy decode:
- single: one process on core 0;
- tensor: 2 ranks over ring on loopback (the tensor split as it is: each routed expert cut along its width,
  no host sync in the MoE layer, one all_sum per layer);
- tensor-owned: the same but with the MoE split by owning whole experts (each rank gathers the picks of its
  own experts, which needs the picks on the host: one sync per MoE layer), the alternative measured here;
- pipeline: 2 ranks, each holding half the layers (for memory: each rank holds half the weights; a single
  request runs the stages one after the other).
Rank r runs on core r; the single process on core 0. Best of --repeat for each figure. Ratios are against the
single process of the same run; this machine is shared, so only same-run ratios mean anything.
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

OVERRIDES = {"hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128,
             "mamba_num_heads": 32, "mamba_head_dim": 64, "n_groups": 4, "ssm_state_size": 64,
             "moe_intermediate_size": 1024, "moe_shared_expert_intermediate_size": 2048, "n_routed_experts": 16,
             "num_experts_per_tok": 4, "intermediate_size": 2048, "vocab_size": 2048}


# --- inside one process (single or one rank) --------------------------------------------------------------


def _owned_experts(model, group) -> None:
    """Replace each tensor-split MoE layer with the whole-expert split (rank r owns experts [r*E/n, (r+1)*E/n))."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    class OwnedMoE(nn.Module):
        def __init__(self, gate, switch_mlp, shared):
            super().__init__()
            n, r = group.size(), group.rank()
            total = switch_mlp.fc1.num_experts
            self.per, self.first = total // n, r * (total // n)
            self.gate, self.shared_experts = gate, shared
            lo, hi = self.first, self.first + self.per
            for fc in (switch_mlp.fc1, switch_mlp.fc2):
                fc.update({k: mx.contiguous(v[lo:hi]) for k, v in fc.parameters().items()
                           if v.ndim >= 1 and v.shape[0] == total})
            self.switch_mlp = switch_mlp

        def __call__(self, x):
            inds, scores = self.gate(x)
            k, flat = inds.shape[-1], x.reshape(-1, x.shape[-1])
            local = inds.reshape(-1) - self.first
            mine = (local >= 0) & (local < self.per)
            pos = mx.array(np.flatnonzero(np.array(mine)).astype(np.int32))  # the host sync
            routed = mx.zeros((flat.shape[0], flat.shape[-1]), dtype=mx.float32)
            if pos.size:
                tokens = pos // k
                out = self.switch_mlp(flat[tokens], local[pos][:, None])[:, 0]
                routed = routed.at[tokens].add(out * scores.reshape(-1)[pos][:, None])
            y = routed + self.shared_experts(flat).astype(mx.float32)
            return mx.distributed.all_sum(y, group=group).astype(x.dtype).reshape(x.shape)

    return OwnedMoE


def _load(model_dir: Path, mode: str, group):
    """This rank's model: the tensor-owned variant splits everything else as the tensor route does."""
    import copy

    import mlx.core as mx
    from mlx_lm.utils import load_model

    from arthur_cluster.parallel import registry

    model, config = load_model(model_dir, lazy=True)
    if mode == "single":
        return model
    if mode == "tensor-owned":
        owned = _owned_experts(model, group)
        whole = {}
        for i, layer in enumerate(model.backbone.layers):
            if layer.block_type == "E":  # the tensor split below cuts copies; the originals are split by expert
                sw = layer.mixer.switch_mlp
                whole[i] = (layer.mixer.gate, sw)
                fresh = copy.copy(sw)
                fresh.fc1, fresh.fc2 = copy.copy(sw.fc1), copy.copy(sw.fc2)
                layer.mixer.switch_mlp = fresh
        model = registry.apply(model, "tensor", group, config)
        for i, (gate, sw) in whole.items():  # the shared expert stays cut by width, as the tensor route cuts it
            model.backbone.layers[i].mixer = owned(gate, sw, model.backbone.layers[i].mixer.shared_experts)
        return model
    return registry.apply(model, mode, group, config)


def _timed(model, prompt: list[int], step: int, decode: int) -> tuple[list[int], float, float]:
    """(greedy ids, prefill seconds, decode seconds): the prompt in steps, then `decode` tokens."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    ids = mx.array(prompt)[None]
    t0 = time.perf_counter()
    done = 0
    while len(prompt) - done > 1:
        n = min(step, len(prompt) - done - 1)
        model(ids[:, done:done + n], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
    logits = model(ids[:, done:], cache=cache)[:, -1, :]
    tok = mx.argmax(logits, axis=-1)
    mx.eval(tok)
    t1 = time.perf_counter()
    out = [int(tok.item())]
    for _ in range(decode):
        logits = model(tok.reshape(1, 1), cache=cache)[:, -1, :]
        tok = mx.argmax(logits, axis=-1)
        mx.eval(tok)
        out.append(int(tok.item()))
    return out, t1 - t0, time.perf_counter() - t1


def rank_job(args: argparse.Namespace) -> int:
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True) if args.mode != "single" else None
    rank = group.rank() if group else 0
    os.sched_setaffinity(0, {rank % os.cpu_count()})  # one core per process, as one node per rank
    model = _load(Path(args.model), args.mode, group)
    mx.eval(model.parameters())
    prompt = json.loads(Path(args.prompt).read_text())
    _timed(model, prompt[:64], args.step, 2)  # warm-up
    best_p = best_d = None
    for _ in range(args.repeat):
        if group is not None:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # start together
        ids, p, d = _timed(model, prompt, args.step, args.decode)
        best_p = p if best_p is None else min(best_p, p)
        best_d = d if best_d is None else min(best_d, d)
    if rank == 0:
        Path(args.out, f"{args.mode}.json").write_text(json.dumps(
            {"ids": ids, "prefill_tps": len(prompt) / best_p, "decode_tps": args.decode / best_d}))
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
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--step", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--modes", default="single,tensor,tensor-owned,pipeline,single")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rank-job", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_job:
        return rank_job(args)

    from arthur_cluster import miniature
    from arthur_cluster.hostfile import loopback_ring, rank_env
    from arthur_cluster.parallel.equivalence import default_prompt

    real = json.loads((Path(miniature.__file__).parent / "data" /
                       "nemotron-3-nano-30b-a3b-mlx-8bit.config.json").read_text())
    modes = args.modes.split(",")  # a mode may repeat: "single" first and last shows how the machine drifted
    runs: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="bench-tensor-") as tmp:
        tmp = Path(tmp)
        model = miniature.make(tmp / "model", "nemotron_h", like=real, overrides=OVERRIDES)
        prompt = tmp / "prompt.json"
        prompt.write_text(json.dumps(default_prompt(OVERRIDES["vocab_size"], args.tokens)))
        base = [sys.executable, os.path.abspath(__file__), "--rank-job", "--model", str(model), "--prompt",
                str(prompt), "--out", str(tmp), "--step", str(args.step), "--repeat", str(args.repeat),
                "--decode", str(args.decode)]
        for mode in modes:
            envs = [{}]
            if mode != "single":
                ring = loopback_ring(2)
                envs = [rank_env("ring", r, 2, files=tmp, ring=ring) for r in range(2)]
            _launch(base + ["--mode", mode], envs, 1800)
            runs.append((mode, json.loads((tmp / f"{mode}.json").read_text())))
            print(json.dumps({"mode": mode, **{k: round(v, 2) for k, v in runs[-1][1].items() if k != "ids"}}),
                  file=sys.stderr, flush=True)  # each run as it ends: a long bench on a shared machine may be cut
    singles = [r for m, r in runs if m == "single"]
    result = {"machine": f"{os.cpu_count()} CPU cores (shared), mlx ring on loopback, one core per process",
              "config": OVERRIDES, "prompt_tokens": args.tokens, "decode_tokens": args.decode,
              "runs": [{"mode": m, **{k: round(v, 2) for k, v in r.items() if k != "ids"}} for m, r in runs]}
    if singles:
        base_p = sum(r["prefill_tps"] for r in singles) / len(singles)
        base_d = sum(r["decode_tps"] for r in singles) / len(singles)
        result["ratio_to_single_mean"] = [{"mode": m, "prefill": round(r["prefill_tps"] / base_p, 3),
                                           "decode": round(r["decode_tps"] / base_d, 3)} for m, r in runs]
        result["same_ids_as_single"] = all(r["ids"] == singles[0]["ids"] for _, r in runs)
    print(json.dumps(result, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
