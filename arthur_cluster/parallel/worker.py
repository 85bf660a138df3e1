"""What each rank runs: load a model (single | pipeline | tensor), run one prompt, report on rank 0.

    python -m arthur_cluster.parallel.worker --model PATH --mode tensor --request req.json --max-tokens 32

Ranks come from `mlx.launch` or from MLX_RANK + MLX_HOSTFILE (ring) set per process. Every rank runs the same
loop in lockstep; only rank 0 prints, one JSON object per line:

    {"event": "loaded", ...}  {"event": "prefill", "done": d, "total": t}  {"event": "token", "id": i, "text": s}
    {"event": "done", "ids": [...], "prompt_tps": ..., "generation_tps": ..., "peak_memory_bytes": [...]}
    {"event": "error", "message": ...}

The request (JSON file or inline JSON) holds either "prompt_tokens" or "messages" (+ "enable_thinking"). Only
rank 0 needs to read it: it shares the token ids with the other ranks over the group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ArthurError

MODES = ("single", "pipeline", "tensor")


class WorkerError(ArthurError, RuntimeError):
    pass


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --- loading -------------------------------------------------------------------------------------------


def model_folder(path: str, repo_id: str | None) -> Path:
    """The folder as given, else the repo id in this machine's Hugging Face cache: a rank on another node
    finds the weights where `arthur-cluster link` put them there, not at the launching machine's path."""
    if Path(path).is_dir() or not repo_id:
        return Path(path)
    from ..engines.base import EngineError
    from ..engines.mlx import resolve_model

    try:
        return resolve_model(repo_id)
    except EngineError as e:
        raise WorkerError(f"{path} is not on this node and {e}") from None


def load(model_path: str | Path, mode: str = "single", group=None, ranges: list[range] | None = None):
    """(model, tokenizer, config) for this rank: lazily loaded, split, then evaluated, so a rank reads only
    the weights it keeps (whole tensors for a tensor split; their unused parts are freed)."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    from . import registry

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise WorkerError(f"{path}: no config.json here; pass an MLX model folder")
    model, config = load_model(path, lazy=True)
    if mode != "single":
        model = registry.apply(model, mode, group, config, ranges)
    if mx.default_device() == mx.cpu and _has_float_experts(model):
        model.set_dtype(mx.float32)  # MLX's CPU gather_mm takes float32 only (unquantized MoE experts)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(path, {"trust_remote_code": False}, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config


def _has_float_experts(model) -> bool:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return any("switch_mlp" in k and k.endswith(".weight") and v.dtype in (mx.bfloat16, mx.float16)
               for k, v in tree_flatten(model.parameters()))


def encode_request(tokenizer, request: dict[str, Any]) -> list[int]:
    if "prompt_tokens" in request:
        return [int(t) for t in request["prompt_tokens"]]
    kwargs = {}
    if request.get("enable_thinking") is not None:
        kwargs["enable_thinking"] = bool(request["enable_thinking"])
    ids = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def share_ids(ids: list[int] | None, group) -> list[int]:
    """Rank 0's token ids on every rank (the others pass None)."""
    import mlx.core as mx

    if group is None or group.size() == 1:
        return list(ids or [])
    n = mx.distributed.all_sum(mx.array([len(ids) if ids is not None else 0], dtype=mx.int32), group=group)
    n = int(n.item())
    local = mx.array(ids, dtype=mx.int32) if ids is not None else mx.zeros((n,), dtype=mx.int32)
    return [int(t) for t in mx.distributed.all_sum(local, group=group).tolist()]


# --- generation ----------------------------------------------------------------------------------------


def generate(
    model,
    prompt: list[int],
    *,
    max_tokens: int,
    prefill_step: int = 512,
    temperature: float = 0.0,
    seed: int = 0,
    eos: set[int] | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
    keep_logits: bool = False,
) -> Iterator[tuple[int, Any]]:
    """Greedy (or seeded sampling) generation, the same on every rank: yields (token id, logits row | None).
    The prompt is processed in chunks of `prefill_step`; the last prompt token gives the first logits."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    if not prompt:
        raise WorkerError("the prompt is empty")
    cache = make_prompt_cache(model)
    ids = mx.array(prompt, dtype=mx.int32)[None]
    total, done = len(prompt), 0
    mx.random.seed(seed)
    while total - done > 1:
        n = min(prefill_step, total - done - 1)
        model(ids[:, done:done + n], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        if on_prefill:
            on_prefill(done, total)
    logits = model(ids[:, done:], cache=cache)[:, -1, :]
    for _ in range(max_tokens):
        logits = logits.astype(mx.float32)
        if temperature > 0:
            token = mx.random.categorical(logits / temperature)
        else:
            token = mx.argmax(logits, axis=-1)
        mx.eval(token, logits)
        if on_prefill and done < total:
            done = total
            on_prefill(done, total)
        tid = int(token.item())
        yield tid, (logits[0] if keep_logits else None)
        if eos and tid in eos:
            return
        logits = model(token.reshape(1, 1), cache=cache)[:, -1, :]


def weight_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def gather_ints(values: list[int], group) -> list[list[int]]:
    """Every rank's list of ints (same length on all ranks), in rank order."""
    import mlx.core as mx

    if group is None or group.size() == 1:
        return [values]
    arr = mx.distributed.all_gather(mx.array([values], dtype=mx.int64), group=group)
    return [list(map(int, row)) for row in arr.tolist()]


