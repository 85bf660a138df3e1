"""The prefix cache of one rank (one process included): several documents in memory within a byte budget, least
recently used dropped first, and restore points saved on this node's disk.

A request's token ids are compared with each kept entry's last prompt; the entry sharing the longest usable prefix
is rewound to its last restore point p <= that prefix (and p < len(prompt), so one token is left to give the first
logits) and only prompt[p:] is prefilled. Attention layers (KVCache) rewind by trimming to p. Mamba layers
(ArraysCache: conv and SSM state) cannot rewind, so at each restore point their state is copied; restoring puts
copies of the copies back, so the saved point survives the next request too. Restore points are the multiples of
`block` in the last `window` tokens of a prompt (prefill chunks are cut there): a document followed by a question
shorter than `window - block` tokens always finds one past the document's end minus `block` tokens. A prompt
sharing no usable prefix with any entry starts a new entry (from disk when saved there, else empty); entries
beyond the budget go, least recently used first, never the one in use.

Every decision is made alike on every rank, so the ranks stay in step: which entry and point follow from the token
ids alone; whether a shard is on disk and whether the budget is exceeded are agreed over the group.

On disk (`DiskStore`): a point that a request resumed from is a prefix shared by two prompts (a document asked
twice), so after that request each rank saves its shard of the cache at that point (after the answer: `flush`).
The file name hashes everything that changes the answer besides the token ids: the model files (config and each
weight file's name, size, mtime, inode and ctime, so weights replaced in place are noticed), the route, this
rank's layer range (a pipeline stage) and place in the group, and the request's template flags; the same
identity is stored in the file and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "2"  # bump when the file layout or the key changes
DEFAULT_BUDGET = 4 << 30  # bytes of cached prefixes per rank


def files_identity(folder: Path) -> str:
    """Which weights: the folder, its config and every weight file's name, size, mtime, inode and ctime.

    Hashing 30 GB of weights per start is too slow; a re-download, an edit or a file copied over the old one in
    place (even with its mtime put back) changes one of these, which only costs a recomputed prefill.
    """
    folder = Path(folder).resolve()
    h = hashlib.sha256(str(folder).encode())
    try:
        h.update((folder / "config.json").read_bytes())
    except OSError:
        pass
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}".encode())
    return h.hexdigest()


def rank_identity(files: str, route: str, rank: int, size: int, layers: range | None = None) -> str:
    """The identity of one rank's shards: model files, route, place in the group and pipeline layer range."""
    span = f"{layers.start}-{layers.stop}" if layers is not None else "all"
    return f"{files}:{route}:{rank}/{size}:layers={span}"


def node_store(folder: Path, route: str, rank: int = 0, size: int = 1, layers: range | None = None) -> "DiskStore":
    """This node's saved prefixes for one rank of a route on the weights in `folder`."""
    from .. import paths

    return DiskStore(paths.prompt_cache_dir() / "resident", rank_identity(files_identity(folder), route, rank, size,
                                                                          layers))


def restore_points(n: int, block: int, window: int, extra: int = 0) -> list[int]:
    """The restore points of an n-token prompt: multiples of `block` within its last `window` tokens, and `extra`
    (the end of a prefix the caller will send again, e.g. a document), all before n."""
    points = {p for p in range(block, n, block) if p > n - window}
    if 0 < extra < n:
        points.add(extra)
    return sorted(points)


def template_flags(flags: dict[str, Any] | None) -> str:
    """Template flags (e.g. enable_thinking) as a stable string for the key."""
    return json.dumps(flags or {}, sort_keys=True, separators=(",", ":"))


def thinking_flags(enable_thinking: bool | None) -> str:
    """The key's flags for a prompt rendered with this enable_thinking (None: the template's default)."""
    return template_flags({} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)})


def _copy(x):
    """A new array with the same values (None stays None): a snapshot never shares a buffer with the cache."""
    import mlx.core as mx

    return None if x is None else (x + 0 if mx.issubdtype(x.dtype, mx.number) else mx.array(x))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def all_ranks(flags: list[int], group) -> list[int]:
    """Each flag set on every rank (a rank decides nothing alone: the ranks must stay in step)."""
    import mlx.core as mx

    if group is None or group.size() == 1 or not flags:
        return flags
    return [int(x) for x in mx.distributed.all_min(mx.array(flags, dtype=mx.int32), group=group).tolist()]


