"""Resident MLX ranks: time to first token of later questions on one document against the first, through rank
0's OpenAI endpoint (the ranks keep the weights and a prefix cache between requests).

    python bench/bench_resident.py                                  # CPU: miniature NemotronH, 2 tensor ranks
    python bench/bench_resident.py --doc-tokens 16384 --mode pipeline --out resident.json

Starts the ranks the way `up` does (parallel/resident.py: detached processes, ring on loopback), asks one short
warm-up question, then three questions on the same document. For each: the client's time to the first token
(POST to the server's `: prefill n/n` line, sent as the first token is sampled), the server's own figure, and
how many prompt tokens came from the cache. The target: second question's TTFT <= 5% of the first's.
bench/gpu_resident.py runs the same at real shape, with random 8-bit weights built on each rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "arthur_cluster" / "data" / "nemotron-3-nano-30b-a3b-mlx-8bit.config.json"
SENTENCES = ["The cluster runs the model across several machines; each node holds part of the weights. ",
             "A pipeline splits the layers into stages, and tensor parallel splits every layer across the nodes. ",
             "Mamba layers keep a fixed-size state, attention layers a key and value cache that grows. "]
QUESTIONS = ["What does each node hold?", "How does a pipeline split the model?", "What do Mamba layers keep?"]


# --- the ranks (synthetic weights: GPU runs at real shape) ---------------------------------------------------


def synthetic_loader(config_path: str):
    """server.load_model for random weights of a real config (built lazily, split, then evaluated per rank)."""

    def load_model(args, group):
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm.utils import load_tokenizer

        from arthur_cluster.parallel import registry

        sys.path.insert(0, str(ROOT / "bench"))
        from gpu_parallel import build

        config = json.loads(Path(config_path).read_text())
        model = build(config)
        if group is not None:
            model = registry.apply(model, args.mode, group, config)
        for _, v in tree_flatten(model.parameters()):  # one tensor at a time keeps the transient peak low
            mx.eval(v)
        return model, load_tokenizer(Path(args.model)), config

    return load_model


def rank_main(argv: list[str]) -> int:
    from arthur_cluster.parallel import server

    config = argv[argv.index("--synthetic") + 1]
    rest = [a for i, a in enumerate(argv) if a != "--synthetic" and (i == 0 or argv[i - 1] != "--synthetic")]
    server.load_model = synthetic_loader(config)
    if os.environ.get("ARTHUR_BENCH_TIMINGS"):  # --timings: each rank records where its request time goes
        sys.path.insert(0, str(ROOT / "bench"))
        import rank_timings

        rank_timings.install(os.environ["ARTHUR_BENCH_TIMINGS"])
    return server.main(rest)


# --- the client ---------------------------------------------------------------------------------------------


def document(tok, n: int) -> str:
    """Text of about n tokens (whole sentences)."""
    unit = "".join(SENTENCES)
    per = max(1, len(tok.encode(unit)))
    return unit * max(1, n // per)


def ask(url: str, messages: list[dict], max_tokens: int, timeout: float) -> dict:
    import requests

    t0, t_post = time.perf_counter(), time.time()
    first, info = None, None
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0.0}
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=(10, timeout)) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith(": prefill "):
                done, total = map(int, line[len(": prefill "):].split("/"))
                if total >= 65536 and done % 16384 < 2048:  # a long single pass: how far it got, and when
                    print(f"prefill {done}/{total} at {time.perf_counter() - t0:.1f} s", flush=True)
                if done == total and first is None:
                    first = time.perf_counter() - t0
            elif line.startswith("data: {"):
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(obj["error"]["message"])
                if obj.get("arthur"):
                    info = obj["arthur"]
    total_s = time.perf_counter() - t0
    return {"t_post": t_post, "t_end": time.time(), "ttft_s": round(first or total_s, 4), "server_ttft_s": round(info["ttft"], 4), "total_s": round(total_s, 3),
            "prompt_tokens": info["prompt_tokens"], "cached_tokens": info["cached_tokens"],
            "prefilled_per_rank": info["prefilled_per_rank"], "weight_loads": info["weight_loads"],
            "peak_memory_gb": [round(p / 1e9, 2) for p in info["peak_memory_bytes"]],
            "weight_gb": [round(w / 1e9, 2) for w in info["weight_bytes"]], "ids": info["ids"]}


def long_pass(args, url: str, tok, record: dict, save) -> None:
    """One single pass over a long document sharing no prefix with anything asked before (--long-tokens)."""
    if not args.long_tokens:
        return
    text = "Long document. " + document(tok, args.long_tokens) + "\n\nQuestion: " + QUESTIONS[0]
    r = ask(url, [{"role": "user", "content": text}], args.long_max_tokens, args.load_timeout)
    record["long"] = {k: v for k, v in r.items() if k != "ids"}
    record["long"]["prefill_tps"] = round(r["prompt_tokens"] / r["server_ttft_s"], 1)
    print("long single pass:", json.dumps(record["long"]), flush=True)
    save()


def main(argv: list[str] | None = None, *, synthetic: bool = False, default_out: str = "bench_resident.json") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rank"]:
        return rank_main(argv[1:])
    p = argparse.ArgumentParser()
    p.add_argument("--doc-tokens", type=int, default=8192)
    p.add_argument("--mode", default="tensor", choices=("single", "pipeline", "tensor"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backend", default="ring")
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--load-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path)
    p.add_argument("--questions", type=int, default=3, help="questions on the document (1 for a single pass)")
    p.add_argument("--again", action="store_true", help="then ask the second question again (the same prompt: "
                   "the same shapes as its first asking)")
    p.add_argument("--no-warmup", action="store_true", help="no warm-up questions (kernels compile in the first)")
    p.add_argument("--timings", action="store_true", help="each rank records where its request time goes "
                   "(bench/rank_timings.py); a summary per question goes into the output")
    p.add_argument("--long-tokens", type=int, default=0, help="then one single pass over another document of "
                   "about this many tokens on the same ranks (peak memory per rank; --long-max-tokens answer tokens)")
    p.add_argument("--long-max-tokens", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="with synthetic weights: the miniature shape of the same "
                   "architecture (a smoke run of the GPU bench on any machine)")
    p.add_argument("--fix", default="", help="comma-separated fixes from rank_timings.FIXES, tried in the ranks")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds: skip the steady-state question "
                   "(a first question on another document, kernels compiled) when less than 150 s are left")
    args = p.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT", ".")) / default_out
    os.environ.setdefault("ARTHUR_CLUSTER_HOME", tempfile.mkdtemp(prefix="bench-resident-"))
    timings = None
    if args.timings:
        timings = Path(os.environ.get("ARTHUR_BENCH_TIMINGS") or tempfile.mkdtemp(prefix="bench-resident-timings-"))
        timings.mkdir(parents=True, exist_ok=True)
    if timings:
        os.environ["ARTHUR_BENCH_TIMINGS"] = str(timings)
    if args.fix:
        os.environ["ARTHUR_BENCH_FIX"] = args.fix

    from mlx_lm.utils import load_tokenizer

    from arthur_cluster import miniature, tinytok
    from arthur_cluster.parallel import resident

    folder = Path(tempfile.mkdtemp(prefix="bench-resident-model-"))
    config = json.loads(CONFIG.read_text())
    entry = None
    if synthetic:  # config and tokenizer only: every rank builds its random weights itself
        config_path = CONFIG
        if args.tiny:
            config = miniature.tiny_config("nemotron_h", like=config)
            config["quantization"] = miniature.quantization_like(json.loads(CONFIG.read_text()))
            config_path = folder / "synthetic-config.json"
            config_path.write_text(json.dumps(config))
        (folder / "config.json").write_text(json.dumps(config))
        tinytok.write(folder)
        entry = [str(Path(__file__).resolve()), "rank", "--synthetic", str(config_path)]
    else:
        miniature.make(folder, "nemotron_h", like=config)
    tok = load_tokenizer(folder)
    record: dict = {"mode": args.mode, "ranks": args.ranks, "backend": args.backend, "synthetic": synthetic,
                    "prefill_step": args.prefill_step, "fix": args.fix, "questions": []}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))

    t0 = started = time.perf_counter()
    res = resident.start(folder, "bench", mode=args.mode if args.ranks > 1 else "single", n=args.ranks,
                         backend=args.backend, prefill_step=args.prefill_step, timeout=args.load_timeout,
                         entry=entry, say=print)
    try:
        record["start_s"] = round(time.perf_counter() - t0, 1)
        print(f"ranks up in {record['start_s']} s at {res.url}", flush=True)
        t0 = time.perf_counter()  # kernels compile on first use (minutes on CUDA): keep that out of the figures
        for n in () if args.no_warmup else (600, 3000):
            warm = ask(res.url, [{"role": "user", "content": f"Warm-up {n}. " + document(tok, n)}], 2,
                       args.load_timeout)  # a different start: it shares no cacheable prefix with the document
        record["warmup_s"] = round(time.perf_counter() - t0, 1)
        save()
        doc = document(tok, args.doc_tokens)
        asked = QUESTIONS[:args.questions] + (QUESTIONS[1:2] if args.again else [])
        for i, q in enumerate(asked):
            r = ask(res.url, [{"role": "user", "content": doc + "\n\nQuestion: " + q}], args.max_tokens,
                    args.load_timeout)
            record["questions"].append({"question": q, "label": "again" if i >= args.questions else str(i + 1), **r})
            print(json.dumps({k: v for k, v in r.items() if k != "ids"}), flush=True)
            save()
        qs = record["questions"]
        record["document_tokens"] = qs[0]["prompt_tokens"]
        if len(qs) < 3:
            long_pass(args, res.url, tok, record, save)
            return 0
        record["ttft_ratio_second"] = round(qs[1]["ttft_s"] / qs[0]["ttft_s"], 4)
        record["ttft_ratio_third"] = round(qs[2]["ttft_s"] / qs[0]["ttft_s"], 4)
        record["weight_loads_after"] = qs[-1]["weight_loads"]
        record["distinct_answers"] = len({tuple(q["ids"]) for q in qs[:3]})
        if args.again:
            record["ttft_ratio_again"] = round(qs[3]["ttft_s"] / qs[0]["ttft_s"], 4)
        save()
        if not args.time_budget or time.perf_counter() - started < args.time_budget - 150:
            other = "Another document. " + doc  # nothing cacheable in common: a whole prefill, kernels warm
            r = ask(res.url, [{"role": "user", "content": other + "\n\nQuestion: " + QUESTIONS[0]}],
                    args.max_tokens, args.load_timeout)
            record["steady_first"] = {k: v for k, v in r.items() if k != "ids"}
            record["ttft_ratio_second_vs_steady"] = round(qs[1]["ttft_s"] / r["ttft_s"], 4)
            print("steady-state first question:", json.dumps(record["steady_first"]), flush=True)
            save()
        long_pass(args, res.url, tok, record, save)
        print(f"\nprompt {qs[0]['prompt_tokens']} tokens; TTFT first {qs[0]['ttft_s']} s, second {qs[1]['ttft_s']} s "
              f"(ratio {record['ttft_ratio_second']}), third {qs[2]['ttft_s']} s (ratio {record['ttft_ratio_third']}); "
              f"weight loads per rank {record['weight_loads_after']}; prefilled per rank "
              f"{[q['prefilled_per_rank'][0] for q in qs]}")
    finally:
        resident.stop(res)
        record["logs"] = res.logdir
        if timings:
            from rank_timings import summarize

            record["breakdown"] = summarize(timings, record["questions"])
            for row in record["breakdown"]:
                print("breakdown:", json.dumps(row), flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
