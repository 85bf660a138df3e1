"""`arthur-cluster models`: every model found, known from its headers."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from . import _out


def inventory(sources: tuple[str, ...], lmstudio_dir: Path | None, hf_cache: Path | None) -> list[dict]:
    from .. import linker, modelfiles
    from .. import sources as src

    rows = []
    for found in src.discover(sources, lmstudio_dir=lmstudio_dir, hf_cache_dir=hf_cache):
        info = modelfiles.inspect(found.path, repo_id=found.repo_id, source=found.source)
        rows.append({
            "repo_id": found.repo_id,
            "source": found.source,
            "linked_entry": found.linked,
            "path": str(found.path),
            "format": info.format,
            "architecture": info.model_type,
            "layers": info.layer_counts,
            "parameters": info.parameters,
            "quantization": info.quantization.model_dump() if info.quantization else None,
            "bytes": info.weight_bytes,
            "context_length": info.context_length,
            "tokenizer": info.tokenizer,
            "chat_template": info.chat_template,
            "linked_at": linker.where_linked(found.repo_id) if found.source == "lmstudio" else [],
            "problems": [str(p) for p in info.problems],
        })
    return rows


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models_cmd(
        source: list[str] = typer.Option(
            ["lmstudio", "hf-cache", "exo"], "--source", help="Where to look: lmstudio, hf-cache, exo (repeatable)."
        ),
        lmstudio_dir: Optional[Path] = typer.Option(None, "--lmstudio-dir", help="LM Studio models folder."),
        hf_cache: Optional[Path] = typer.Option(None, "--hf-cache", help="Hugging Face hub cache folder."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """List every model found (LM Studio, Hugging Face cache, exo), inspected from headers only."""
        bad = [s for s in source if s not in ("lmstudio", "hf-cache", "exo")]
        if bad:
            _out.fail(f"unknown source {bad[0]!r}; use lmstudio, hf-cache or exo", code=_out.EXIT_USAGE,
                      as_json=as_json)
        rows = inventory(tuple(source), lmstudio_dir, hf_cache)
        if as_json:
            _out.print_json(rows)
            return
        if not rows:
            _out.console.print("No models found. LM Studio folder: "
                               f"{lmstudio_dir or _lms_dir()} (set --lmstudio-dir or ARTHUR_LMSTUDIO_MODELS).")
            return
        print_table(rows)


def _status(r: dict) -> str:
    """A word for the table; the problems themselves are listed under it."""
    if r["format"] != "mlx":
        return r["format"].upper()
    if r["problems"]:
        return "bad"
    return "ok" if r["tokenizer"] else "no tok"


def _problem(r: dict) -> str | None:
    if r["format"] != "mlx":
        return f"{r['format'].upper()}: LM Studio runs it; MLX and exo run MLX safetensors folders only"
    if r["problems"]:
        return "; ".join(r["problems"][:2]) + (f" (+{len(r['problems']) - 2} more)" if len(r["problems"]) > 2 else "")
    return None if r["tokenizer"] else "no tokenizer files: MLX cannot run it"


def _linked(places: list[str]) -> str:
    """Where a model is linked, as short labels (the paths are in --json)."""
    kinds = ["hf" if "models--" in p else "exo" for p in places]
    return ",".join(dict.fromkeys(kinds)) or "-"


def _context(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def _quant(q: dict | None) -> str:
    return f"{q['bits']}bit" if q else "-"


SOURCE_SHORT = {"lmstudio": "lms", "hf-cache": "hf", "exo": "exo", "path": "path"}
# Widths for 80 columns with one space between columns; the model column folds long names (never cut).
WIDTHS = {"src": 4, "arch": 10, "quant": 5, "size": 8, "ctx": 5, "linked": 6, "state": 5}
WIDTH = 80
LEGEND = ("src: lms LM Studio, hf Hugging Face cache, exo exo's folders; hf*/exo* an entry `arthur-cluster link` "
          "made (listed once, on its LM Studio row); linked: where it is linked; quant: bits per weight; ctx: "
          "tokens of context. Layers, parameters and paths: --json.")


def once(rows: list[dict]) -> list[dict]:
    """Each model once: an entry the linker made is its LM Studio source's, whose row says where it is linked."""
    sourced = {r["repo_id"] for r in rows if r["source"] == "lmstudio"}
    return [r for r in rows if not (r["linked_entry"] and r["repo_id"] in sourced)]


def table(rows: list[dict]):
    """One row per model within 80 columns (--json has everything)."""
    from rich.table import Table

    shown = once(rows)
    t = Table(title=f"{len(shown)} model(s)", title_justify="left", box=None, padding=(0, 1), collapse_padding=True,
              pad_edge=False, header_style="bold")
    name_width = WIDTH - sum(WIDTHS.values()) - len(WIDTHS)
    t.add_column("model", overflow="fold", max_width=name_width)
    for col, w in WIDTHS.items():
        t.add_column(col, no_wrap=True, overflow="ellipsis", max_width=w)
    for r in shown:
        src = SOURCE_SHORT.get(r["source"], r["source"]) + ("*" if r["linked_entry"] else "")
        t.add_row(escape(_name(r["repo_id"], name_width)), src, r["architecture"] or "-", _quant(r["quantization"]),
                  _out.human_bytes(r["bytes"]), _context(r["context_length"]), _linked(r["linked_at"]), _status(r))
    return t


def _name(repo_id: str, width: int) -> str:
    """A long id breaks after its org, so the short name (what every command accepts) stays on one line."""
    return repo_id.replace("/", "/\n", 1) if len(repo_id) > width else repo_id


def print_table(rows: list[dict]) -> None:
    c = _out.console
    c.print(table(rows), width=WIDTH)
    problems = [(r["repo_id"], p) for r in once(rows) if (p := _problem(r))]
    for rid, p in problems:
        c.print(textwrap.fill(f"{rid}: {p}", WIDTH, initial_indent="  ", subsequent_indent="    "), highlight=False,
                markup=False)
    c.print(textwrap.fill(LEGEND, WIDTH), highlight=False, markup=False, style="dim")


def _lms_dir() -> Path:
    from .. import paths

    return paths.lmstudio_models()
