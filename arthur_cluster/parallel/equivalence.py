"""Does a split model answer like the whole one? Real rank processes against a single-process reference.

`check()` runs the worker once as a single process and once as n ranks (pipeline or tensor), both greedy over the
same token ids, and compares the generated ids and every step's logits. A pipeline runs the same operations in the
same order, so its logits match exactly; a tensor split sums partial products in another order, so its logits
differ by rounding, bounded by `tolerance` times the largest |logit| (at least 1).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..hostfile import BackendUnavailable, check_backend, loopback_ring, rank_env
from .ranks import RankFailed, RankProcesses
from .registry import supported, tensor_blockers

# Largest |logit difference| accepted for a tensor split, per unit of the largest |logit| (at least 1): rounding
# from adding partial sums in another order grows with the values. Measured on the randomized miniatures (ring, CPU,
# 2 and 4 ranks, logits up to 2.5 / 4.5): NemotronH 2.2e-6 to 2.9e-6 absolute, Llama (mlx-lm's split) 1.0e-5 to
# 1.9e-5, float32 and quantized alike: a quantized split holds the same quantized weights.
TOLERANCE = {"float": 1e-5, "quantized": 1e-5}

# Single-process references already computed in this process: (model, mtime, prompt, steps, chunk) -> (ids, logits).
_REFERENCES: dict[tuple, tuple[list[int], object]] = {}


@dataclass
class EquivalenceResult:
    ok: bool
    mode: str
    n: int
    backend: str = "ring"
    single_ids: list[int] = field(default_factory=list)
    dist_ids: list[int] = field(default_factory=list)
    max_abs_logit_diff: float | None = None
    max_abs_logit: float = 0.0  # the reference's largest |logit|: the tolerance is relative to it
    tolerance: float = 0.0
    error: str | None = None
    unsupported: str | None = None
    seconds: float = 0.0
    prompt_tokens: int = 0
    weight_bytes: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def default_prompt(vocab_size: int, length: int = 40, seed: int = 1) -> list[int]:
    """Varied ids away from the special tokens (deterministic)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(8, vocab_size) for _ in range(length)]


def _worker_cmd(model: Path, mode: str, backend: str, request: Path, max_tokens: int, prefill_step: int,
                logits: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "arthur_cluster.parallel.worker", "--model", str(model), "--mode", mode,
            "--backend", backend, "--request", str(request), "--max-tokens", str(max_tokens),
            "--prefill-step", str(prefill_step), "--ignore-eos", "--logits-out", str(logits), *extra]


def run_local(model: Path, mode: str, n: int, *, backend: str, request: Path, max_tokens: int,
              prefill_step: int, logits: Path, timeout: float, extra: list[str] | None = None) -> dict:
    """One job of n ranks on this machine; returns rank 0's "done" event."""
    env = []
    if mode != "single":
        ring = loopback_ring(n) if backend == "ring" else None
        port = None
        if backend == "nccl":
            from ..hostfile import free_ports

            port = free_ports(1)[0]
        env = [rank_env(backend, r, n, files=request.parent, ring=ring, nccl_port=port) for r in range(n)]
    cmd = _worker_cmd(model, mode, backend, request, max_tokens, prefill_step, logits, extra or [])
    procs = RankProcesses([cmd] * max(n, 1) if mode != "single" else [cmd], env or None)
    done = None
    for ev in procs.events(timeout=timeout):
        if ev.get("event") == "done":
            done = ev
    if done is None:
        raise RankFailed("rank 0 ended without a result")
    return done


def _is_quantized(config: dict) -> bool:
    q = config.get("quantization") or config.get("quantization_config")
    return isinstance(q, dict) and bool(q.get("bits"))


