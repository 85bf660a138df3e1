"""Resident ranks: load a model once, keep a prefix cache, serve OpenAI-style completions from rank 0.

    python -m arthur_cluster.parallel.server --model PATH --mode tensor --port 8765 [--bind 127.0.0.1]

Every rank loads its share of the weights once and then loops: rank 0 takes the next request from a bounded
queue (RankEngine, filled by the HTTP side in api.py through protocol.Engine) and broadcasts its token ids and
sampling values over mlx.core.distributed; every rank then runs the same generation in lockstep (the same
seeded draws), and rank 0 hands the events back. The HTTP side (routes, validation, text): api.py and
docs/openai.md.

Health: besides the MLX group, every other rank keeps one TCP connection to rank 0's control port. A rank
that dies (even by SIGKILL) closes it: rank 0 then answers every request 503 with which rank went away,
and closes the connections of the others, which exit. Rank 0 dying closes them all the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ArthurError
from .control import Control, follow_control
from .protocol import (Done, EngineBusy, EngineDown, Failed, Handle, Prefill, Request, Sink, Status,
                       Token)

OP_GENERATE, OP_STOP, OP_SAVE = 1, 2, 3  # OP_SAVE: idle, every rank writes the prefix it keeps for its disk
HEADER = 11  # int32 words: op, prompt length, max tokens, seed, logprobs, top logprobs, cache, restore point,
#              enable_thinking (0 unset, 1 off, 2 on), then the float32 bits of temperature and top_p
CONNECT_WAIT = 120.0  # seconds a rank keeps trying to reach rank 0's control port


class ServerError(ArthurError, RuntimeError):
    pass


# --- the prefix cache: parallel/prefix.py (one design for one rank and many) ---------------------------------

from .prefix import DiskStore, PrefixCache, common_prefix  # noqa: E402,F401 - run_request and tests use them here


# --- one request, the same on every rank -----------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """A request's sampling values as every rank uses them (rank 0 builds them from a validated Request only)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    cache: bool = True  # use the prefix cache (False: a throwaway cache, nothing kept)
    point: int = 0  # one more restore point (the end of a prefix the caller will send again)
    thinking: int = 0  # the prompt's enable_thinking: 0 unset, 1 off, 2 on (the prefix cache's key has it)

    @property
    def flags(self) -> str:
        from .prefix import thinking_flags

        return thinking_flags(None if self.thinking == 0 else self.thinking == 2)

    @classmethod
    def of(cls, r: Request) -> "Params":
        # float32 from the start: the other ranks receive float32 bits, so rank 0 must sample with the same value
        return cls(max_tokens=r.max_tokens, temperature=_f32(r.temperature), top_p=_f32(r.top_p), seed=r.seed,
                   logprobs=r.logprobs, top_logprobs=r.top_logprobs, cache=r.cache,
                   point=r.point if r.point < len(r.prompt) else 0,
                   thinking=0 if r.enable_thinking is None else 1 + int(r.enable_thinking))


def _f32(x: float) -> float:
    import numpy as np

    return float(np.float32(x))


def sample(logits, params: Params, key):
    """(token, log probabilities under the model): greedy at temperature 0, else drawn with this request's key
    from the tempered distribution, cut to its top_p mass."""
    import mlx.core as mx

    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if params.temperature <= 0:
        return mx.argmax(logits, axis=-1), logprobs
    scaled = logprobs * (1.0 / params.temperature)
    if params.top_p < 1.0:
        from mlx_lm.sample_utils import apply_top_p

        scaled = apply_top_p(scaled - mx.logsumexp(scaled, axis=-1, keepdims=True), params.top_p)
    return mx.random.categorical(scaled, key=key), logprobs


def _top(logprobs, k: int) -> tuple[tuple[int, float], ...]:
    import mlx.core as mx

    row = logprobs[0]
    idx = mx.argpartition(-row, kth=k - 1)[:k]
    vals = row[idx]
    order = mx.argsort(-vals)
    return tuple((int(i), float(v)) for i, v in zip(idx[order].tolist(), vals[order].tolist()))


