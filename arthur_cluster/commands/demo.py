"""`arthur-cluster demo`: the whole path on a demo library, in a temporary home, on this machine."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

import typer

from . import _out


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        home: Optional[Path] = typer.Option(
            None, "--home", help="Folder for the demo home (default: a new temporary folder, removed at the end)."
        ),
        keep: bool = typer.Option(False, "--keep", help="Keep the temporary home and print where it is."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON record of every step."),
    ) -> None:
        """Build a demo LM Studio library (tiny NemotronH and Llama, random weights), then discover, inspect
        and link it into a temporary Hugging Face cache and exo directory, and show the result."""
        from .. import catalog, demo

        root = home or Path(tempfile.mkdtemp(prefix="arthur-demo-"))
        dhome = demo.home_at(root.resolve())
        demo.activate(dhome)
        record: dict = {"home": str(dhome.root)}
        try:
            cat = catalog.load()
            _step_library(dhome, cat, record, as_json)
            _step_models(dhome, record, as_json)
            _step_link(dhome, cat, record, as_json)
        except catalog.CatalogError as e:
            _out.fail(str(e), as_json=as_json)
        finally:
            if home is None and not keep:
                shutil.rmtree(root, ignore_errors=True)
            elif not as_json:
                _out.console.print(f"Demo home kept at {root}")
        if as_json:
            _out.print_json(record)


def _say(as_json: bool, text: str) -> None:
    if not as_json:
        _out.console.print(text)


def _step_library(dhome, cat, record: dict, as_json: bool) -> None:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from .. import demo

    _say(as_json, f"[bold]1. Demo library[/] in {dhome.lmstudio_models}")
    ids = cat.for_demo().candidates()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), disable=as_json, transient=True) as bar:
        task = bar.add_task(f"building {len(ids)} miniature models", total=len(ids))
        built = demo.build_library(dhome, cat, on_model=lambda rid, _: bar.advance(task))
    record["library"] = [str(p) for p in built]
    for rid in ids:
        _say(as_json, f"   built {rid}")


def _step_models(dhome, record: dict, as_json: bool) -> None:
    from .models import inventory

    _say(as_json, "[bold]2. Discover and inspect[/] (headers only)")
    rows = inventory(("lmstudio",), None, None)
    record["models"] = rows
    for r in rows:
        q = r["quantization"]
        quant = f"{q['bits']}-bit" if q else "unquantized"
        state = "ok" if not r["problems"] else "; ".join(r["problems"])
        _say(as_json, f"   {r['repo_id']}: {r['architecture']}, {r['parameters']:,} parameters, {quant}, "
                      f"{_out.human_bytes(r['bytes'])}, context {r['context_length']}: {state}")


def _step_link(dhome, cat, record: dict, as_json: bool) -> None:
    from .. import linker, modelfiles, sources

    _say(as_json, f"[bold]3. Link[/] into {dhome.hf_cache} and exo's read-only directory")
    results = []
    for found in sources.lmstudio():
        info = modelfiles.require_ok(modelfiles.inspect(found.path, repo_id=found.repo_id, source="lmstudio"))
        res = linker.link(info)
        results.append(res)
        _say(as_json, f"   {found.repo_id}: HF cache {res.snapshot}, exo {res.exo_link or '-'}"
                      + "".join(f"\n   warning: {w}" for w in res.warnings))
    record["links"] = results
    if results and results[-1].env_line:
        _say(as_json, f"   exo: add [bold]{results[-1].env_line}[/] to exo's environment")
