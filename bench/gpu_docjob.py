"""Document jobs at real scale on one GPU (MLX CUDA or Metal): a Nemotron-3-Nano-shaped 8-bit model with random
weights, built lazily in memory from arthur_cluster/data/nemotron-3-nano-30b-a3b-mlx-8bit.config.json.

Measures, through the document job's runner on the MLX engine in this process:
  1. time to first token of a second question on a 32k-token document versus the first (target <= 5%);
  2. predicted (memory.plan) versus measured peak memory after prefilling N tokens (target within 10%),
     for each N in --contexts (8k, 32k, 131k, 262k as time allows: about 370 prefill tok/s on an H100).

    python bench/gpu_docjob.py --ttft 32768 --contexts 8192,32768 --out results.json
    python bench/gpu_docjob.py --ttft 0 --contexts 131072
    python bench/gpu_docjob.py --ttft 0 --contexts 262144 --time-budget 580

Writes the JSON record after every measurement (to --out, default $OUT/gpu_docjob.json or ./gpu_docjob.json),
so a run stopped by a time limit keeps what it measured. --dry prints the predictions without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "arthur_cluster" / "data" / "nemotron-3-nano-30b-a3b-mlx-8bit.config.json"


def build_model(config: dict):
    """mlx-lm's NemotronH with random weights, cast to bf16 and quantized one layer at a time (bounded peak)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes

    cls, args_cls = _get_classes(config)
    model = cls(args_cls.from_dict(config))
    model.set_dtype(mx.bfloat16)
    q = config["quantization"]
    group, bits = q["group_size"], q["bits"]
    nn.quantize(model, group, bits, mode=q.get("mode", "affine"),
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group == 0)
    for layer in model.backbone.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model


def tokenizer(folder: Path):
    from mlx_lm.utils import load_tokenizer

    from arthur_cluster import tinytok

    tinytok.write(folder)
    return load_tokenizer(folder)


def predicted(config: dict, context: int, step: int) -> dict:
    """The plan with fused attention: MLX's SDPA on CUDA keeps no score matrix (measured on an H100: the
    materialised-score plan overshoots by 66% at 131k tokens), as on Metal."""
    from arthur_cluster import memory

    n = memory.plan(config, context=context, nodes=1, prefill_step=step, attention="fused",
                    name="nemotron-3-nano-8bit").nodes[0]
    return {"weights": n.weights, "kv_cache": n.kv_cache, "mamba_state": n.mamba_state,
            "activation": n.activation, "total": n.total}


def random_tokens(n: int, seed: int, vocab: int = 500) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


class Record:
    def __init__(self, path: Path):
        self.path, self.data = path, {"ttft": None, "peaks": [], "not_run": []}

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2))
        print(json.dumps(self.data, indent=2), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ttft", type=int, default=32768, help="document tokens for the TTFT check (0: skip)")
    ap.add_argument("--contexts", default="8192,32768", help="comma-separated prefill sizes for peak memory")
    ap.add_argument("--step", type=int, default=2048, help="prefill step (mlx-lm's default)")
    ap.add_argument("--time-budget", type=float, default=560.0, help="seconds; skip what would not finish")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dry", action="store_true", help="predictions only, no model")
    ap.add_argument("--config", type=Path, default=CONFIG, help="another config.json (a smoke test on a miniature)")
    args = ap.parse_args()

    config = json.loads(args.config.read_text())
    contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
    out = args.out or Path(os.environ.get("OUT", ".")) / "gpu_docjob.json"
    rec = Record(out)
    rec.data["config"] = str(args.config)
    if args.dry:
        rec.data["peaks"] = [{"context": c, "predicted": predicted(config, c, args.step)} for c in contexts]
        rec.save()
        return
    run(config, args, contexts, rec)


def engine(config: dict, step: int):
    """The MLX engine in this process (its rank thread builds the random model: MLX arrays stay on the thread
    that made them), with a throwaway tokenizer folder as its "model folder"."""
    from arthur_cluster.engines.mlx import MlxEngine
    from arthur_cluster.parallel import server

    folder = Path(tempfile.mkdtemp(prefix="gpu-docjob-model-"))
    tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(config))
    server.load_model = lambda args, group: (build_model(config), tokenizer(folder), config)
    return MlxEngine(folder, model_id="nemotron-3-nano-shaped-8bit-random", prefill_step=step, disk_cache=False)


