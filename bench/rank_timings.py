"""Where a resident rank's request time goes: wall-clock records of each step, one JSON line per step, written by
every rank into its own file (bench/bench_resident.py --timings sets ARTHUR_BENCH_TIMINGS to the folder).

Installed in the rank process before the server starts (bench_resident.rank_main). It wraps the steps of a
request that lie outside the model's own compute (the HTTP side's chat template and tokenization, the broadcast
of the prompt, the prefix cache's begin / restore / disk copy / flush, the per-rank gather) and replaces
server.run_request with the same loop timed chunk by chunk. Records carry wall-clock start times (time.time()),
so the driver can line them up with the client's POST and first token on the same machine.

Also here, off unless ARTHUR_BENCH_FIX names them: candidate fixes tried on the device without editing the
package (see FIXES).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from pathlib import Path


class Log:
    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def put(self, **kv) -> None:
        with self.lock:
            self.file.write(json.dumps(kv) + "\n")


def _timed(log: Log, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        t0 = time.time()
        try:
            return fn(*a, **k)
        finally:
            log.put(ev=name, t0=t0, dt=time.time() - t0)

    return wrapper


def timed_run_request(log: Log):
    """server.run_request with each step timed (the same steps in the same order; the model's calls are lazy, so
    each chunk's time is its call plus the eval of the cache that follows it)."""
    from arthur_cluster.parallel import server

    def run_request(model, pc, prompt, params, *, step, eos, emit, stop_requested=lambda: False, group=None,
                    check_every=server.CHECK_EVERY):
        import mlx.core as mx

        t_in = time.time()
        cache, start = pc.begin(prompt)
        t_begun = time.time()
        total, done = len(prompt), start
        ids = mx.array(prompt, dtype=mx.int32)[None]
        key = mx.random.key(params.seed)
        tic = time.perf_counter()
        out: list[int] = []
        t_first = None
        finish = "length"
        chunks = []
        while total - done > 1:
            n = min(step, total - done - 1)
            cut = pc.next_cut(done, total)
            if cut is not None and cut < done + n:
                n = cut - done
            t0 = time.time()
            model(ids[:, done:done + n], cache=cache)
            mx.eval([c.state for c in cache])
            t1 = time.time()
            done += n
            if pc.is_point(done, total):
                pc.save_point(done)
            t2 = time.time()
            emit(("prefill", done, total))
            agreed = server._agreed(stop_requested(), group)
            t3 = time.time()
            chunks.append({"n": n, "at": done - n, "compute": t1 - t0, "point": t2 - t1, "emit_agree": t3 - t2})
            if total >= 65536 and len(chunks) % 8 == 0:  # a long pass: how far, how fast, how much memory so far
                log.put(ev="progress", t0=t0, dt=0.0, done=done, total=total, elapsed=time.time() - t_in,
                        peak_bytes=int(mx.get_peak_memory()))
            if agreed:
                finish = "cancelled"
                break
        t_pre = time.time()
        first = {}
        if finish != "cancelled":
            logits = model(ids[:, done:], cache=cache)[:, -1, :]
            for i in range(params.max_tokens):
                key, sub = mx.random.split(key)
                token, logprobs = server.sample(logits.astype(mx.float32), params, sub)
                mx.eval(token)
                tid = int(token.item())
                if t_first is None:
                    t_first = time.perf_counter()
                    first = {"last_tokens": total - done, "first_token": time.time() - t_pre}
                    emit(("prefill", total, total))
                out.append(tid)
                lp = float(logprobs[0, tid].item()) if params.logprobs or params.top_logprobs else None
                emit(("token", tid, lp, server._top(logprobs, params.top_logprobs) if params.top_logprobs else ()))
                if tid in eos:
                    finish = "stop"
                    break
                if i == params.max_tokens - 1:
                    break
                if (i + 1) % check_every == 0 and server._agreed(stop_requested(), group):
                    finish = "cancelled"
                    break
                logits = model(token.reshape(1, 1), cache=cache)[:, -1, :]
        end = time.perf_counter()
        t_first = t_first or end
        log.put(ev="request", t0=t_in, dt=time.time() - t_in, prompt=total, cached=start, begin=t_begun - t_in,
                prefill_chunks=len(chunks), prefill_compute=sum(c["compute"] for c in chunks),
                prefill_points=sum(c["point"] for c in chunks), prefill_emit_agree=sum(c["emit_agree"] for c in chunks),
                chunks=chunks if len(chunks) <= 4 else chunks[:2] + chunks[-2:], ttft=t_first - tic,
                decode=end - t_first, **first)
        return {"ids": out, "prompt_tokens": total, "cached_tokens": start,
                "prefilled_tokens": done - start + bool(out), "ttft": t_first - tic,
                "prompt_tps": (total - start) / max(t_first - tic, 1e-9),
                "generation_tps": (len(out) - 1) / (end - t_first) if len(out) > 1 and end > t_first else 0.0,
                "finish_reason": finish}

    return run_request


def install(folder: str) -> None:
    from arthur_cluster.parallel import api, prefix, server, worker

    rank = int(os.environ.get("MLX_RANK", "0"))
    log = Log(Path(folder) / f"rank{rank}.jsonl")
    for cls, names in ((prefix.PrefixCache, ("begin", "flush", "save_point", "_evict", "_from_disk")),
                       (prefix.DiskStore, ("save", "load")), (api.Front, ("_encode_chat",))):
        for name in names:
            setattr(cls, name, _timed(log, f"{cls.__name__}.{name}", getattr(cls, name)))
    prefix._shard_copy = _timed(log, "_shard_copy", prefix._shard_copy)
    server.broadcast = _timed(log, "broadcast", server.broadcast)
    worker.gather_ints = _timed(log, "gather_ints", worker.gather_ints)
    for fix in filter(None, os.environ.get("ARTHUR_BENCH_FIX", "").split(",")):
        FIXES[fix]()
    server.run_request = timed_run_request(log)


FIXES: dict = {}


def summarize(folder: Path, questions: list[dict]) -> list[dict]:
    """Per question (client POST to the end of its stream, and up to the next POST for steps that run after
    the answer): each rank's time per step, summed."""
    events = {}
    for f in sorted(Path(folder).glob("rank*.jsonl")):
        events[f.stem] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    out = []
    for i, q in enumerate(questions):
        lo, hi = q["t_post"], questions[i + 1]["t_post"] if i + 1 < len(questions) else float("inf")
        row = {"question": q.get("label", q.get("question")), "client_ttft": q["ttft_s"], "ranks": {}}
        for rank, evs in events.items():
            mine = [e for e in evs if lo <= e["t0"] < hi]
            sums: dict = {}
            for e in mine:
                if e["ev"] == "request":
                    sums["request"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()
                                       if k not in ("ev",)}
                    sums["request"]["t0_after_post"] = round(e["t0"] - lo, 4)
                else:
                    sums[e["ev"]] = round(sums.get(e["ev"], 0.0) + e["dt"], 4)
            row["ranks"][rank] = sums
        out.append(row)
    return out