def _agreed(flag: bool, group) -> bool:
    """Rank 0's flag on every rank (the others pass False): every rank calls this at the same step."""
    import mlx.core as mx

    if group is None or group.size() == 1:
        return flag
    return int(mx.distributed.all_sum(mx.array([int(flag)], dtype=mx.int32), group=group).item()) > 0


CHECK_EVERY = 4  # decode steps between the ranks' agreed checks for a cancelled request (one tiny collective)


def run_request(model, pc: PrefixCache | None, prompt: list[int], params: Params, *, step: int, eos: set[int],
                emit: Callable[[tuple], None], stop_requested: Callable[[], bool] = lambda: False,
                group=None, check_every: int = CHECK_EVERY) -> dict:
    """Prefill what the prefix cache lacks (cut at restore points), then decode; emit() gets
    ("prefill", done, total) and ("token", id, logprob, top) on every rank (only rank 0's reaches a client).
    stop_requested() is rank 0's word (a client left, a stop string matched): the ranks agree on it after every
    prefill chunk and every `check_every` tokens, so they stop at the same step. pc None: a throwaway cache."""
    import mlx.core as mx

    t_in = time.perf_counter()
    if pc is None:
        from mlx_lm.models.cache import make_prompt_cache

        cache, start, source = make_prompt_cache(model), 0, "none"
    else:
        cache, start = pc.begin(prompt, params.flags, extra=params.point)
        source = pc.source
    chunks: list[list[float]] = []  # (tokens, seconds) per prefill chunk: where a request's time goes
    total, done = len(prompt), start
    ids = mx.array(prompt, dtype=mx.int32)[None]
    key = mx.random.key(params.seed)  # this request's own stream: unrelated to any other request's draws
    tic = time.perf_counter()
    out: list[int] = []
    t_first = None
    finish = "length"
    while total - done > 1:
        n = min(step, total - done - 1)
        cut = pc.next_cut(done, total) if pc is not None else None
        if cut is not None and cut < done + n:
            n = cut - done
        t0 = time.perf_counter()
        model(ids[:, done:done + n], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()  # each chunk's temporaries differ in size: kept, they pile up over a long prefill
        chunks.append([n, round(time.perf_counter() - t0, 6)])
        done += n
        if pc is not None and pc.is_point(done, total):
            pc.save_point(done)
        emit(("prefill", done, total))
        if _agreed(stop_requested(), group):
            finish = "cancelled"
            break
    if finish != "cancelled":
        logits = model(ids[:, done:], cache=cache)[:, -1, :]
        for i in range(params.max_tokens):
            key, sub = mx.random.split(key)
            token, logprobs = sample(logits.astype(mx.float32), params, sub)
            mx.eval(token)
            tid = int(token.item())
            if t_first is None:
                t_first = time.perf_counter()
                emit(("prefill", total, total))
            out.append(tid)
            lp = float(logprobs[0, tid].item()) if params.logprobs or params.top_logprobs else None
            emit(("token", tid, lp, _top(logprobs, params.top_logprobs) if params.top_logprobs else ()))
            if tid in eos:
                finish = "stop"
                break
            if i == params.max_tokens - 1:
                break  # no step past the last token: a lazy one would leave collectives pending in the cache
            if (i + 1) % check_every == 0 and _agreed(stop_requested(), group):
                finish = "cancelled"
                break
            logits = model(token.reshape(1, 1), cache=cache)[:, -1, :]
    end = time.perf_counter()
    t_first = t_first or end
    return {"ids": out, "prompt_tokens": total, "cached_tokens": start, "cache": source,
            "prefilled_tokens": done - start + bool(out),
            "ttft": t_first - tic, "prompt_tps": (total - start) / max(t_first - tic, 1e-9),
            "generation_tps": (len(out) - 1) / (end - t_first) if len(out) > 1 and end > t_first else 0.0,
            "finish_reason": finish, "steps": {"begin_s": round(tic - t_in, 6), "prefill_chunks": chunks}}


# --- the group's side of a request -------------------------------------------------------------------------


def _words(op: int, n: int, p: Params) -> list[int]:
    """The header: bounded ints only (Request's bounds), floats as their float32 bits (exact through a sum)."""
    import numpy as np

    t, top_p = (int(x) for x in np.array([p.temperature, p.top_p], dtype=np.float32).view(np.int32))
    return [op, n, p.max_tokens, p.seed, int(p.logprobs), p.top_logprobs, int(p.cache), p.point, p.thinking, t,
            top_p]


def _params(words: list[int]) -> Params:
    import numpy as np

    t, top_p = (float(x) for x in np.array(words[9:11], dtype=np.int32).view(np.float32))
    return Params(max_tokens=int(words[2]), temperature=t, top_p=top_p, seed=int(words[3]),
                  logprobs=bool(words[4]), top_logprobs=int(words[5]), cache=bool(words[6]), point=int(words[7]),
                  thinking=min(max(int(words[8]), 0), 2))


def broadcast(group, op: int, prompt: list[int] | None = None, params: Params | None = None):
    """Rank 0's (op, prompt, params) on every rank; the others pass nothing and block here while idle.
    Rank 0 keeps its own params; the others decode them from the header."""
    import mlx.core as mx

    if group is None or group.size() == 1:
        return op, prompt or [], params or Params()
    head = _words(op, len(prompt or []), params or Params()) if group.rank() == 0 else [0] * HEADER
    head = mx.distributed.all_sum(mx.array(head, dtype=mx.int32), group=group).tolist()
    op, n = int(head[0]), int(head[1])
    mine = params if group.rank() == 0 and params is not None else _params(head)
    if op != OP_GENERATE:
        return op, [], mine
    local = mx.array(prompt, dtype=mx.int32) if group.rank() == 0 else mx.zeros((n,), dtype=mx.int32)
    ids = mx.distributed.all_sum(local, group=group).tolist()
    return op, [int(t) for t in ids], mine


# --- health: one TCP connection from each rank to rank 0 (parallel/control.py) ----------------------------------


# --- rank 0's queue: the engine behind the HTTP side (protocol.Engine) ---------------------------------------


class RankEngine:
    """Requests wait here (a bounded queue) until rank 0's main loop takes them to the ranks, one at a time."""

    def __init__(self, max_queue: int = 8, stuck_after: float = 300.0):
        self.max_queue, self.stuck_after = max_queue, stuck_after
        self.cv = threading.Condition()
        self.waiting: deque[Handle] = deque()
        self.active: Handle | None = None
        self.state, self.reason = "loading", ""
        self.stopping = False
        self.progress_at = time.monotonic()
        self.info: dict[str, Any] = {"requests": 0, "pid": os.getpid()}

    # --- the HTTP side's calls (protocol.Engine)

    def submit(self, request: Request, sink: Sink) -> Handle:
        with self.cv:
            if self.state == "failed":
                raise EngineDown(self.reason)
            if self.state == "loading" or self.stopping:
                raise EngineDown("the ranks are still loading" if self.state == "loading" else "the ranks are stopping")
            if len(self.waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self.waiting)} requests already wait for the ranks (the queue holds "
                                 f"{self.max_queue}); try again shortly")
            h = Handle(request, sink)
            self.waiting.append(h)
            self.cv.notify_all()
            return h

    def cancel(self, handle: Handle) -> None:
        handle.cancelled.set()
        with self.cv:
            queued = handle in self.waiting
            if queued:
                self.waiting.remove(handle)
        if queued:
            handle.put(Done("cancelled", {}))

    def status(self) -> Status:
        with self.cv:
            info = dict(self.info, queued=len(self.waiting))
            if self.state != "ok":
                return Status(self.state, self.reason, info)
            if self.active is None and not self.waiting:
                return Status("ok", "", info)
            idle = time.monotonic() - self.progress_at
            if self.active is not None and idle > self.stuck_after:
                return Status("stuck", f"the running request made no progress for {idle:.0f} s "
                              f"(limit {self.stuck_after:.0f} s)", info)
            return Status("busy", "", info)

    def shutdown(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()

    # --- rank 0's main loop

    def ready(self, **info) -> None:
        with self.cv:
            self.info.update(info)
            if self.state == "loading":
                self.state = "ok"

    def next(self, timeout: float | None = None) -> Handle | None:
        """The next request not cancelled; None once shutdown was asked, or after `timeout` seconds without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            while True:
                while self.waiting and self.waiting[0].cancelled.is_set():
                    self.waiting.popleft().put(Done("cancelled", {}))
                if self.stopping:
                    return None
                if self.waiting and self.state == "ok":
                    self.active = self.waiting.popleft()
                    self.progress_at = time.monotonic()
                    return self.active
                if deadline is None:
                    self.cv.wait()
                elif not self.cv.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() >= deadline:
                    return None

    def touch(self) -> None:
        self.progress_at = time.monotonic()

    def finish(self, info: dict) -> None:
        with self.cv:
            job, self.active = self.active, None
            self.info.update({"requests": self.info["requests"] + 1, "weight_loads": info["weight_loads"],
                              "rank_pids": info["rank_pids"], "last": {k: v for k, v in info.items() if k != "ids"}})
        if job is not None:
            job.put(Done(info["finish_reason"], info))

    def fail(self, reason: str) -> None:
        with self.cv:
            if self.state == "failed":
                return
            self.state, self.reason = "failed", reason
            gone = ([self.active] if self.active else []) + list(self.waiting)
            self.active = None
            self.waiting.clear()
            self.cv.notify_all()
        for h in gone:  # requests running or waiting get the same answer
            h.put(Failed(reason))

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    def emitter(self, job: Handle) -> Callable[[tuple], None]:
        """Rank 0: run_request's events into the request's sink."""

        def emit(ev: tuple) -> None:
            self.progress_at = time.monotonic()
            if ev[0] == "prefill":
                job.put(Prefill(ev[1], ev[2]))
            elif ev[0] == "token":
                job.put(Token(ev[1], ev[2], ev[3]))

        return emit


# --- the rank's main --------------------------------------------------------------------------------------


def load_model(args, group) -> tuple[Any, Any, dict]:
    """(model, tokenizer, config) for this rank, as the one-request worker loads them (replaceable: the GPU
    bench builds random weights instead)."""
    from .worker import load, model_folder

    return load(model_folder(args.model, args.repo_id), args.mode, group, stage_ranges(args, group))


def stage_ranges(args, group) -> list[range] | None:
    """The pipeline's layer range per rank (None for other routes): the one split the load and the cache key use."""
    if args.mode != "pipeline" or group is None:
        return None
    from .split import pipeline_split
    from .worker import model_folder

    config = json.loads((model_folder(args.model, args.repo_id) / "config.json").read_text())
    return pipeline_split(config, group.size())


@dataclass
class Rank:
    """One rank's loaded share and its prefix cache: what the loop below runs requests on."""

    model: Any
    tokenizer: Any
    config: dict
    group: Any  # None: one rank
    pc: PrefixCache
    step: int
    loads: int = 1

    @property
    def index(self) -> int:
        return self.group.rank() if self.group is not None else 0

    @property
    def size(self) -> int:
        return self.group.size() if self.group is not None else 1

    @property
    def context(self) -> int | None:
        return int(self.config.get("max_position_embeddings") or 0) or None


def open_rank(args, group) -> Rank:
    """Load this rank's share once, and its prefix cache (in memory within the budget, and on this node's disk)."""
    import mlx.core as mx

    model, tokenizer, config = load_model(args, group)
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    disk = None
    if not args.no_disk_cache:
        from .prefix import node_store
        from .worker import model_folder

        rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
        ranges = stage_ranges(args, group)
        disk = node_store(model_folder(args.model, args.repo_id), args.mode, rank, size,
                          ranges[rank] if ranges else None)
    pc = PrefixCache(model, block=args.block, window=args.window, disk=disk, group=group,
                     budget=int(args.cache_memory_gb * (1 << 30)))
    return Rank(model, tokenizer, config, group, pc, args.prefill_step)


def rank_loop(r: Rank, engine: RankEngine | None, *, lost: Callable[[], None] = lambda: None,
              grace: float = 0.0, save_after: float = 2.0) -> None:
    """Run requests until rank 0 is told to stop: rank 0 takes them from `engine` and broadcasts each, every
    rank runs it in lockstep. A failure on rank 0 fails the engine (after `grace` seconds in which the control
    port may name a lost peer first) and calls lost(); on another rank it raises. A prefix to save on disk is
    written once rank 0 has waited `save_after` seconds with nothing to run (or at the stop), so a question that
    follows an answer never waits for the disk."""
    import mlx.core as mx

    from .worker import gather_ints, weight_bytes

    eos = set(r.tokenizer.eos_token_ids or [])
    while True:
        job = None
        if r.index == 0:
            job = engine.next(timeout=save_after if r.pc.pending is not None else None)
            if engine.failed:  # nothing more runs on the group; shutdown just ends this process
                if job is None:
                    break
                job.put(Failed(engine.reason))
                continue
        try:
            if r.index == 0:
                op = OP_GENERATE if job is not None else OP_STOP if engine.stopping else OP_SAVE
                op, prompt, params = broadcast(r.group, op, job.request.prompt if job else None,
                                               Params.of(job.request) if job else None)
            else:
                op, prompt, params = broadcast(r.group, 0)
            if op in (OP_STOP, OP_SAVE):
                r.pc.save_pending()
                if op == OP_STOP:
                    break
                continue
            mx.reset_peak_memory()
            emit = engine.emitter(job) if r.index == 0 else (lambda ev: None)
            asked = job.cancelled.is_set if r.index == 0 else (lambda: False)
            info = run_request(r.model, r.pc if params.cache else None, prompt, params, step=r.step, eos=eos,
                               emit=emit, stop_requested=asked, group=r.group)
            per_rank = gather_ints([r.loads, info["prefilled_tokens"], int(mx.get_peak_memory()),
                                    weight_bytes(r.model), os.getpid()], r.group)
        except Exception as e:  # noqa: BLE001 - a lost peer or a bad input: the deployment cannot go on
            if r.index != 0:
                raise
            end = time.monotonic() + grace  # a lost peer is usually the cause: let the control port name it
            while not engine.failed and time.monotonic() < end:
                time.sleep(0.05)
            engine.fail(f"rank 0 failed during a request: {type(e).__name__}: {e}")
            lost()
            r.pc.forget()
            continue
        if r.index == 0:
            info.update({"weight_loads": [x[0] for x in per_rank], "prefilled_per_rank": [x[1] for x in per_rank],
                         "peak_memory_bytes": [x[2] for x in per_rank], "weight_bytes": [x[3] for x in per_rank],
                         "rank_pids": [x[4] for x in per_rank]})
            engine.finish(info)
        r.pc.keep_to_budget()


def serve(args) -> int:
    """A rank of a deployment: rank 0 also serves HTTP (api.py) and the control port the others follow."""
    import mlx.core as mx

    group = None
    if args.mode != "single":
        group = mx.distributed.init(backend=args.backend, strict=True)
    rank, size = (group.rank(), group.size()) if group else (0, 1)
    stopping = threading.Event()
    engine = front = control = None
    if rank == 0:
        from . import api

        engine = RankEngine(max_queue=args.max_queue, stuck_after=args.stuck_after)
        def lost(reason: str) -> None:  # the deployment ends: the other ranks see their connection close
            engine.fail(reason)
            control.close()

        control = Control(args.control_bind, args.control_port, size - 1, lost)
        front = api.serve_http(api.Front(engine, args.model_id or args.model,
                                         os.environ.get("ARTHUR_RESIDENT_TOKEN", "")), args.bind, args.port)
    else:
        follow_control(args.control, rank, stopping)
    r = open_rank(args, group)
    if rank == 0:
        if not control.ready.wait(CONNECT_WAIT):
            engine.fail(f"only {len(control.peers)} of {size - 1} other ranks reached the control port")
        front.ready(r.tokenizer, args.context or r.context)
        engine.ready(ranks=size, mode=args.mode, weight_loads=[1] * size)
    rank_loop(r, engine, lost=control.close if control else (lambda: None), grace=2.0, save_after=args.save_after)
    stopping.set()
    if control:
        control.close()
    if front is not None:
        front.stop()
    return 0


class InProcess:
    """The same engine in a thread of this process, for one node without a server: `doc`, `demo` and `up`'s
    test question. The thread loads the model (MLX work stays on the thread that made its arrays) and then
    runs the rank loop; submit/cancel/status are the RankEngine's, as the HTTP side sees them on rank 0.
    `options`: the server's own command-line options (parser()), e.g. ["--no-disk-cache"]."""

    def __init__(self, model: str | Path, options: list[str] | None = None, load_timeout: float | None = None):
        self.args = parser().parse_args(["--model", str(model), "--port", "0", *(options or [])])
        self.engine = RankEngine(max_queue=self.args.max_queue, stuck_after=self.args.stuck_after)
        self.rank: Rank | None = None
        self.error: BaseException | None = None
        self._loaded = threading.Event()
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlx-rank", daemon=True)
        self._thread.start()
        if not self._loaded.wait(load_timeout):
            raise ServerError(f"{model}: not loaded within {load_timeout:.0f} s")
        if self.error is not None:
            raise ServerError(f"could not load {model}: {type(self.error).__name__}: {self.error}") from None

    def _run(self) -> None:
        try:
            self.rank = open_rank(self.args, None)
        except BaseException as e:  # noqa: BLE001 - reported to the caller waiting in __init__
            self.error = e
            self._loaded.set()
            self._release()
        self.engine.ready(ranks=1, mode="single", weight_loads=[1])
        self._loaded.set()
        try:
            rank_loop(self.rank, self.engine, save_after=self.args.save_after)
        finally:
            self._release()

    def _release(self) -> None:
        """Free the weights and caches on this thread, which made them, then park it for good: an MLX thread
        that has run a model and then ends makes the interpreter abort at exit (seen with mlx 0.32 on Linux),
        while a parked daemon thread is simply left behind."""
        import gc

        import mlx.core as mx

        self.rank = None
        gc.collect()
        mx.clear_cache()
        self._released.set()
        threading.Event().wait()

    @property
    def tokenizer(self):
        return self.rank.tokenizer

    @property
    def model(self):
        return self.rank.model

    def close(self, wait: float = 30.0) -> None:
        """Stop after the running request (cancelled first); the weights go with the thread's last reference."""
        self.engine.shutdown()
        with self.engine.cv:
            active = self.engine.active
        if active is not None:
            active.cancelled.set()
        if threading.current_thread() is not self._thread:  # a finalizer may run on any thread, this one too
            self._released.wait(wait)

    @property
    def closed(self) -> bool:
        return self._released.is_set()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m arthur_cluster.parallel.server")
    p.add_argument("--model", required=True, help="the model folder")
    p.add_argument("--model-id", help="the id clients use (default: --model)")
    p.add_argument("--repo-id", help="where the folder is missing: find this repo id in the HF cache")
    p.add_argument("--mode", choices=("single", "pipeline", "tensor"), default="single")
    p.add_argument("--backend", default="ring")
    p.add_argument("--bind", default="127.0.0.1", help="rank 0's HTTP address")
    p.add_argument("--port", type=int, required=True, help="rank 0's HTTP port")
    p.add_argument("--control", default="", help="other ranks: rank 0's control address host:port")
    p.add_argument("--control-bind", default="127.0.0.1", help="rank 0: the control port's address")
    p.add_argument("--control-port", type=int, default=0)
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--block", type=int, default=128, help="prefix cache: restore points every this many tokens")
    p.add_argument("--no-disk-cache", action="store_true", help="keep prefixes in memory only")
    p.add_argument("--cache-memory-gb", type=float, default=4.0,
                   help="prefix cache: GB of documents each rank keeps in memory (least recently used go first)")
    p.add_argument("--save-after", type=float, default=2.0, help="prefix cache: seconds idle before a prefix "
                   "asked twice is written to disk (a request that comes first runs first)")
    p.add_argument("--window", type=int, default=2048, help="prefix cache: ... within the prompt's last tokens")
    p.add_argument("--context", type=int, default=0, help="tokens of context (default: the model's config)")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait; more are answered 429")
    p.add_argument("--stuck-after", type=float, default=300.0,
                   help="seconds without progress before /health calls the running request stuck")
    p.add_argument("--deployment", default="", help="the deployment's id: marks its processes (`down` checks it "
                   "before it signals one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import faulthandler

    from .ownership import claim

    claim()  # the lock file this rank inherited names its pid from now on
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack to the rank's log
    try:
        return serve(args)
    except Exception as e:  # noqa: BLE001 - one line in the rank's log, then a non-zero exit
        sys.stderr.write(f"rank {os.environ.get('MLX_RANK', '0')} failed: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
