"""`arthur-cluster link | unlink | doctor`: zero-copy links into the HF cache and exo, and their upkeep."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rich.markup import escape

from . import _out


def _resolve(model: str, lmstudio_dir: Path | None, as_json: bool):
    from .. import modelname, sources

    found = modelname.find(model, sources.discover(("lmstudio",), lmstudio_dir=lmstudio_dir))
    if found is None:
        _out.fail(f"no LM Studio model matches {model!r}; `arthur-cluster models` lists them (or give a folder path)",
                  as_json=as_json)
    return found


def _summary(all_models: bool, targets: list, results: list, skipped: list, errors: list,
             lmstudio_dir: Path | None, dry_run: bool) -> str | None:
    """--all: one line saying what happened to every model, and where an empty library was looked for."""
    if not all_models:
        return None
    if not targets:
        from .. import paths

        where = lmstudio_dir or paths.lmstudio_models()
        return (f"nothing to link: no models in {where} (LM Studio's models folder; give another with "
                "--lmstudio-dir or set ARTHUR_LMSTUDIO_MODELS)")
    verb = "would link" if dry_run else "linked"
    return f"{verb} {len(results)} of {len(targets)} model(s); skipped {len(skipped)}; failed {len(errors)}"


def _all_models(lmstudio_dir: Path | None):
    from .. import sources

    return sources.discover(("lmstudio",), lmstudio_dir=lmstudio_dir)


def _progress_bar(enabled: bool):
    """A rich bar for --hash; the callback gets cumulative bytes."""
    if not enabled:
        return None, None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(TextColumn("hashing {task.fields[name]}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=_out.err_console, transient=True)
    task = bar.add_task("hash", total=None, name="")

    def cb(done: int, total: int, name: str) -> None:
        bar.update(task, completed=done, total=total, name=name)

    return bar, cb


def _print_result(res) -> None:
    c = _out.console
    verb = "would " if res.dry_run else ""
    c.print(f"[bold]{escape(res.repo_id)}[/]  <- {escape(str(res.source))}", highlight=False)
    for a in res.actions:
        c.print(f"  {verb}{a.op:8} {a.target}  {a.detail}", highlight=False, markup=False)
    for w in res.warnings:
        c.print(f"  [yellow]note:[/] {escape(w)}", highlight=False)
    if res.env_line:
        c.print("  Start exo with:", highlight=False)
        c.print(f"    {res.env_line}", highlight=False, soft_wrap=True, markup=False)


def register(app: typer.Typer) -> None:
    @app.command("link")
    def link_cmd(
        model: Optional[str] = typer.Argument(None, help="LM Studio model (org/name, name) or a folder path."),
        all_models: bool = typer.Option(False, "--all", help="Link every MLX model LM Studio holds."),
        hf_cache: Optional[Path] = typer.Option(None, "--hf-cache", help="Hugging Face hub cache folder."),
        exo_dir: Optional[Path] = typer.Option(None, "--exo-dir", help="Read-only links directory for exo."),
        # Kept for scripts written for earlier versions, out of the help: no card file is written (exo
        # deletes them; `up` registers the model, docs/exo.md), and exo's link folder always gets an index.
        cards_dir: Optional[Path] = typer.Option(None, "--cards-dir", hidden=True),
        no_hf: bool = typer.Option(False, "--no-hf", help="Do not link into the Hugging Face cache."),
        no_exo: bool = typer.Option(False, "--no-exo", help="Do not link for exo."),
        true_hash: bool = typer.Option(False, "--hash", help="Compute true etags (reads every byte once; cached)."),
        exo_index: bool = typer.Option(False, "--exo-index", hidden=True),
        repo_id: Optional[str] = typer.Option(None, "--repo-id", help="Link under this org/name instead."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; change nothing."),
        lmstudio_dir: Optional[Path] = typer.Option(None, "--lmstudio-dir", help="LM Studio models folder."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Link LM Studio MLX models into the Hugging Face cache and exo (zero-copy, atomic, idempotent)."""
        from .. import linker, modelfiles, modelname

        if model is not None:
            modelname.check(model)
        if bool(model) == all_models:
            _out.fail("name one model, or pass --all", code=_out.EXIT_USAGE, as_json=as_json)
        if no_hf and no_exo:
            _out.fail("--no-hf and --no-exo together leave nothing to do", code=_out.EXIT_USAGE, as_json=as_json)
        if all_models and repo_id:
            _out.fail("--repo-id names one model; it cannot go with --all", code=_out.EXIT_USAGE, as_json=as_json)
        targets = _all_models(lmstudio_dir) if all_models else [_resolve(model, lmstudio_dir, as_json)]
        results, errors, skipped = [], [], []
        for found in targets:
            info = modelfiles.inspect(found.path, repo_id=found.repo_id, source=found.source)
            if all_models and info.format != "mlx":
                skipped.append(f"{found.repo_id} ({info.format.upper()}: not runnable by MLX or exo)")
                continue  # GGUF and others stay LM Studio's
            bar, cb = _progress_bar(true_hash and not as_json)
            try:
                if bar:
                    bar.start()
                res = linker.link(info, repo_id=repo_id, hf_cache=hf_cache, exo_dir=exo_dir, cards_dir=cards_dir,
                                  hf=not no_hf, exo=not no_exo, true_hashes=true_hash, exo_index=exo_index,
                                  dry_run=dry_run, progress=cb)
            except (linker.LinkError, modelfiles.ModelFileError) as e:
                errors.append(f"{found.repo_id}: {e}")
                continue
            except OSError as e:
                errors.append(f"{found.repo_id}: {e.filename or ''}: {e.strerror} (nothing was left half-made; "
                              "fix the cause and run link again)")
                continue
            finally:
                if bar:
                    bar.stop()
            results.append(res)
            if not as_json:
                _print_result(res)
        summary = _summary(all_models, targets, results, skipped, errors, lmstudio_dir, dry_run)
        if as_json:
            _out.print_json({"results": results, "errors": errors, "skipped": skipped, "summary": summary})
        else:
            for sk in skipped:
                _out.console.print(f"[yellow]skipped[/] {escape(sk)}", highlight=False)
            for e in errors:
                _out.err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            if summary:
                _out.console.print(summary, highlight=False, markup=False)
        if errors:
            raise typer.Exit(_out.EXIT_ERROR)

    @app.command("unlink")
    def unlink_cmd(
        model: Optional[str] = typer.Argument(None, help="Linked model (org/name, name, or its source folder)."),
        stale: bool = typer.Option(False, "--stale", help="Remove links whose source moved or was deleted, and "
                                                          "what interrupted runs left."),
        all_links: bool = typer.Option(False, "--all", help="Remove everything the linker made."),
        hf_cache: Optional[Path] = typer.Option(None, "--hf-cache", help="Hugging Face hub cache folder."),
        exo_dir: Optional[Path] = typer.Option(None, "--exo-dir", help="The linker's exo links directory."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be removed."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Remove links made by `arthur-cluster link` (never a source file, never a real download)."""
        from .. import linker, modelname

        if model is not None:
            modelname.check(model)
        if sum(map(bool, (model, stale, all_links))) != 1:
            _out.fail("name one model, or pass --stale or --all", code=_out.EXIT_USAGE, as_json=as_json)
        repo_id = None
        if model:
            repo_id = _linked_id(model, hf_cache, exo_dir, as_json)
        res = linker.unlink(repo_id, all=all_links, stale=stale, hf_cache=hf_cache, exo_dir=exo_dir, dry_run=dry_run)
        if as_json:
            _out.print_json(res)
        else:
            verb = "would remove" if dry_run else "removed"
            for p in res.removed:
                _out.console.print(f"{verb} {p}", highlight=False, markup=False)
            for w in res.warnings:
                _out.console.print(f"[yellow]note:[/] {escape(w)}", highlight=False)
            if not res.removed and not res.warnings:
                _out.console.print("nothing to remove", highlight=False)
        if res.kept:
            raise typer.Exit(_out.EXIT_ERROR)

    @app.command("doctor")
    def doctor_cmd(
        hf_cache: Optional[Path] = typer.Option(None, "--hf-cache", help="Hugging Face hub cache folder."),
        exo_dir: Optional[Path] = typer.Option(None, "--exo-dir", help="The linker's exo links directory."),
        cards_dir: Optional[Path] = typer.Option(None, "--cards-dir", help="exo custom model cards folder."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Check links: broken (source gone), drift (source changed), foreign and dangerous entries."""
        from .. import bringup

        rep = bringup.doctor(hf_cache=hf_cache, exo_dir=exo_dir, cards_dir=cards_dir)
        if as_json:
            _out.print_json({**_out.plain(rep), "ok": rep.ok})
        else:
            c = _out.console
            c.print(f"HF cache {rep.hf_cache}: {rep.checked.get('hf_linked', 0)} linked, "
                    f"{rep.checked.get('hf_other', 0)} other", highlight=False, markup=False)
            c.print(f"exo links {rep.exo_dir}: {rep.checked.get('exo_linked', 0)} linked", highlight=False,
                    markup=False)
            colour = {"error": "red", "warning": "yellow", "note": "cyan"}
            for f in rep.findings:
                c.print(f"[{colour[f.severity]}]{f.kind}[/] " + escape(f"{f.path}: {f.message}" +
                                                                   (f" — {f.fix}" if f.fix else "")), highlight=False)
            c.print("[green]no problems[/]" if rep.ok else "[red]problems found[/]")
        if not rep.ok:
            raise typer.Exit(_out.EXIT_ERROR)


def _linked_id(model: str, hf_cache: Path | None, exo_dir: Path | None, as_json: bool) -> str:
    """A linked repo id from an id, a case-insensitive id, a bare name or a source folder."""
    import json
    import os

    from .. import linker

    ids = linker.linked_ids(hf_cache=hf_cache, exo_dir=exo_dir)
    if model in ids:
        return model
    from ..sources import is_dir

    p = Path(model).expanduser()
    if len(model) <= 4096 and is_dir(p):
        want = os.path.abspath(p)
        for rid in ids:
            if any(True for _ in linker.where_linked(rid, want, hf_cache=hf_cache, exo_dir=exo_dir)):
                return rid
    lower = model.lower()
    hits = [i for i in ids if i.lower() == lower] or [i for i in ids if i.lower().split("/", 1)[-1] == lower]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        _out.fail(f"nothing made by arthur-cluster is linked as {model!r}" +
                  (f"; linked: {json.dumps(ids)}" if ids else ""), as_json=as_json)
    _out.fail(f"{model!r} matches {', '.join(hits)}; give the full org/name", as_json=as_json)