class DiskStore:
    """One rank's saved prefixes on its own disk: a file per (identity, template flags, prefix tokens),
    written atomically (beside the target, then renamed)."""

    def __init__(self, folder: Path, identity: str):
        self.folder, self.identity = Path(folder), identity

    def paths(self, prompt: list[int], points: list[int], flags: str = "") -> dict[int, Path]:
        """The file for each prefix length in `points` (ascending), hashed in one pass over the prompt."""
        from array import array

        h = hashlib.sha256(f"{FORMAT}:resident:{self.identity}:{flags}:".encode())
        out, done = {}, 0
        for p in points:
            h.update(array("i", prompt[done:p]).tobytes())
            done = p
            out[p] = self.folder / f"{h.copy().hexdigest()[:32]}.safetensors"
        return out

    def longest(self, prompt: list[int], block: int, window: int, flags: str = "", extra: int = 0) -> int:
        """The longest restore point of `prompt` saved here (0: none): how much of it a run would not prefill."""
        points = restore_points(len(prompt), block, window, extra)
        files = self.paths(prompt, points, flags)
        return max((p for p in points if files[p].is_file()), default=0)

    def save(self, path: Path, shard: list[Any], tokens: int, flags: str) -> None:
        from mlx_lm.models.cache import save_prompt_cache

        meta = {"tokens": str(tokens), "model": self.identity, "flags": flags, "format": FORMAT}
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")  # a killed rank leaves no half file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_prompt_cache(str(tmp), shard, meta)
            os.replace(tmp, path)
        except (OSError, RuntimeError):
            pass  # a full or read-only disk only costs a later prefill
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, path: Path, tokens: int, flags: str, layers: int) -> list[Any] | None:
        """The shard in `path` when it is this identity's, these flags' and this length's; else None."""
        from mlx_lm.models.cache import load_prompt_cache

        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
        except Exception:  # noqa: BLE001 - a damaged or foreign file: prefill instead
            return None
        ok = (meta.get("tokens") == str(tokens) and meta.get("model") == self.identity
              and meta.get("flags") == flags and meta.get("format") == FORMAT and len(cache) == layers)
        return cache if ok else None


@dataclass
class Entry:
    """One document's cache: the last prompt run on it, its layers' caches and its restore points."""
    tokens: list[int]
    cache: list[Any]
    flags: str = ""
    points: dict[int, list[Any]] = field(default_factory=dict)  # point -> per layer: copied Mamba state or None

    @property
    def nbytes(self) -> int:
        saved = sum(x.nbytes for s in self.points.values() for layer in s if layer is not None
                    for x in layer[0] if x is not None)
        return sum(_nbytes(c) for c in self.cache) + saved


def _nbytes(c) -> int:
    if c.is_trimmable():
        return int(c.nbytes)
    return sum(x.nbytes for x in c.state[0] if x is not None)  # Mamba conv and SSM state (or a stage's link)


