"""ExoEngine: a model already placed on an exo cluster, spoken to over exo's chat stream."""

from __future__ import annotations

from typing import Iterator

from ..exo_client import ExoClient, ExoError, GenerationStats, StreamEvent, Usage
from .base import EngineError, Event, Message, Stats

THINK_END = "</think>"


class ExoEngine:
    """Streams Events from exo: prefill from `prefill_progress`, tokens from deltas, done with Stats.

    Reasoning text (reasoning_content) is passed on as tokens and closed with "</think>" when the answer
    starts, so the text matches what the same model prints through mlx-lm directly (the chat template
    opens the <think> block in the prompt). The engine does not own the instance: close() leaves it running.
    """

    name = "exo"

    def __init__(self, client: ExoClient, model_id: str):
        self.client = client
        self.model_id = model_id

    def stream(self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0,
               enable_thinking: bool | None = None) -> Iterator[Event]:
        usage: Usage | None = None
        gen: GenerationStats | None = None
        finish: str | None = None
        in_reasoning = False
        try:
            for ev in self.client.stream_chat(self.model_id, messages, max_tokens=max_tokens,
                                              temperature=temperature, enable_thinking=enable_thinking):
                if ev.kind == "prefill":
                    yield Event("prefill", done=ev.processed, total=ev.total)
                elif ev.kind == "delta":
                    yield from self._tokens(ev, in_reasoning)
                    in_reasoning = bool(ev.reasoning) and not ev.content
                elif ev.kind == "finish":
                    finish, usage = ev.finish_reason, ev.usage
                elif ev.kind == "stats":
                    gen = ev.stats
        except ExoError as exc:
            raise EngineError(f"exo could not answer with {self.model_id}: {exc}") from None
        yield Event("done", stats=_stats(usage, gen, finish))

    @staticmethod
    def _tokens(ev: StreamEvent, in_reasoning: bool) -> Iterator[Event]:
        if ev.reasoning:
            yield Event("token", text=ev.reasoning)
        if ev.content:
            if in_reasoning or ev.reasoning:
                yield Event("token", text=THINK_END)
            yield Event("token", text=ev.content)

    def close(self) -> None:
        """Nothing to release: the instance belongs to the cluster (bring-up's `down` deletes it)."""


def _stats(usage: Usage | None, gen: GenerationStats | None, finish: str | None) -> Stats:
    s = Stats(finish_reason=finish)
    if usage is not None:
        s.prompt_tokens, s.generation_tokens = usage.prompt_tokens, usage.completion_tokens
    if gen is not None:
        s.prompt_tps, s.generation_tps = gen.prompt_tps, gen.generation_tps
        s.peak_memory_bytes = gen.peak_memory_bytes
        s.prompt_tokens = s.prompt_tokens or gen.prompt_tokens
        s.generation_tokens = s.generation_tokens or gen.generation_tokens
    return s
