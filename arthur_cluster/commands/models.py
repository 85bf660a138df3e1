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
        return f"{r['format'].upper()}: not runnable by MLX or exo"
    if r["problems"]:
        return r["problems"][0] + (f" (+{len(r['problems']) - 1} more: --json)" if len(r["problems"]) > 1 else "")
    return "ok"


def _linked(places: list[str]) -> str:
    """Where a model is linked, as short labels (the paths are in --json)."""
    kinds = ["hf" if "models--" in p else "exo" for p in places]
    return ",".join(dict.fromkeys(kinds)) or "-"


def table(rows: list[dict]):
    """One line per model within 120 columns: long names and problems are cut with an ellipsis (--json has
    everything)."""
    from rich.table import Table

    t = Table(title=f"{len(rows)} model(s)", padding=(0, 1), box=None, header_style="bold")
    widths = {"model": 40, "source": 8, "arch": 10, "layers": 12, "params": 7, "quant": 9, "size": 8, "ctx": 7,
              "linked": 6, "status": 26}
    for col, w in widths.items():
        t.add_column(col, no_wrap=True, overflow="ellipsis", max_width=w)
    for r in rows:
        q = r["quantization"]
        t.add_row(
            r["repo_id"], r["source"] + ("*" if r["linked_entry"] else ""), r["architecture"] or "-",
            _layers(r["layers"]), f"{r['parameters'] / 1e9:.2f}B" if r["parameters"] else "-",
            f"{q['bits']}b g{q['group_size']}" if q else "-", _out.human_bytes(r["bytes"]),
            str(r["context_length"] or "-"), _linked(r["linked_at"]),
            _status(r) if r["tokenizer"] or r["format"] != "mlx" else "no tokenizer",
        )
    return t


def _lms_dir() -> Path:
    from .. import paths

    return paths.lmstudio_models()
