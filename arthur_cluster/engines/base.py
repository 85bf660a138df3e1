"""The one small protocol every engine speaks, and the values it streams."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, Protocol, runtime_checkable

from ..errors import ArthurError

Message = dict[str, str]  # {"role": ..., "content": ...}


class EngineError(ArthurError, RuntimeError):
    """A model could not be loaded or could not answer; the message says where and what to do."""


@dataclass
class Stats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_bytes: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error"
    cached_tokens: int = 0  # prompt tokens a prefix cache held, so they were not prefilled again
    cache_source: str = ""  # the MLX engine: where the prefix came from ("memory", "disk", "new", "none")


@dataclass
class Event:
    """One streamed step: prefill progress, a piece of text, or the end with its stats."""

    kind: Literal["prefill", "token", "done"]
    text: str = ""
    done: int = 0  # prefill: tokens processed so far
    total: int = 0  # prefill: tokens to process
    stats: Stats | None = None


@dataclass
class ChatResult:
    text: str
    stats: Stats = field(default_factory=Stats)


@runtime_checkable
class Engine(Protocol):
    name: str  # "mlx" | "exo"
    model_id: str

    def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        enable_thinking: bool | None = None,
    ) -> Iterator[Event]: ...

    def close(self) -> None: ...


def collect(events: Iterator[Event]) -> ChatResult:
    """Drain a stream into the full text and its final stats."""
    parts: list[str] = []
    stats = Stats()
    for ev in events:
        if ev.kind == "token":
            parts.append(ev.text)
        elif ev.kind == "done" and ev.stats is not None:
            stats = ev.stats
    return ChatResult("".join(parts), stats)
