"""Help text people read: a flag shows no value type, and an option's value is named in the user's words
(`--exo URL`, `--out DIR`), not as Python types (`<bool>`, `<str>`)."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer
import typer.core
from typer.models import OptionInfo

# The value of each option, by its long name; the rest are named by their type below.
VALUES = {
    "--exo": "URL", "--ask": "QUESTION", "--route": "ROUTE", "--model": "MODEL", "--fallback": "MODEL",
    "--repo-id": "ORG/NAME", "--thinking": "on|off", "--engine": "exo|mlx", "--sharding": "single|pipeline|tensor",
    "--backend": "ring|jaccl|nccl", "--bind": "HOST[:PORT]", "--source": "lmstudio|hf-cache|exo",
    "--out": "DIR", "--home": "DIR", "--hf-cache": "DIR", "--exo-dir": "DIR", "--cards-dir": "DIR",
    "--lmstudio-dir": "DIR", "--catalog": "FILE", "--prompt-file": "FILE", "--context": "TOKENS",
    "--max-tokens": "TOKENS", "--nodes": "N", "--ranks": "N", "--timeout": "SECONDS",
}
BY_TYPE = {int: "N", float: "NUMBER", Path: "PATH"}


def _value_name(info: OptionInfo, annotation) -> str:
    long = next((d for d in info.param_decls if d.startswith("--")), "")
    if long.split("/")[0] in VALUES:
        return VALUES[long.split("/")[0]]
    for kind, name in BY_TYPE.items():
        if kind is annotation or kind in getattr(annotation, "__args__", ()):
            return name
    return "TEXT"


def _no_type_for_flags(cls):
    """typer prints a type after every parameter, flags (--help, --json: <bool>) and arguments (<str>, whose
    name already says what they are) included: those print none."""
    own = cls.display_type_rich

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) or isinstance(self, typer.core.TyperArgument):
            return None
        return own(self, ctx)

    cls.display_type_rich = display_type_rich


_no_type_for_flags(typer.core.TyperOption)
_no_type_for_flags(typer.core.TyperArgument)


def name_values(app: typer.Typer) -> None:
    """Name each option's value in the user's words (the default would be <str>, <int>, <path>)."""
    for cmd in app.registered_commands:
        fn = inspect.unwrap(cmd.callback) if cmd.callback else None
        if fn is None:
            continue
        for param in inspect.signature(fn).parameters.values():
            info = param.default
            if not isinstance(info, OptionInfo) or info.metavar is not None:
                continue
            if param.annotation in (bool, "bool") or isinstance(info.default, bool):
                continue  # a flag: no value to name
            info.metavar = _value_name(info, param.annotation)
