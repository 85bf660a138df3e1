"""`arthur-cluster models`: every model found, known from its headers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

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


def _layers(counts: dict[str, int]) -> str:
    short = {"mamba": "M", "moe": "E", "attention": "*", "mlp": "-"}
    return " ".join(f"{short.get(k, k)}{v}" for k, v in counts.items())


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
        _out.console.print(table(rows))


def _status(r: dict) -> str:
    if r["format"] != "mlx":
        return f"{r['format'].upper()}: not for MLX/exo"
    if r["problems"]:
        return r["problems"][0] + (f" (+{len(r['problems']) - 1})" if len(r["problems"]) > 1 else "")
    return "ok" if r["tokenizer"] else "no tokenizer"


def _linked(places: list[str]) -> str:
    """Where a model is linked, as short labels (the paths are in --json)."""
    kinds = ["hf" if "models--" in p else "exo" for p in places]
    return ",".join(dict.fromkeys(kinds)) or "-"


def _params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


SOURCE_SHORT = {"lmstudio": "lms", "hf-cache": "hf", "exo": "exo", "path": "path"}
# Fixed widths for 120 columns (one space between columns); the status column takes the rest.
WIDTHS = {"model": 32, "src": 5, "arch": 10, "layers": 10, "params": 6, "quant": 6, "size": 7, "ctx": 7,
          "linked": 6}


def table(rows: list[dict]):
    """One line per model within 120 columns: long names and problems are cut with an ellipsis (--json has
    everything; * after the source marks an entry the linker made)."""
    from rich.table import Table

    t = Table(title=f"{len(rows)} model(s)", box=None, padding=(0, 1), collapse_padding=True, pad_edge=False,
              header_style="bold")
    for col, w in WIDTHS.items():
        t.add_column(col, no_wrap=True, overflow="ellipsis", min_width=w, max_width=w)
    t.add_column("status", no_wrap=True, overflow="ellipsis", max_width=120 - sum(WIDTHS.values()) - len(WIDTHS))
    for r in rows:
        q = r["quantization"]
        t.add_row(
            r["repo_id"], SOURCE_SHORT.get(r["source"], r["source"]) + ("*" if r["linked_entry"] else ""),
            r["architecture"] or "-", _layers(r["layers"]),
            _params(r["parameters"]),
            f"{q['bits']}b g{q['group_size']}" if q else "-", _out.human_bytes(r["bytes"]),
            str(r["context_length"] or "-"), _linked(r["linked_at"]), _status(r),
        )
    return t


def _lms_dir() -> Path:
    from .. import paths

    return paths.lmstudio_models()