class PrefixCache:
    """See the module's docstring. `budget`: bytes of entries this rank keeps (the one in use always stays)."""

    def __init__(self, model: Any, block: int = 128, window: int = 2048, disk: DiskStore | None = None,
                 group=None, budget: int = DEFAULT_BUDGET):
        self.model, self.block, self.window, self.disk, self.group = model, block, window, disk, group
        self.budget = budget
        self.entries: list[Entry] = []  # least recently used first
        self.pending: tuple[Path, int, list[Any], str] | None = None  # a shard to save once answered
        self.source = "new"  # where the last begin() found its prefix: "memory", "disk" or "new" (nothing)
        self.extra = 0  # the request's own restore point (begin's `extra`)

    # the entry in use: the most recently used one
    @property
    def current(self) -> Entry | None:
        return self.entries[-1] if self.entries else None

    @property
    def cache(self) -> list[Any] | None:
        return self.current.cache if self.current else None

    @property
    def tokens(self) -> list[int]:
        return self.current.tokens if self.current else []

    def begin(self, prompt: list[int], flags: str = "", extra: int = 0) -> tuple[list[Any], int]:
        """The cache to run `prompt` with and how many of its tokens are already in it. `extra`: one more restore
        point for this prompt (where the caller's shared prefix ends), besides the block multiples."""
        self._evict()
        self.extra = extra if 0 < extra < len(prompt) else 0
        best, start = None, 0
        for e in self.entries:
            if e.flags != flags:
                continue
            limit = min(common_prefix(e.tokens, prompt), len(prompt) - 1)
            p = max((p for p in e.points if p <= limit), default=0)
            if p > start:
                best, start = e, p
        if best is None:
            from mlx_lm.models.cache import make_prompt_cache

            best = Entry(list(prompt), make_prompt_cache(self.model), flags)
            self.entries.append(best)
            start = self._from_disk(best, prompt)  # may replace its cache
            self.source = "disk" if start else "new"
            return best.cache, start
        self.source = "memory"
        self.entries.remove(best)
        self.entries.append(best)
        best.tokens = list(prompt)
        for c, saved in zip(best.cache, best.points[start]):
            if c.is_trimmable():
                c.trim(c.offset - start)
            else:
                c.state = ([_copy(x) for x in saved[0]], *saved[1:])
        # what lies past `start` is overwritten now; points far before the new prompt's end are not needed again
        best.points = {p: s for p, s in best.points.items() if p == start or len(prompt) - self.window < p < start}
        if self.disk is not None:
            path = self.disk.paths(prompt, [start], flags)[start]
            if not path.is_file():
                self.pending = (path, start, [_shard_copy(c) for c in best.cache], flags)
        return best.cache, start

    def _evict(self) -> None:
        """Drop least recently used entries while any rank is over its budget (the current one stays). Entries grow
        while a request runs, so this runs before the next one and after each answer."""
        while len(self.entries) > 1:
            within = sum(e.nbytes for e in self.entries) <= self.budget
            if all_ranks([int(within)], self.group)[0]:
                return
            self.entries.pop(0)

    def _from_disk(self, entry: Entry, prompt: list[int]) -> int:
        """Resume from the longest restore point saved on every rank's disk; 0 when none (nothing changes)."""
        if self.disk is None:
            return 0
        points = restore_points(len(prompt), self.block, self.window, self.extra)
        files = self.disk.paths(prompt, points, entry.flags)
        found = all_ranks([int(files[p].is_file()) for p in points], self.group)
        best = max((p for p, ok in zip(points, found) if ok), default=0)
        if not best:
            return 0
        cache = self.disk.load(files[best], best, entry.flags, len(entry.cache))
        if not all(all_ranks([int(cache is not None)], self.group)):
            return 0
        entry.cache = cache
        self.save_point(best)
        return best

    def flush(self) -> None:
        """Keep to the budget, and write the shard a request resumed from (the rank loop does the two apart: the
        budget after each answer, the disk write once the rank is idle)."""
        self.keep_to_budget()
        self.save_pending()

    def keep_to_budget(self) -> None:
        self._evict()

    def save_pending(self) -> None:
        """Write the shard the last resumed request started from (copied then); a later one replaces it unsaved."""
        if self.pending is None:
            return
        path, start, shard, flags = self.pending
        self.pending = None
        self.disk.save(path, shard, start, flags)

    def is_point(self, done: int, total: int) -> bool:
        return (done % self.block == 0 and done > total - self.window) or done == self.extra

    def next_cut(self, done: int, total: int) -> int | None:
        """The first restore point after `done` (prefill chunks end there), or None."""
        p = (done // self.block + 1) * self.block
        p = max(p, ((total - self.window) // self.block + 1) * self.block)
        if done < self.extra < p:
            p = self.extra
        return p if p < total else None

    def save_point(self, done: int) -> None:
        import mlx.core as mx

        entry = self.current
        saved = [None if c.is_trimmable() else ([_copy(x) for x in c.state[0]], *c.state[1:])
                 for c in entry.cache]
        mx.eval([s[0] for s in saved if s is not None])
        entry.points[done] = saved

    def forget(self) -> None:
        self.entries, self.pending = [], None


def _shard_copy(c):
    """A copy of one layer's cache as it stands (KV trimmed to its offset), as a plain mlx-lm cache object."""
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache

    if c.is_trimmable():
        out = KVCache()
        if c.keys is not None:
            n = c.offset
            out.keys, out.values, out.offset = _copy(c.keys[..., :n, :]), _copy(c.values[..., :n, :]), n
            mx.eval(out.keys, out.values)
        return out
    out = ArraysCache(size=len(c.state[0]))  # also for a pipeline stage's link cache: it loads as this class
    out.state = ([_copy(x) for x in c.state[0]], *c.state[1:])
    mx.eval([x for x in out.state[0] if x is not None])
    return out
