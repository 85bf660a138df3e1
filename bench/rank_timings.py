"""Where a resident rank's request time goes: wall-clock records of each step, one JSON line per step, written by
every rank into its own file (bench/bench_resident.py --timings sets ARTHUR_BENCH_TIMINGS to the folder).

Installed in the rank process before the server starts (bench_resident.rank_main). It wraps the steps of a
request that lie outside the model's own compute (the HTTP side's chat template and tokenization, the broadcast
of the prompt, the prefix cache's begin / restore / disk copy / flush, the per-rank gather) and logs
server.run_request's own step figures (begin, each prefill chunk). Records carry wall-clock start times (time.time()),
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


def timed_run_request(log: Log, real):
    """server.run_request, logged: its own step figures (begin, each prefill chunk) with wall-clock start times."""

    def run_request(*a, **k):
        t_in = time.time()
        info = real(*a, **k)
        steps = info.get("steps") or {}
        chunks = steps.get("prefill_chunks") or []
        log.put(ev="request", t0=t_in, dt=time.time() - t_in, prompt=info["prompt_tokens"],
                cached=info["cached_tokens"], begin=steps.get("begin_s"), prefill_chunks=len(chunks),
                prefill_compute=sum(c[1] for c in chunks), chunks=chunks if len(chunks) <= 4 else chunks[:2] + chunks[-2:],
                ttft=info["ttft"])
        return info

    return run_request


def install(folder: str) -> None:
    from arthur_cluster.parallel import api, prefix, server, worker

    rank = int(os.environ.get("MLX_RANK", "0"))
    log = Log(Path(folder) / f"rank{rank}.jsonl")
    for cls, names in ((prefix.PrefixCache, ("begin", "save_pending", "save_point", "_evict", "_from_disk")),
                       (prefix.DiskStore, ("save", "load")), (api.Front, ("_encode_chat",))):
        for name in names:
            setattr(cls, name, _timed(log, f"{cls.__name__}.{name}", getattr(cls, name)))
    prefix._shard_copy = _timed(log, "_shard_copy", prefix._shard_copy)
    server.broadcast = _timed(log, "broadcast", server.broadcast)
    worker.gather_ints = _timed(log, "gather_ints", worker.gather_ints)
    for fix in filter(None, os.environ.get("ARTHUR_BENCH_FIX", "").split(",")):
        FIXES[fix]()
    server.run_request = timed_run_request(log, server.run_request)


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
