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


def _quant(q: dict | None) -> str:
    if not q:
        return "-"
    return f"{q['bits']}-bit g{q['group_size']} {q['mode']}"


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
        from rich.table import Table

        table = Table(title=f"{len(rows)} model(s)")
        for col in ("model", "source", "format", "arch", "layers", "params", "quant", "size", "ctx", "tok/tmpl",
                    "linked", "problems"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(
                r["repo_id"], r["source"] + (" (link)" if r["linked_entry"] else ""), r["format"],
                r["architecture"] or "-", _layers(r["layers"]),
                f"{r['parameters'] / 1e9:.2f}B" if r["parameters"] else "-", _quant(r["quantization"]),
                _out.human_bytes(r["bytes"]), str(r["context_length"] or "-"),
                ("yes" if r["tokenizer"] else "no") + "/" + ("yes" if r["chat_template"] else "no"),
                "\n".join(r["linked_at"]) or "-",
                "\n".join(r["problems"]) or "ok",
            )
        _out.console.print(table)


def _lms_dir() -> Path:
    from .. import paths

    return paths.lmstudio_models()
