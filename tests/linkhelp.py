"""Helpers shared by the linker tests: exact pictures of folders, content hashes, a linked model."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import typer

from arthur_cluster import linker, modelfiles
from arthur_cluster.commands import _errors, link as link_cmd


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root without following links: type, size, mtime and link target."""
    out: dict[str, tuple] = {}
    if not os.path.lexists(root):
        return out
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", st.st_size, st.st_mtime_ns)
    return out


def content_hashes(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def inspect(folder: Path, repo_id: str) -> modelfiles.ModelInfo:
    return modelfiles.inspect(folder, repo_id=repo_id, source="lmstudio")


def do_link(folder: Path, repo_id: str, **kw) -> linker.LinkResult:
    return linker.link(inspect(folder, repo_id), **kw)


def cli_app() -> typer.Typer:
    """Only the linker's commands, as the real CLI registers them."""
    app = typer.Typer()
    link_cmd.register(app)
    _errors.guard_all(app)
    return app
