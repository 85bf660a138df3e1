"""`arthur-cluster probe MODEL`: will it run here, and how — a verdict per route."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from . import _out

VERDICT_STYLE = {"ok": "[green]ok[/]", "blocked": "[red]blocked[/]", "unknown": "[yellow]unknown[/]"}
SEVERITY_STYLE = {"error": "[red]error[/]", "warning": "[yellow]warning[/]", "info": "[dim]info[/]"}


def _route_text(route) -> str:
    errors = [f.what for f in route.findings if f.severity == "error"]
    if errors:
        return errors[0] + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")
    if route.open_questions:
        return route.open_questions[0]
    notes = [f.what for f in route.findings if f.check in ("exo.preview", "pipeline")]
    return ("proven on ring ranks; " if route.proven else "") + (notes[0] if notes else "")


FITS_UNKNOWN = ("fits ?: the nodes' memory is not known for that node count; give memory_bytes to each "
                "[[cluster.nodes]] in models.toml (with --cluster), or --exo URL (exo reports it)")


def _shown(report) -> list:
    """The routes the user asked about (--route R): only those, not every route probed."""
    if not report.asked:
        return list(report.routes)
    from ..probe import RouteSpec

    spec = RouteSpec.parse(report.asked)
    return [r for r in report.routes if spec.matches(r)]


def print_report(report) -> None:
    from rich.table import Table

    c = _out.console
    where = f" ({report.path})" if report.path else ""
    c.print(f"[bold]{escape(report.model)}[/]" + escape(f"{where}: {report.model_type or '?'}, context "
            f"{report.context} tokens" + (f", exo {report.exo_url}" if report.exo_url else "")), highlight=False)
    routes = _shown(report)
    t = Table(show_lines=False)
    for col in ("route", "verdict", "peak/node", "fits", "why"):
        t.add_column(col, overflow="fold")
    for r in routes:
        fits = {True: "yes", False: "no", None: "?"}[r.fits]
        t.add_row(r.key, VERDICT_STYLE[r.verdict] + (" ✓" if r.proven else ""), _out.human_bytes(r.peak_bytes),
                  fits, escape(_route_text(r)))
    c.print(t)
    if any(r.fits is None for r in routes):
        c.print(FITS_UNKNOWN, highlight=False, markup=False)
    if len(routes) < len(report.routes):
        c.print(f"{len(report.routes) - len(routes)} other route(s) probed: drop --route to see them, or --json",
                highlight=False, markup=False)
    for f in report.findings:
        c.print(f"{SEVERITY_STYLE[f.severity]} [bold]{escape(f.check)}[/] {escape(f.line())}", highlight=False)
    asked = report.asked or "best route"
    chosen = report.route.key if report.route else "-"
    c.print(f"[bold]{escape(asked)}[/] -> {VERDICT_STYLE[report.verdict]} ({chosen}); "
            f"{report.timings.get('total', 0):.2f} s", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe_cmd(
        model: str = typer.Argument(..., help="A model folder or repo id (LM Studio, HF cache, exo)."),
        exo: Optional[str] = typer.Option(None, "--exo", help="exo API URL to ask (e.g. http://mac1:52415)."),
        nodes: Optional[int] = typer.Option(None, "--nodes", min=1, help="Probe node counts up to N."),
        cluster: bool = typer.Option(False, "--cluster", help="Use the cluster section of models.toml."),
        context: Optional[int] = typer.Option(None, "--context", min=1, help="Context length in tokens."),
        route: Optional[str] = typer.Option(None, "--route", help="ENGINE/SHARDING/BACKEND/N, e.g. mlx/tensor/ring/2."),
        engine: Optional[str] = typer.Option(None, "--engine", help="exo | mlx (instead of --route)."),
        sharding: Optional[str] = typer.Option(None, "--sharding", help="single | pipeline | tensor."),
        backend: Optional[str] = typer.Option(None, "--backend", help="ring | jaccl | nccl."),
        static_only: bool = typer.Option(False, "--static-only", help="Skip the local proof on real ranks."),
        ranks: list[int] = typer.Option([2], "--ranks", help="Rank counts for the equivalence proof (repeatable)."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Accept the model's own code."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Ignore cached static results."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Will MODEL run on this cluster, and how: ok / blocked / unknown per route, with the reasons."""
        from .. import catalog, probe

        if route and (engine or sharding or backend):
            _out.fail("give --route or --engine/--sharding/--backend, not both", code=_out.EXIT_USAGE, as_json=as_json)
        if not route and (engine or sharding or backend):
            route = "/".join([engine or "*", sharding or "*", backend or "*"])
        try:
            spec = probe.RouteSpec.parse(route) if route else None
            cat = None
            try:
                cat = catalog.load()
            except catalog.CatalogError as e:
                if cluster:
                    raise probe.ProbeError(str(e)) from None
            if cluster and (cat is None or cat.cluster is None or not cat.cluster.nodes):
                raise probe.ProbeError(f"{cat.source if cat else 'models.toml'}: no [cluster] section with nodes; "
                                       "add one (see the commented example) or use --nodes N")
            # The catalogue's figures by id: the argument may be a folder or a short name.
            entry = (cat.models.get(model) or cat.models.get(probe.locate(model)[0])) if cat else None
            progress_cm = _out.err_console.status("probing") if not as_json else None
            if progress_cm:
                progress_cm.start()
            try:
                report = probe.run(model, exo_url=exo, nodes=nodes, cluster=cat.cluster if cluster else None,
                                   context=context, route=spec, static_only=static_only,
                                   prove_ranks=tuple(ranks), trust_remote_code=trust_remote_code, entry=entry,
                                   use_cache=not no_cache,
                                   progress=(lambda m: progress_cm.update(m)) if progress_cm else None)
            finally:
                if progress_cm:
                    progress_cm.stop()
        except (probe.ProbeError, catalog.CatalogError) as e:
            _out.fail(str(e), as_json=as_json)
        if as_json:
            _out.print_json(report)
        else:
            print_report(report)
        raise typer.Exit(probe.exit_code(report))
