"""Printing helpers shared by the commands: JSON for --json, rich tables otherwise, clean errors."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

# Exit codes shared by every command, so scripts can tell a refusal from a crash.
EXIT_OK = 0
EXIT_ERROR = 1  # bad input, a problem found (doctor), a failed operation
EXIT_USAGE = 2  # typer/click's own code for wrong arguments
EXIT_BLOCKED = 3  # the probe: the asked route cannot run here
EXIT_UNKNOWN = 4  # the probe: not known whether it runs (e.g. an exo route with no exo to ask)


def plain(obj: Any) -> Any:
    """Turn typed values (pydantic, dataclasses, paths) into JSON-ready data."""
    if hasattr(obj, "model_dump"):
        return plain(obj.model_dump(mode="json"))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(plain(obj), indent=2, ensure_ascii=False) + "\n")


def fail(message: str, *, code: int = EXIT_ERROR, as_json: bool = False) -> NoReturn:
    """Print a one-line error (or {"error": ...} with --json) and exit."""
    if as_json:
        print_json({"error": message})
    else:
        # escaped: messages quote files and sections such as models.toml's [demo], which rich would eat as markup
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def human_bytes(n: int | float | None) -> str:
    """For tables: "-" when unknown."""
    from ..memory import human_bytes as text

    return "-" if n is None else text(n)
