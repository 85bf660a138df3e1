"""The document prefix cache: prefill a document once, answer many questions from it.

After the prefix is prefilled the cache is snapshotted. Attention layers (KVCache) are trimmable, so the
snapshot is just their length, and restoring trims them back. Mamba layers (ArraysCache) hold a recurrent
state that cannot be rewound, so the snapshot keeps the state arrays themselves; the model replaces (never
edits) those arrays on each step, so keeping references is enough. A prefix cache is also saved to disk, keyed
by the model's identity and the prefix tokens (which carry the document, the system prompt and the template),
so a later job on the same document skips the prefill.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.generate import generation_stream
from mlx_lm.models import cache as mlc

from . import paths
from .errors import ArthurError

Progress = Callable[[int, int], None]
FORMAT = "1"  # bump when the file layout or the key changes


class PromptCacheError(ArthurError, RuntimeError):
    """A prompt cache file cannot be used; the message names it and the fix."""


def model_identity(folder: Path) -> str:
    """Which weights a cache belongs to (parallel.prefix.files_identity: config, weight files' name, size, mtime,
    inode and ctime)."""
    from .parallel.prefix import files_identity

    return files_identity(folder)


def prefix_key(identity: str, tokens: list[int]) -> str:
    h = hashlib.sha256(f"{FORMAT}:{identity}:".encode())
    h.update(json.dumps(tokens).encode())
    return h.hexdigest()[:32]


def prefill(model: Any, tokens: list[int], cache: list[Any], *, step: int = 2048,
            progress: Progress | None = None) -> None:
    """Run every token through the model into `cache`, in steps of `step` tokens (as mlx-lm does)."""
    total, done = len(tokens), 0
    arr = mx.array(tokens)
    with mx.stream(generation_stream):
        while done < total:
            n = min(step, total - done)
            model(arr[done:done + n][None], cache=cache)
            mx.eval([c.state for c in cache])
            done += n
            if progress:
                progress(done, total)
            mx.clear_cache()


@dataclass
class Snapshot:
    kinds: list[str]  # "trim" or "state" per layer
    values: list[Any]  # the length to trim back to, or the saved state


def snapshot(cache: list[Any]) -> Snapshot:
    kinds, values = [], []
    for c in cache:
        if c.is_trimmable():
            kinds.append("trim")
            values.append(c.offset)
        else:
            kinds.append("state")
            values.append(tree_map(lambda x: x, c.state))  # new containers, the same (immutable) arrays
    return Snapshot(kinds, values)


def restore(cache: list[Any], snap: Snapshot) -> None:
    for c, kind, value in zip(cache, snap.kinds, snap.values):
        if kind == "trim":
            c.trim(c.offset - value)
        else:
            c.state = tree_map(lambda x: x, value)


class DocumentCache:
    """A model's cache holding a prefilled prefix; `ready()` rewinds it to the end of the prefix."""

    def __init__(self, cache: list[Any], length: int, key: str, source: str):
        self.cache = cache
        self.length = length
        self.key = key
        self.source = source  # "prefill" | "disk"
        self.uses = 0
        self._snap = snapshot(cache)

    def ready(self) -> list[Any]:
        if self.uses:
            restore(self.cache, self._snap)
        self.uses += 1
        return self.cache

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)


def cache_file(key: str, folder: Path | None = None) -> Path:
    return (folder or paths.prompt_cache_dir()) / f"{key}.safetensors"


def save(path: Path, cache: list[Any], metadata: dict[str, str]) -> None:
    """Atomic: written beside the target, then renamed, so a killed job never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        mlc.save_prompt_cache(str(tmp), cache, {k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, length: int) -> list[Any] | None:
    """The cache in `path`, or None when absent or unusable (a wrong length or a damaged file is recomputed)."""
    if not path.is_file():
        return None
    try:
        cache, meta = mlc.load_prompt_cache(str(path), return_metadata=True)
    except Exception:  # noqa: BLE001 - any unreadable file means: prefill again
        return None
    if meta.get("tokens") != str(length) or meta.get("format") != FORMAT:
        return None
    return cache


def obtain(model: Any, identity: str, tokens: list[int], *, step: int = 2048, disk: bool = True,
           folder: Path | None = None, progress: Progress | None = None,
           metadata: dict[str, str] | None = None) -> DocumentCache:
    """The prefix cache for `tokens`: from disk when saved before, else prefilled now (and saved)."""
    key = prefix_key(identity, tokens)
    path = cache_file(key, folder)
    if disk:
        cache = load(path, len(tokens))
        if cache is not None:
            if progress:
                progress(len(tokens), len(tokens))
            return DocumentCache(cache, len(tokens), key, "disk")
    cache = mlc.make_prompt_cache(model)
    prefill(model, tokens, cache, step=step, progress=progress)
    if disk:
        meta = {**(metadata or {}), "tokens": str(len(tokens)), "format": FORMAT, "model": identity,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            save(path, cache, meta)
        except (OSError, RuntimeError):
            pass  # the disk copy only saves a later job's prefill; a full or read-only disk must not end this one
    return DocumentCache(cache, len(tokens), key, "prefill")
