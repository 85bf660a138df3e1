"""`arthur-cluster pick | up | down`: choose a model and route, bring it up (or its fallback), stop it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rich.markup import escape

from . import _out

ENGINES = ("exo", "mlx")


def _catalog(path: Path | None, as_json: bool):
    from .. import catalog

    try:
        return catalog.load(path)
    except catalog.CatalogError as exc:
        _out.fail(str(exc), as_json=as_json)


def _engine(value: str | None, as_json: bool) -> str | None:
    if value is not None and value not in ENGINES:
        _out.fail(f"--engine must be one of {', '.join(ENGINES)}, not {value!r}", code=_out.EXIT_USAGE,
                  as_json=as_json)
    return value


def _route(text: str | None, engine: str | None, as_json: bool):
    """`--route` as `probe --route` reads it (one parser); its engine stands for --engine when that is not given."""
    from .. import probe

    if text is None:
        return None, engine
    try:
        spec = probe.RouteSpec.parse(text)
    except probe.ProbeError as exc:
        _out.fail(f"--route: {exc}", code=_out.EXIT_USAGE, as_json=as_json)
    if engine is not None and spec.engine is not None and spec.engine != engine:
        _out.fail(f"--route {spec} is an {spec.engine} route but --engine is {engine}; drop one of them",
                  code=_out.EXIT_USAGE, as_json=as_json)
    return spec, engine or spec.engine


def _names(model: str | None, fallbacks: list[str] | None) -> tuple[str | None, list[str] | None]:
    """The one model-name resolver (link, probe and doc use it too): short names and folders become the repo
    ids the catalogue and the engines know."""
    from .. import modelname, sources

    found = sources.discover()
    pick = (lambda n: modelname.canonical(n, found))
    return (pick(model) if model is not None else None,
            [pick(f) for f in fallbacks] if fallbacks is not None else None)


def _fail_with(message: str, rejections: list, as_json: bool) -> None:
    if as_json:
        _out.print_json({"error": message, "rejections": rejections})
        raise typer.Exit(_out.EXIT_ERROR)
    _out.fail(message)


def _print_choice(choice) -> None:
    c = _out.console
    c.print(f"[bold]{escape(choice.model)}[/]  {escape(choice.route.label)}", highlight=False)
    c.print(f"  why: {choice.why}", highlight=False, markup=False)
    if choice.nodes:
        c.print(f"  nodes: {', '.join(choice.nodes)}", highlight=False, markup=False)
    for r in choice.rejections:
        c.print(f"  [yellow]rejected[/] {escape(str(r))}", highlight=False)


def _print_deployment(dep, record: Path) -> None:
    c = _out.console
    s = dep.smoke
    c.print(f"[bold green]up:[/] {escape(dep.model)}", highlight=False)
    c.print(f"  route:    {dep.route.label}" + (f" ({', '.join(dep.nodes)})" if dep.nodes else ""), highlight=False,
            markup=False)
    if dep.endpoint:
        c.print(f"  endpoint: {dep.endpoint}  (model id {dep.served_id})", highlight=False, markup=False)
    c.print(f"  question: {s.question}", highlight=False, markup=False)
    c.print(f"  answer:   {s.answer.strip()!r}", highlight=False, markup=False)
    rates = [f"{s.generation_tokens} tokens"] + ([f"prompt {s.prompt_tps:.1f} tok/s"] if s.prompt_tps else [])
    if s.generation_tps:  # an engine that reports no rate gets none printed, never 0.0
        c.print(f"  tokens/s: {s.generation_tps:.1f} ({'; '.join(rates)})", highlight=False, markup=False)
    else:
        c.print(f"  tokens:   {'; '.join(rates)}", highlight=False, markup=False)
    if dep.fallback_reason:
        c.print(f"  [yellow]fallback:[/] {escape(dep.fallback_reason)}", highlight=False)
    for n in dep.notes:
        c.print(f"  note: {n}", highlight=False, markup=False)
    c.print(f"  record:   {record}", highlight=False, markup=False)


class _Reporter:
    """Steps as lines, waits as a rich bar on stderr (nothing on stdout under --json)."""

    def __init__(self, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.quiet = quiet
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=_out.err_console, transient=True, disable=quiet)
        self.tasks: dict[str, int] = {}

    def say(self, text: str) -> None:
        if not self.quiet:
            self.bar.console.print(f"[dim]>[/] {escape(text)}", highlight=False, soft_wrap=True)

    def progress(self, label: str, done: int, total: int) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(label, total=total or None)
        self.bar.update(self.tasks[label], completed=done, total=total or None)


def register(app: typer.Typer) -> None:
    @app.command("pick")
    def pick_cmd(
        model: Optional[str] = typer.Argument(None, help="Try this model first (default: the catalogue's target)."),
        engine: Optional[str] = typer.Option(None, "--engine", help="exo or mlx (default: exo when reachable, "
                                                                     "then MLX)."),
        exo: Optional[str] = typer.Option(None, "--exo", help="exo API URL (default: $EXO_API or localhost:52415)."),
        context: Optional[int] = typer.Option(None, "--context", min=1, help="Tokens the job needs "
                                                "(default 8192, capped at the model's length)."),
        fallbacks: Optional[list[str]] = typer.Option(None, "--fallback", help="Fallback model (repeatable; "
                                                                                "replaces the catalogue's)."),
        allow_download: bool = typer.Option(False, "--allow-download", help="Count models exo or Hugging Face "
                                                                             "would download."),
        route: Optional[str] = typer.Option(None, "--route", help="Only routes matching ENGINE/SHARDING/BACKEND/N "
                                              "(as probe --route), e.g. mlx/tensor/ring; also ones the default "
                                              "order never takes."),
        catalog_path: Optional[Path] = typer.Option(None, "--catalog", help="models.toml to use."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Which model and route would run, and why every other candidate was turned down."""
        from .. import cluster, fallback

        engine = _engine(engine, as_json)
        spec, engine = _route(route, engine, as_json)
        cat = _catalog(catalog_path, as_json)
        model, fallbacks = _names(model, fallbacks)
        try:
            found = cluster.discover(cat, engine=engine, exo_url=exo)
            choice = fallback.pick(cat, cluster=found.clusters, context=context, allow_download=allow_download,
                                   model=model, fallbacks=fallbacks, route=spec)
        except cluster.ClusterError as exc:
            _out.fail(str(exc), as_json=as_json)
        except fallback.NoChoice as exc:
            _fail_with(str(exc), exc.rejections, as_json)
        if as_json:
            _out.print_json({"choice": choice, "notes": found.notes,
                             "fallback_reason": choice.fallback_reason(model or cat.target)})
            return
        for n in found.notes:
            _out.console.print(f"note: {n}", highlight=False, markup=False)
        _print_choice(choice)

    @app.command("up")
    def up_cmd(
        model: Optional[str] = typer.Argument(None, help="Bring up this model (default: the catalogue's target); "
                                                         "falls back through the catalogue."),
        engine: Optional[str] = typer.Option(None, "--engine", help="exo or mlx (default: exo when reachable, "
                                                                     "else MLX on this machine)."),
        exo: Optional[str] = typer.Option(None, "--exo", help="exo API URL (default: $EXO_API or localhost:52415)."),
        context: Optional[int] = typer.Option(None, "--context", min=1, help="Tokens the job needs "
                                                "(default 8192, capped at the model's length)."),
        timeout: float = typer.Option(600.0, "--timeout", min=1.0,
                                      help="Seconds for the whole bring-up: exo's answers, placement, loading."),
        fallbacks: Optional[list[str]] = typer.Option(None, "--fallback", help="Fallback model (repeatable; "
                                                                                "replaces the catalogue's)."),
        allow_download: bool = typer.Option(False, "--allow-download", help="Let exo or Hugging Face download a "
                                                                             "model that is not on disk."),
        prompt: str = typer.Option("What is 2+2?", "--prompt", help="The test question."),
        max_tokens: int = typer.Option(50, "--max-tokens", min=1, help="Tokens of the test answer."),
        route: Optional[str] = typer.Option(None, "--route", help="Only routes matching ENGINE/SHARDING/BACKEND/N "
                                              "(as probe --route), e.g. mlx/tensor/ring; also ones the default "
                                              "order never takes."),
        catalog_path: Optional[Path] = typer.Option(None, "--catalog", help="models.toml to use."),
        serve: bool = typer.Option(False, "--serve", help="MLX on one node: keep it loaded in a server process "
                                                          "too (across nodes the ranks always stay up)."),
        bind: Optional[str] = typer.Option(None, "--bind", help="Address of rank 0's HTTP server (OpenAI chat "
                                             "completions). Default: 127.0.0.1 on one machine, rank 0's cluster "
                                             "address across nodes."),
        as_json: bool = typer.Option(False, "--json", help="Print the deployment record as JSON."),
    ) -> None:
        """Bring a model up on exo or MLX, ask it a test question, and record the deployment.

        Falls back to the next candidate on any failure, saying why."""
        from .. import bringup, cluster, paths

        engine = _engine(engine, as_json)
        spec, engine = _route(route, engine, as_json)
        cat = _catalog(catalog_path, as_json)
        model, fallbacks = _names(model, fallbacks)
        rep = _Reporter(quiet=as_json)
        try:
            with rep.bar:
                dep = bringup.up(cat, model=model, fallbacks=fallbacks, engine=engine, exo_url=exo, context=context,
                                 timeout=timeout, allow_download=allow_download, prompt=prompt,
                                 max_tokens=max_tokens, hooks=bringup.Hooks(say=rep.say, progress=rep.progress),
                                 serve=serve, bind=bind, route=spec)
        except cluster.ClusterError as exc:
            _out.fail(str(exc), as_json=as_json)
        except bringup.BringUpError as exc:
            _fail_with(str(exc), exc.rejections, as_json)
        if as_json:
            _out.print_json(dep)
            return
        _print_deployment(dep, paths.deployment_file())

    @app.command("rank", hidden=True, add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def rank_cmd(ctx: typer.Context) -> None:
        """One resident rank (what `up` starts on each node over ssh, with that node's arthur-cluster)."""
        from ..parallel import server

        raise typer.Exit(server.main(list(ctx.args)) or 0)

    @app.command("down")
    def down_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """Stop the recorded deployment (exo: delete its instance) and remove the record."""
        from .. import bringup

        try:
            res = bringup.down()
        except bringup.DeploymentError as exc:
            _out.fail(str(exc), as_json=as_json)
        if as_json:
            _out.print_json(res)
            return
        for a in res.actions:
            _out.console.print(a, highlight=False, markup=False)