def check(model_path: str | Path, mode: str, n: int, *, backend: str = "ring", prompt_tokens: list[int] | None = None,
          max_tokens: int = 16, prefill_step: int = 16, tolerance: float | None = None,
          timeout: float = 300.0, split: list[int] | None = None) -> EquivalenceResult:
    """Compare an n-rank `mode` run of the model with a single process; never raises for a failed run.
    `split`: pipeline layer counts per rank (rank n-1 holds the first layers); by weight cost when None."""
    t0 = time.perf_counter()
    model = Path(model_path)
    config = json.loads((model / "config.json").read_text())
    mtype = config.get("model_type", "?")
    quant = _is_quantized(config)
    tol = tolerance if tolerance is not None else (0.0 if mode == "pipeline" else
                                                   TOLERANCE["quantized" if quant else "float"])
    res = EquivalenceResult(ok=False, mode=mode, n=n, backend=backend, tolerance=tol)

    def finish(**kw) -> EquivalenceResult:
        for k, v in kw.items():
            setattr(res, k, v)
        res.seconds = round(time.perf_counter() - t0, 3)
        return res

    if mode not in ("pipeline", "tensor"):
        return finish(unsupported=f"mode must be 'pipeline' or 'tensor', got {mode!r}")
    if not supported(mtype)[mode]:
        return finish(unsupported=f"no {mode} split for model type {mtype!r} (neither here nor in mlx-lm)")
    if mode == "tensor" and (why := tensor_blockers(config, n)):
        return finish(unsupported=f"tensor split over {n} ranks impossible: " + "; ".join(why))
    layers = config.get("num_hidden_layers") or len(config.get("hybrid_override_pattern") or "")
    if mode == "pipeline" and layers and n > layers:
        return finish(unsupported=f"{n} pipeline stages for {layers} layers")
    try:
        check_backend(backend)
    except BackendUnavailable as e:
        return finish(unsupported=str(e))

    prompt = prompt_tokens or default_prompt(int(config.get("vocab_size", 512)))
    res.prompt_tokens = len(prompt)
    with tempfile.TemporaryDirectory(prefix="arthur-equiv-") as tmp:
        tmp = Path(tmp)
        req = tmp / "request.json"
        req.write_text(json.dumps({"prompt_tokens": prompt}))
        import numpy as np

        key = (str(model.resolve()), (model / "config.json").stat().st_mtime_ns, tuple(prompt), max_tokens,
               prefill_step)
        try:
            if key not in _REFERENCES:  # the reference runs in its own process too, like the ranks
                single = run_local(model, "single", 1, backend=backend, request=req, max_tokens=max_tokens,
                                   prefill_step=prefill_step, logits=tmp / "single.npy", timeout=timeout)
                _REFERENCES[key] = (single["ids"], np.load(tmp / "single.npy"))
            extra = ["--split", ",".join(map(str, split))] if split and mode == "pipeline" else []
            dist = run_local(model, mode, n, backend=backend, request=req, max_tokens=max_tokens,
                             prefill_step=prefill_step, logits=tmp / "dist.npy", timeout=timeout, extra=extra)
        except RankFailed as e:
            return finish(error=str(e))
        res.single_ids, a = _REFERENCES[key]
        b = np.load(tmp / "dist.npy")
    res.dist_ids = dist["ids"]
    res.weight_bytes = dist.get("weight_bytes", [])
    steps = min(len(a), len(b))
    diff = float(np.max(np.abs(a[:steps] - b[:steps]))) if steps else None
    if steps:
        res.max_abs_logit = float(np.max(np.abs(a[:steps])))
        tol = tol * max(1.0, res.max_abs_logit)
        res.tolerance = tol
    same = res.single_ids == res.dist_ids
    ok = same and diff is not None and diff <= tol
    err = None
    if not same:
        first = next((i for i, (x, y) in enumerate(zip(res.single_ids, res.dist_ids)) if x != y),
                     min(len(res.single_ids), len(res.dist_ids)))
        err = f"token ids differ from step {first}"
    elif diff is not None and diff > tol:
        err = f"max |logit difference| {diff:.3g} exceeds the tolerance {tol:g}"
    return finish(ok=ok, max_abs_logit_diff=diff, error=err)
