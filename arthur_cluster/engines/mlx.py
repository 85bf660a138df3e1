"""MlxEngine: the one MLX engine, the rank loop of parallel/server.py, spoken to in one of two places.

- In this process (one node, no server): the loop runs in a thread here (server.InProcess) with its prefix cache
  in memory and on this node's disk; stream() and stream_ids() submit requests to it directly.
- A deployment's resident ranks (`endpoint`: rank 0's HTTP address): stream() posts an OpenAI-style streaming
  chat completion and turns its server-sent events (and its `: prefill d/t` comments) into Events; the ranks
  keep the weights and the same prefix cache between calls, so nothing is loaded here.

Several nodes, pipeline or tensor, always run as resident ranks (parallel/resident.py starts them); the probe's
short proof keeps its own one-request launcher (parallel/worker.py).
"""

from __future__ import annotations

import json
import queue
import time
import weakref
from pathlib import Path
from typing import Iterator

from .base import EngineError, Event, Message, Stats

IDLE_TIMEOUT = 600.0  # seconds without a byte or an event from the ranks (a prefill event comes per chunk)


def _error_text(resp) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:300]


def resolve_model(model: str | Path) -> Path:
    """A local MLX folder, or a Hugging Face repo id already in the local cache."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EngineError(f"{p}: no config.json; pass an MLX model folder or a cached repo id")
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception as e:
        raise EngineError(f"model {model!r} is neither a folder nor in the local Hugging Face cache "
                          f"({type(e).__name__}); link or download it first") from None


def _stats(info: dict, finish: str | None) -> Stats:
    peaks = [p for p in info.get("peak_memory_bytes") or [] if p is not None]
    return Stats(prompt_tokens=info.get("prompt_tokens", 0), generation_tokens=len(info.get("ids") or []),
                 prompt_tps=info.get("prompt_tps", 0.0), generation_tps=info.get("generation_tps", 0.0),
                 peak_memory_bytes=max(peaks) if peaks else None, finish_reason=finish,
                 cached_tokens=info.get("cached_tokens", 0), cache_source=info.get("cache", ""))


class MlxEngine:
    name = "mlx"

    def __init__(self, model: str | Path, *, endpoint: str | None = None, model_id: str | None = None,
                 prefill_step: int = 2048, timeout: float = 3600.0, disk_cache: bool = True,
                 cache_memory_gb: float = 4.0, options: list[str] | None = None):
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.model_id = model_id or str(model)
        self.timeout = timeout
        self.ranks = self.tokenizer = None
        self.last_done: dict | None = None  # the last answer's facts (per-rank memory, cache use, pids)
        if endpoint:
            self.path = Path(model)
            return  # the resident ranks hold the model
        from ..parallel.server import InProcess, ServerError

        self.path = resolve_model(model)
        # the server's own options: `options` (tests, benches) may set any other, e.g. the cache's --block
        options = ["--prefill-step", str(prefill_step), "--cache-memory-gb", str(cache_memory_gb),
                   *([] if disk_cache else ["--no-disk-cache"]), *(options or [])]
        try:
            self.ranks = InProcess(self.path, options)
        except ServerError as e:
            raise EngineError(str(e)) from None
        self.tokenizer = self.ranks.tokenizer
        # an engine dropped without close() still has its thread free the weights (waiting for it: an MLX thread
        # still freeing arrays while the interpreter exits aborts it); at exit the thread is left as it is
        self._finalizer = weakref.finalize(self, self.ranks.close)
        self._finalizer.atexit = False

    @property
    def model(self):
        """The loaded model in this process; it lives on the engine's thread (MLX streams belong to the thread
        that made the arrays), so run it through stream_ids, not here."""
        return self.ranks.model if self.ranks is not None else None

    # --- streaming -------------------------------------------------------------------------------------

    def stream(self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0,
               enable_thinking: bool | None = None) -> Iterator[Event]:
        if self.endpoint:
            return self._stream_http(messages, max_tokens, temperature, enable_thinking)
        if self.ranks is None:
            raise EngineError("the engine is closed")
        return self.stream_ids(self.prompt(messages, enable_thinking), max_tokens=max_tokens,
                               temperature=temperature, enable_thinking=enable_thinking)

    def prompt(self, messages: list[Message], enable_thinking: bool | None = None) -> list[int]:
        """The token ids of a chat, with the model's template (as rank 0's HTTP side builds them)."""
        from ..parallel.worker import encode_request

        return encode_request(self.tokenizer, {"messages": messages, "enable_thinking": enable_thinking})

    def stream_ids(self, prompt: list[int], *, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
                   cache: bool = True, point: int = 0, enable_thinking: bool | None = None) -> Iterator[Event]:
        """Token ids in, text out (in this process): the rank loop's events as Events; the text is the model's
        own, thinking markers included. cache=False runs on a throwaway cache and keeps nothing; `point`: where
        a prefix this caller will send again ends (a document before its question), kept as a restore point;
        enable_thinking: the template flag `prompt` was rendered with (part of the prefix cache's key)."""
        from ..parallel.protocol import Done, EngineBusy, EngineDown, Failed, Prefill, Request

        if self.ranks is None:
            raise EngineError("the engine is closed" if not self.endpoint else
                              "token ids go to the engine in this process; the resident ranks take messages")
        events: queue.SimpleQueue = queue.SimpleQueue()
        try:
            handle = self.ranks.engine.submit(Request(prompt=list(prompt), max_tokens=max_tokens,
                                                      temperature=temperature, seed=seed, cache=cache, point=point,
                                                      enable_thinking=enable_thinking),
                                               events.put)
        except (EngineBusy, EngineDown, ValueError) as e:
            raise EngineError(f"{self.model_id}: {e}") from None
        eos = set(self.tokenizer.eos_token_ids or [])
        detok = self.tokenizer.detokenizer
        detok.reset()
        finished = False
        try:
            while True:
                try:
                    ev = events.get(timeout=IDLE_TIMEOUT)
                except queue.Empty:
                    raise EngineError(f"{self.model_id}: no progress for {IDLE_TIMEOUT:.0f} s") from None
                if isinstance(ev, Prefill):
                    yield Event("prefill", done=ev.done, total=ev.total)
                elif isinstance(ev, Failed):
                    finished = True
                    raise EngineError(f"{self.model_id}: {ev.message}")
                elif isinstance(ev, Done):
                    finished = True
                    detok.finalize()
                    if seg := detok.last_segment:  # reading it takes it: read once
                        yield Event("token", text=seg)
                    self.last_done = ev.info
                    finish = "length" if ev.finish_reason == "cancelled" else ev.finish_reason
                    yield Event("done", stats=_stats(ev.info, finish))
                    return
                elif ev.id not in eos:
                    detok.add_token(ev.id)
                    if seg := detok.last_segment:
                        yield Event("token", text=seg)
        finally:
            if not finished:  # the caller stopped reading (Ctrl-C, an error): stop the ranks too
                self.ranks.engine.cancel(handle)

    def _stream_http(self, messages, max_tokens, temperature, enable_thinking) -> Iterator[Event]:
        import requests

        body = {"model": self.model_id, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
        if enable_thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": enable_thinking}
        url = self.endpoint + "/v1/chat/completions"
        self._thinking, self._finish = False, None
        deadline = time.monotonic() + self.timeout
        try:
            resp = requests.post(url, json=body, stream=True, timeout=(10, IDLE_TIMEOUT))
        except requests.RequestException as e:
            raise EngineError(f"nothing answers at {url} ({type(e).__name__}): the resident ranks of {self.model_id} "
                              "are not running; `arthur-cluster down`, then `up` again") from None
        try:
            if resp.status_code != 200:
                raise EngineError(f"rank 0 at {self.endpoint} answered {resp.status_code}: {_error_text(resp)}")
            for line in resp.iter_lines(decode_unicode=True):
                if time.monotonic() > deadline:
                    raise EngineError(f"no complete answer from {self.endpoint} within {self.timeout:.0f} s")
                if line.startswith(": prefill "):
                    done, total = line[len(": prefill "):].split("/")
                    yield Event("prefill", done=int(done), total=int(total))
                elif line.startswith("data: ") and line != "data: [DONE]":
                    yield from self._chunk_events(json.loads(line[6:]))
        except requests.RequestException as e:
            raise EngineError(f"the answer from {self.endpoint} broke off ({type(e).__name__}: {e})") from None
        finally:
            resp.close()

    def _chunk_events(self, obj: dict) -> Iterator[Event]:
        """One chunk: its text, and after the last one (usage, asked with stream_options) the done event."""
        if "error" in obj:
            raise EngineError(f"rank 0 at {self.endpoint}: {obj['error'].get('message')}")
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            thought, text = delta.get("reasoning") or "", delta.get("content") or ""
            if thought:  # as the model wrote it: thinking, then its end marker, then the answer (docjob splits)
                self._thinking = True
                yield Event("token", text=thought)
            if text:
                if self._thinking:
                    self._thinking = False
                    text = "</think>" + text
                yield Event("token", text=text)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        if obj.get("usage"):
            info, usage = obj.get("arthur") or {}, obj["usage"]
            self.last_done = info
            peaks = info.get("peak_memory_bytes") or []
            yield Event("done", stats=Stats(
                prompt_tokens=usage.get("prompt_tokens", 0), generation_tokens=usage.get("completion_tokens", 0),
                prompt_tps=info.get("prompt_tps", 0.0), generation_tps=info.get("generation_tps", 0.0),
                peak_memory_bytes=max(peaks) if peaks else None, finish_reason=self._finish,
                cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)))

    @property
    def rank_pids(self) -> list[int]:
        """Process ids of the ranks, as of the last answer."""
        return list((self.last_done or {}).get("rank_pids") or [])

    def close(self) -> None:
        if self.ranks is not None:
            self._finalizer.detach()
            self.ranks.close()
            self.ranks = None
        self.tokenizer = None

    def __enter__(self) -> "MlxEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MlxEngine", "resolve_model"]
