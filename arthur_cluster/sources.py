"""Discovery: the model folders LM Studio, the Hugging Face cache and exo's model directories hold.

Listing is cheap (directory walks, no file contents); `modelfiles.inspect` does the reading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import paths, safeio
from .errors import ArthurError

MAX_NAME = 4096  # a model name or path given on the command line (PATH_MAX)


class SourceError(ArthurError, ValueError):
    """A model name that cannot name anything; the message says why and what to give instead."""

ALL_SOURCES = ("lmstudio", "hf-cache", "exo")


@dataclass(frozen=True)
class Found:
    """One model folder and where it was found."""

    repo_id: str
    path: Path
    source: str  # lmstudio | hf-cache | exo
    linked: bool = False  # a link made by the linker (HF cache entry or exo link), not a real copy


def _is_model_dir(folder: Path) -> bool:
    try:
        return any(
            e.name == "config.json" or e.name.endswith((".safetensors", ".gguf")) for e in os.scandir(folder)
        )
    except OSError:
        return False


def lmstudio(models_dir: Path | None = None) -> list[Found]:
    """<models>/<publisher>/<repo>/ — exactly two levels, as LM Studio stores them."""
    root = models_dir or paths.lmstudio_models()
    out: list[Found] = []
    for pub in _subdirs(root):
        for repo in _subdirs(pub):
            if _is_model_dir(repo):
                out.append(Found(f"{_display(pub.name)}/{_display(repo.name)}", repo, "lmstudio"))
    return out


def hf_cache(cache_dir: Path | None = None) -> list[Found]:
    """models--org--name/snapshots/<refs/main> entries (the revision mlx-lm and the hub resolve)."""
    root = cache_dir or paths.hf_cache()
    out: list[Found] = []
    for repo in _subdirs(root):
        if not repo.name.startswith("models--") or "--" not in repo.name[len("models--"):]:
            continue
        repo_id = _display(repo.name[len("models--"):].replace("--", "/", 1))
        try:
            commit = safeio.read_regular(repo / "refs" / "main", 1024).decode("ascii")
        except (OSError, UnicodeDecodeError):
            continue
        if not commit or "/" in commit or "\0" in commit or commit in (".", ".."):
            continue
        snap = repo / "snapshots" / commit
        if snap.is_dir():
            out.append(Found(repo_id, snap, "hf-cache", linked=_linked_by_us(repo)))
    return out


def exo(dirs: list[Path] | None = None) -> list[Found]:
    """<dir>/<org>--<name>/ in every directory exo searches."""
    out: list[Found] = []
    for root in dirs if dirs is not None else paths.exo_models_dirs():
        for entry in _subdirs(root):
            if "--" in entry.name and _is_model_dir(entry):
                # the linker's entries: a folder of file links with a record beside it (older: a directory link)
                ours = entry.is_symlink() or (root / ".arthur-cluster" / f"{entry.name}.json").is_file()
                out.append(Found(entry.name.replace("--", "/", 1), entry, "exo", linked=ours))
    return out


def discover(sources: tuple[str, ...] = ALL_SOURCES, *, lmstudio_dir: Path | None = None,
             hf_cache_dir: Path | None = None, exo_dirs: list[Path] | None = None) -> list[Found]:
    found: list[Found] = []
    if "lmstudio" in sources:
        found += lmstudio(lmstudio_dir)
    if "hf-cache" in sources:
        found += hf_cache(hf_cache_dir)
    if "exo" in sources:
        found += exo(exo_dirs)
    return found


def resolve(name: str, found: list[Found]) -> list[Found]:
    """Entries matching a repo id, a case-insensitive id, a unique name suffix, or a folder path."""
    if len(name) > MAX_NAME or "\0" in name:
        raise SourceError(f"a model name of {len(name)} characters (the cap is {MAX_NAME}, no NUL) names nothing; "
                          "give org/name, a short name, or a folder path (`arthur-cluster models` lists them)")
    p = Path(name).expanduser()
    if is_dir(p) and _is_model_dir(p):
        return [Found(repo_id_of(p), p.resolve(), "path")]
    exact = [f for f in found if f.repo_id == name]
    if exact:
        return exact
    lower = name.lower()
    ci = [f for f in found if f.repo_id.lower() == lower]
    if ci:
        return ci
    return [f for f in found if f.repo_id.lower().split("/", 1)[-1] == lower]


def is_dir(p: Path) -> bool:
    """Path.is_dir that answers False for names the OS refuses (too long, bad bytes) instead of raising."""
    try:
        return p.is_dir()
    except (OSError, ValueError):
        return False


def _display(name: str) -> str:
    """A folder name as text: bytes that are not UTF-8 shown escaped (the id is then refused where it matters)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def repo_id_of(folder: Path) -> str:
    """The repo id a model folder stands for, from its layout: an HF cache snapshot
    (models--org--name/snapshots/<commit>), exo's org--name, or LM Studio's publisher/repo."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name[len("models--"):].replace("--", "/", 1)
    if "--" in folder.name:
        return folder.name.replace("--", "/", 1)
    return f"{folder.parent.name}/{folder.name}"


def _linked_by_us(repo: Path) -> bool:
    return (repo / paths.LINK_MARKER).is_file()


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(
            (Path(e.path) for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir()),
            key=lambda p: p.name,
        )
    except OSError:
        return []
