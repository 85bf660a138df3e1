"""One model-name resolver for every command: a folder path, a repo id (any case), or a unique short name
(the part after the slash) found in LM Studio, the Hugging Face cache or exo's folders."""

from __future__ import annotations

from . import sources
from .errors import ArthurError

MAX_NAME = 1024  # longer than any path or repo id a filesystem or the hub accepts


class ModelNameError(ArthurError, ValueError):
    """A model name that cannot name anything (empty, too long, ambiguous)."""


class NotAFolder(ModelNameError):
    """A path that exists (or is written as a path) but is not a model folder."""


def check(name: str, what: str = "model name") -> str:
    """Refuse names that could only be mistakes: empty (it would mean the current directory), huge, NUL."""
    if not name or not name.strip():
        raise ModelNameError(f"an empty {what}: give a model folder, a repo id (org/name) or a short name; "
                             "`arthur-cluster models` lists them")
    if len(name) > MAX_NAME:
        raise ModelNameError(f"a {what} of {len(name):,} characters is past the cap of {MAX_NAME:,}; "
                             "give a model folder, a repo id or a short name")
    if "\0" in name:
        raise ModelNameError(f"the {what} {name[:60]!r} holds a NUL character; give a folder or repo id")
    return name


def find(name: str, found: list[sources.Found] | None = None) -> sources.Found | None:
    """The model `name` stands for, or None when nothing on disk matches. Several repo ids matching a short
    name is an error that lists them."""
    check(name)
    try:
        hits = sources.resolve(name, sources.discover() if found is None else found)
    except OSError as e:  # a path the OS refuses (a name too long for it, a bad byte)
        raise ModelNameError(f"{name[:80]}: cannot be used as a path ({e.strerror}); give a repo id or a folder") \
            from None
    ids = list(dict.fromkeys(f.repo_id for f in hits))
    if len(ids) > 1:
        raise ModelNameError(f"{name!r} matches {', '.join(ids)}; give the full repo id")
    return hits[0] if hits else None


def canonical(name: str, found: list[sources.Found] | None = None) -> str:
    """The repo id for a short name or folder found on disk; the name itself when nothing matches (the
    catalogue, exo or the hub may still know it)."""
    hit = find(name, found)
    return hit.repo_id if hit is not None else name


def resolve(name: str, found: list[sources.Found] | None = None) -> tuple[str, "Path | None"]:
    """The one resolver of a model name: (repo id, its folder on this machine or None). A folder path gives
    its repo id; a repo id or short name is looked up on disk; a name nothing matches comes back as itself
    with no folder (the catalogue, exo or the hub may still know it). A path that is not a folder is refused."""
    from pathlib import Path

    check(name)
    p = Path(name).expanduser()
    try:
        is_dir = p.is_dir()
    except OSError:
        is_dir = False
    if is_dir:
        return sources.repo_id_of(p), p.resolve()
    if p.exists() or name.startswith((".", "/", "~")):
        raise NotAFolder(f"{name[:200]}: not a model folder")
    hit = find(name, found)
    return (hit.repo_id, hit.path) if hit is not None else (name, None)
