"""One error path for every command: the project's own errors and the parsing errors of what a command reads
become one line naming the file and the fix (`{"error": ...}` with --json); a traceback only with --debug."""

from __future__ import annotations

import functools
import json
import tomllib
import traceback
from pathlib import Path
from typing import Any, Callable

import typer

from ..errors import ArthurError
from . import _out

DEBUG = {"on": False}  # set by the global --debug option (cli.py)


def _file_in_traceback(exc: BaseException) -> Path | None:
    """The innermost frame's Path-valued local of a telling name: parsing errors do not carry their file."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        for name in ("path", "file", "f", "meta_file", "folder", "source"):
            v = frame.f_locals.get(name)
            if isinstance(v, Path):
                found = v
                break
    return found


def _where(exc: BaseException) -> str:
    f = _file_in_traceback(exc)
    return f"{f}: " if f else ""


def message(exc: BaseException) -> str | None:
    """The one line for `exc`, or None when it is not an error the user can cause (a bug: let it raise)."""
    from pydantic import ValidationError

    if isinstance(exc, ArthurError):
        return str(exc)
    if isinstance(exc, json.JSONDecodeError):
        return (f"{_where(exc)}not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                "fix or remove the file")
    if isinstance(exc, tomllib.TOMLDecodeError):
        return f"{_where(exc)}not valid TOML ({exc}); fix the file"
    if isinstance(exc, ValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ())) or exc.title
        return (f"{_where(exc)}unexpected data: {loc}: {first.get('msg', exc)} ({exc.error_count()} problem(s)); "
                "fix the file, or check the server's version")
    if isinstance(exc, UnicodeDecodeError):
        return f"{_where(exc)}not UTF-8 (byte {exc.start}); convert it to UTF-8 (iconv -t UTF-8) or remove it"
    if isinstance(exc, RecursionError):
        return (f"{_where(exc)}nested too deeply to read (JSON or TOML nesting past Python's limit); "
                "the file is damaged or hostile: replace it")
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}; check the path and its permissions"
    return None


def guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so that the errors above print as one line and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - sorted below: known kinds print, the rest re-raise
            text = message(exc)
            if text is None or DEBUG["on"]:
                raise
            _out.fail(text, as_json=bool(kwargs.get("as_json")))

    return wrapper


def guard_all(app: typer.Typer) -> None:
    for cmd in app.registered_commands:
        if cmd.callback is not None and not getattr(cmd.callback, "__wrapped__", None):
            cmd.callback = guarded(cmd.callback)