def run(config: dict, args, contexts: list[int], rec: Record) -> None:
    from arthur_cluster import docjob
    from arthur_cluster.engines.base import collect

    start = time.perf_counter()
    t = time.perf_counter()
    eng = engine(config, args.step)
    rec.data["build_s"] = round(time.perf_counter() - t, 1)
    runner = docjob.MlxRunner(eng, model_id=eng.model_id, step=args.step)

    # Kernel compilation (tens of seconds on first use on CUDA) happens here, outside every measurement.
    t = time.perf_counter()
    collect(eng.stream_ids(random_tokens(args.step + 64, 1), max_tokens=2, cache=False))
    tps = runner.warmup(random_tokens(1024, 2), n=1024)
    rec.data["jit_warmup_s"] = round(time.perf_counter() - t, 1)
    rec.data["warmup_prefill_tps"] = round(tps or 0, 1)
    rec.save()

    def left() -> float:
        return args.time_budget - (time.perf_counter() - start)

    if args.ttft:
        if args.ttft / max(tps or 1, 1) * 1.3 > left():
            rec.data["not_run"].append(f"ttft at {args.ttft}: not enough time left")
        else:
            ttft_check(runner, args.ttft, rec)
        rec.save()
    for n in contexts:
        if n / max(tps or 1, 1) * 1.5 > left():  # attention makes long prefills slower than the warm-up rate
            rec.data["not_run"].append(f"peak at {n}: about {n / max(tps or 1, 1):.0f} s of prefill, "
                                       f"{left():.0f} s left")
            rec.save()
            continue
        peak_check(eng, config, n, args.step, rec)
        rec.save()
    runner.close()


def ttft_check(runner, n: int, rec: Record) -> None:
    from arthur_cluster import docjob

    reporter = docjob.Reporter()
    doc = random_tokens(n, 3)
    answers = []
    for i, q in enumerate([random_tokens(24, 10), random_tokens(24, 11), random_tokens(24, 12)]):
        prompt = docjob.Prompt(head="", tail="", prefix=doc, suffix=q)
        answers.append(runner.answer(f"q{i + 1}", prompt, max_tokens=8, temperature=0.0, reporter=reporter))
    first, second, third = answers
    rec.data["ttft"] = {
        "document_tokens": n, "first_s": round(first.ttft, 4), "second_s": round(second.ttft, 4),
        "third_s": round(third.ttft, 4), "ratio": round(second.ttft / first.ttft, 5), "target": 0.01,
        "second_cache": second.cache, "second_cached_tokens": second.cached_tokens,
        "first_prefill_tps": round(n / first.ttft, 1),
        "decode_tps": round(second.generation_tokens / second.decode_seconds, 1) if second.decode_seconds else None,
    }


def peak_check(eng, config: dict, n: int, step: int, rec: Record) -> None:
    """One request of n prompt tokens and one answer token on a throwaway cache: the engine's own peak (it resets
    the peak before each request)."""
    from arthur_cluster.engines.base import collect

    t = time.perf_counter()
    stats = collect(eng.stream_ids(random_tokens(n, 4), max_tokens=1, cache=False)).stats
    secs = time.perf_counter() - t
    measured = stats.peak_memory_bytes
    pred = predicted(config, n, step)
    rec.data["peaks"].append({
        "context": n, "measured_peak": measured, "predicted": pred,
        "error": round((pred["total"] - measured) / measured, 4), "prefill_s": round(secs, 1),
        "prefill_tps": round(n / secs, 1),
    })


if __name__ == "__main__":
    main()