# --- the rank's main -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    group = None
    if args.mode != "single":
        if not mx.distributed.is_available(args.backend):
            raise WorkerError(f"the {args.backend} backend is not available in this mlx build")
        group = mx.distributed.init(backend=args.backend, strict=True)
    rank = group.rank() if group else 0
    size = group.size() if group else 1
    is_main = rank == 0
    out = emit if is_main else (lambda _obj: None)

    t0 = time.perf_counter()
    folder = model_folder(args.model, args.repo_id)
    ranges = None
    if args.mode == "pipeline" and args.split:
        counts = [int(x) for x in args.split.split(",")]
        if len(counts) != size:
            raise WorkerError(f"--split has {len(counts)} counts for {size} ranks")
        ends = [sum(counts[r:]) for r in range(size)]  # rank n-1 holds the first layers
        ranges = [range(ends[r] - counts[r], ends[r]) for r in range(size)]
    elif args.mode == "pipeline" and args.memory:
        from .registry import pipeline_split

        cfg = json.loads((folder / "config.json").read_text())
        ranges = pipeline_split(cfg, size, [int(x) for x in args.memory.split(",")])
    model, tokenizer, config = load(folder, args.mode, group, ranges)
    if group is not None:  # everyone loaded before anyone times anything
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    load_s = time.perf_counter() - t0
    out({"event": "loaded", "rank": rank, "size": size, "mode": args.mode, "seconds": round(load_s, 3),
         "model_type": config.get("model_type")})

    ids = None
    if is_main:
        request = json.loads(Path(args.request).read_text()) if args.request else json.loads(args.request_json)
        ids = encode_request(tokenizer, request)
    prompt = share_ids(ids, group)

    eos = set(tokenizer.eos_token_ids or []) if not args.ignore_eos else set()
    detok = tokenizer.detokenizer
    detok.reset()
    gen_ids: list[int] = []
    rows = []
    tic = time.perf_counter()
    t_prefill = None
    mx.reset_peak_memory()

    def on_prefill(done: int, total: int) -> None:
        out({"event": "prefill", "done": done, "total": total})

    for tid, row in generate(model, prompt, max_tokens=args.max_tokens, prefill_step=args.prefill_step,
                             temperature=args.temperature, seed=args.seed, eos=eos, on_prefill=on_prefill,
                             keep_logits=bool(args.logits_out)):
        if t_prefill is None:
            t_prefill = time.perf_counter() - tic
            tic = time.perf_counter()
        gen_ids.append(tid)
        if row is not None:
            rows.append(row)
        if tid in eos:
            break
        detok.add_token(tid)
        out({"event": "token", "id": tid, "text": detok.last_segment})
        if args.die_after is not None and rank == args.die_rank and len(gen_ids) >= args.die_after:
            os._exit(137)  # fault injection for tests: an abrupt death, no clean-up
    detok.finalize()
    if rest := detok.last_segment:  # read once: mlx-lm hands each new segment out a single time
        out({"event": "token", "id": None, "text": rest})
    gen_s = time.perf_counter() - tic
    finish = "stop" if gen_ids and gen_ids[-1] in eos else "length"
    per_rank = gather_ints([int(mx.get_peak_memory()), weight_bytes(model)], group)
    if is_main and args.logits_out and rows:
        import numpy as np

        np.save(args.logits_out, np.array(mx.stack(rows)))
    n_gen = len(gen_ids)
    out({"event": "done", "ids": gen_ids, "prompt_tokens": len(prompt), "generation_tokens": n_gen,
         "prompt_tps": len(prompt) / t_prefill if t_prefill else 0.0,
         "generation_tps": (n_gen - 1) / gen_s if n_gen > 1 and gen_s > 0 else 0.0,
         "peak_memory_bytes": [p[0] for p in per_rank], "weight_bytes": [p[1] for p in per_rank],
         "finish_reason": finish, "load_seconds": round(load_s, 3)})
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m arthur_cluster.parallel.worker")
    p.add_argument("--model", required=True, help="the model folder")
    p.add_argument("--repo-id", help="where the folder is missing: find this repo id in the HF cache")
    p.add_argument("--mode", choices=MODES, default="single")
    p.add_argument("--backend", default="ring")
    req = p.add_mutually_exclusive_group(required=True)
    req.add_argument("--request", help="JSON file with prompt_tokens or messages")
    req.add_argument("--request-json", help="the same JSON inline")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prefill-step", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", help="pipeline: comma-separated memory per rank, to size the stages")
    p.add_argument("--split", help="pipeline: comma-separated layer count per rank (rank n-1 holds the first)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logits-out", help="rank 0 saves each step's logits here (.npy)")
    p.add_argument("--die-after", type=int, help=argparse.SUPPRESS)
    p.add_argument("--die-rank", type=int, default=1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except Exception as e:  # one JSON line for the launcher, then a non-zero exit
        sys.stdout.write(json.dumps({"event": "error", "rank": os.environ.get("MLX_RANK"),
                                     "message": f"{type(e).__name__}: {e}"}) + "\n")
        sys.stdout.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
