"""Etags as the Hugging Face hub names blobs: sha256 of the content for LFS files, git blob sha1 otherwise.

Hashing streams the file (fixed memory whatever its size) and reports progress; results are cached by
(path, size, mtime_ns) so a second `link --hash` of an unchanged 31 GB model reads nothing. Pseudo etags
are stable names derived from where a file is and how big and how old it is: free to compute, and
enough for offline use (only an online lookup of a newer Hub commit would then re-download).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Literal

from . import paths, safeio

# The Hub stores files of 10 MB and more in LFS, and every file matching its default .gitattributes.
LFS_MIN_BYTES = 10 * 1024 * 1024
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".model", ".npy", ".npz",
    ".pkl", ".pickle", ".tflite", ".ot", ".arrow", ".parquet", ".zip", ".tar", ".gz", ".xz", ".zst", ".mlmodel",
)
CHUNK = 4 * 1024 * 1024  # large reads keep the hash loop in C, near the disk's speed

EtagMode = Literal["true", "pseudo"]
Progress = Callable[[int, str], None]  # (bytes just read, file name)


def is_lfs(name: str, size: int) -> bool:
    return size >= LFS_MIN_BYTES or name.lower().endswith(LFS_SUFFIXES)


def _stream(path: Path, h, progress: Progress | None, name: str) -> str:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with safeio.open_regular(path) as f:  # a FIFO put in a file's place would block the read forever
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress:
                progress(n, name)
    return h.hexdigest()


def sha256_file(path: Path, progress: Progress | None = None, name: str = "") -> str:
    return _stream(path, hashlib.sha256(), progress, name)


def git_blob_sha1(path: Path, size: int, progress: Progress | None = None, name: str = "") -> str:
    """`git hash-object`: sha1 over b"blob <size>\\0" followed by the content."""
    h = hashlib.sha1(b"blob %d\0" % size)
    return _stream(path, h, progress, name)


def true_etag(path: Path, name: str, size: int, progress: Progress | None = None) -> str:
    if is_lfs(name, size):
        return sha256_file(path, progress, name)
    return git_blob_sha1(path, size, progress, name)


def pseudo_etag(source: Path, name: str, size: int, mtime_ns: int) -> str:
    """Stable stand-in with the shape of the real one (64 hex for LFS files, 40 otherwise)."""
    key = f"arthur-cluster pseudo etag\0{source}\0{name}\0{size}\0{mtime_ns}".encode("utf-8", "surrogateescape")
    digest = hashlib.sha256(key).hexdigest()
    return digest if is_lfs(name, size) else digest[:40]


def is_etag(value: str) -> bool:
    return len(value) in (40, 64) and all(c in "0123456789abcdef" for c in value)


# --- cache -----------------------------------------------------------------------------------------


def cache_file() -> Path:
    return paths.state_dir() / "etag-cache.json"


class EtagCache:
    """True etags by (real path, size, mtime_ns); a changed file simply misses."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_file()
        self.entries: dict[str, str] = {}
        self.dirty = False
        try:
            data = safeio.read_json(self.path)
            if isinstance(data, dict) and isinstance(data.get("etags"), dict):
                self.entries = {k: v for k, v in data["etags"].items() if isinstance(v, str) and is_etag(v)}
        except (OSError, ValueError):
            pass  # a missing or damaged cache only costs a re-hash

    @staticmethod
    def key(path: Path, size: int, mtime_ns: int) -> str:
        return f"{os.path.realpath(path)}\0{size}\0{mtime_ns}"

    def get(self, path: Path, size: int, mtime_ns: int) -> str | None:
        return self.entries.get(self.key(path, size, mtime_ns))

    def put(self, path: Path, size: int, mtime_ns: int, etag: str) -> None:
        self.entries[self.key(path, size, mtime_ns)] = etag
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".etag-cache.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "etags": self.entries}, f)
        os.replace(tmp, self.path)
        self.dirty = False


def etag_for(path: Path, name: str, size: int, mtime_ns: int, *, true_hash: bool, cache: EtagCache | None = None,
             progress: Progress | None = None) -> tuple[str, EtagMode]:
    """The etag a file gets in the cache. Small non-LFS files are always hashed for real: it is cheap,
    and a correct etag lets an online hub reuse the blob."""
    if not true_hash and is_lfs(name, size):
        return pseudo_etag(path, name, size, mtime_ns), "pseudo"
    if cache is not None and (hit := cache.get(path, size, mtime_ns)):
        if progress:
            progress(size, name)
        return hit, "true"
    etag = true_etag(path, name, size, progress)
    # A file rewritten while we read it would poison the cache: keep the result only if it held still.
    st = os.stat(path)
    if cache is not None and st.st_size == size and st.st_mtime_ns == mtime_ns:
        cache.put(path, size, mtime_ns, etag)
    return etag, "true"
