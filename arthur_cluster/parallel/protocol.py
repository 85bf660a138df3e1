"""The boundary between rank 0's HTTP side (api.py) and the ranks that generate (server.py).

The HTTP side turns a client's request into a `Request` (token ids and bounded sampling values, checked here so
that nothing unbounded ever reaches a collective), submits it, and reads `Event`s back through a sink it passes
along; `cancel()` stops it on every rank. `Status` is what /health reports.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ArthurError

SEED_MAX = 2**31 - 1  # seeds travel as int32 words
TOP_LOGPROBS_MAX = 20  # as OpenAI's own limit
TOKEN_MAX = 2**31 - 1


class EngineBusy(ArthurError, RuntimeError):
    """The queue of waiting requests is full: the caller should come back later."""


class EngineDown(ArthurError, RuntimeError):
    """The ranks are loading or have failed: nothing can run."""


class Request(BaseModel):
    """One generation, as every rank runs it. Every field bounded: validated on rank 0, before any collective."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)

    prompt: list[int] = Field(min_length=1)
    max_tokens: int = Field(ge=1, le=TOKEN_MAX)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=TOP_LOGPROBS_MAX)
    cache: bool = True  # use and extend the prefix cache; False: a throwaway cache (warm-ups, --no-cache jobs)
    point: int = Field(default=0, ge=0, le=TOKEN_MAX)  # a restore point to keep: where a prefix asked again ends
    enable_thinking: bool | None = None  # the template flag the prompt was rendered with (in the cache's key)


# --- events, from the engine to the HTTP side ------------------------------------------------------------


@dataclass(frozen=True)
class Prefill:
    done: int
    total: int


@dataclass(frozen=True)
class Token:
    id: int
    logprob: float | None = None  # the token's log probability under the model (before temperature), if asked
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob) of the most likely tokens, if asked


@dataclass(frozen=True)
class Done:
    finish_reason: Literal["stop", "length", "cancelled"]
    info: dict  # token counts, cache use, speeds, per-rank facts (the "arthur" object of the answer)


@dataclass(frozen=True)
class Failed:
    message: str


Event = Union[Prefill, Token, Done, Failed]
Sink = Callable[[Event], None]  # called from the engine's thread; must not block


_ids = itertools.count(1)


@dataclass
class Handle:
    """One submitted request: where its events go and whether it should stop."""

    request: Request
    sink: Sink
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    def put(self, ev: Event) -> None:
        if isinstance(ev, (Done, Failed)):
            if self.finished:
                return
            self.finished = True
        self.sink(ev)


@dataclass(frozen=True)
class Status:
    """ok: idle and ready; busy: a request runs (or waits); loading; stuck: the running request made no progress
    for a while; failed: the deployment cannot go on (reason says why)."""

    status: Literal["ok", "busy", "loading", "stuck", "failed"]
    reason: str = ""
    info: dict = field(default_factory=dict)


class Engine(Protocol):
    def submit(self, request: Request, sink: Sink) -> Handle:
        """Queue a request; raises EngineBusy when the queue is full, EngineDown when nothing can run."""

    def cancel(self, handle: Handle) -> None:
        """Stop the request on every rank (at the next agreed check) or drop it from the queue."""

    def status(self) -> Status: ...


__all__ = ["Request", "Prefill", "Token", "Done", "Failed", "Event", "Sink", "Handle", "Status", "Engine",
           "EngineBusy", "EngineDown", "SEED_MAX", "TOP_LOGPROBS_MAX"]
