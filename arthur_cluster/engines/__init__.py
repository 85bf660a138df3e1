"""Engines that run a model: MlxEngine (local or distributed ranks) and ExoEngine (exo's HTTP API)."""

from .base import ChatResult, Engine, EngineError, Event, Stats

__all__ = ["ChatResult", "Engine", "EngineError", "Event", "Stats"]
