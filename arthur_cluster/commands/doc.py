"""`arthur-cluster doc`: ask questions of a long document, summarize it, or apply a prompt to it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.progress import ProgressColumn

from . import _out

EXIT_INTERRUPTED = 130


def register(app: typer.Typer) -> None:
    @app.command("doc")
    def doc_cmd(
        files: Optional[List[str]] = typer.Argument(None, help="Text, Markdown or PDF files; '-' reads stdin."),
        ask: Optional[List[str]] = typer.Option(None, "--ask", help="A question (repeat for several)."),
        summarize: bool = typer.Option(False, "--summarize", help="Summarize the document."),
        prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="A file holding the instruction."),
        model: Optional[str] = typer.Option(None, "--model", help="Model folder or repo id (default: the deployment's)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Job directory (default: a new one under the jobs folder)."),
        plan_only: bool = typer.Option(False, "--plan", help="Print the plan and stop."),
        resume: bool = typer.Option(False, "--resume", help="Continue an unfinished job (--out's, else the newest)."),
        thinking: Optional[str] = typer.Option(None, "--thinking", help="on|off: the template's enable_thinking."),
        context: Optional[int] = typer.Option(None, "--context", min=1, help="Use at most N tokens of context."),
        max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Output tokens reserved per answer."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Prefill the document again for every question."),
        as_json: bool = typer.Option(False, "--json", help="Print the plan and the result as JSON."),
    ) -> None:
        """Ask questions of a long document, summarize it, or apply a prompt to it.

        Single pass when the document fits the context, else map-reduce over chunks; one prefill shared by
        every question; resumable (Ctrl-C, crashes) with --resume."""
        import os

        # transformers warns once per long text that it exceeds the tokenizer's model_max_length: the plan
        # counts long documents on purpose (and chunks them), so the warning only misleads here.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from .. import docjob, documents

        think = _thinking(thinking, as_json)
        reporter = RichReporter(quiet=as_json)
        try:
            if resume:
                if files:
                    _out.fail("--resume continues a job from its directory: drop the FILE arguments "
                              "(name the job with --out DIR)", as_json=as_json)
                reporter.job = docjob.find_job(out)  # Ctrl-C below names this job, not the newest one
                result = docjob.resume(reporter.job.dir, model=model, reporter=reporter, use_cache=not no_cache)
                return _finish(reporter, None, result, as_json)
            prompt = _read_prompt(prompt_file, as_json)
            tasks = docjob.make_tasks(ask, summarize, prompt)
            doc = documents.load(list(files or []))
            # The plan is made from the headers and the tokenizer: a model that cannot fit is never loaded.
            with reporter.status("planning (counting tokens)"):
                planner = docjob.plan_runner(model, use_cache=not no_cache)
                plan = docjob.plan_job(doc, tasks, planner, max_tokens=max_tokens, context=context, thinking=think,
                                       warmup=False)
            if plan_only or not plan.feasible:
                reporter.plan(plan)
                if as_json:
                    _out.print_json(plan)
                raise typer.Exit(_out.EXIT_OK if plan.feasible else _out.EXIT_BLOCKED)
            with reporter.status("loading the model, warm-up"):
                runner = docjob.open_runner(model, use_cache=not no_cache)
                docjob.estimate_time(plan, runner, doc)
            reporter.plan(plan)
            job = docjob.create_job(doc, tasks, runner, max_tokens=max_tokens, thinking=think, context=context,
                                    out=out)
            docjob.write_json(job.dir / "plan.json", plan.model_dump(mode="json"))
            reporter.job = job
            result = docjob.run_job(job, plan, runner, reporter=reporter)
            docjob.record_rates(runner, result)
            _finish(reporter, plan, result, as_json)
        except (documents.DocumentError, docjob.DocJobError) as e:
            _out.fail(str(e), as_json=as_json)
        except KeyboardInterrupt:
            reporter.stop()
            where = f" --out {reporter.job.dir}" if reporter.job else ""
            msg = f"interrupted; finished parts are saved. Continue with: arthur-cluster doc --resume{where}"
            if reporter.job:
                reporter.job.set_status("interrupted")
            _out.fail(msg, code=EXIT_INTERRUPTED, as_json=as_json)


def _thinking(value: str | None, as_json: bool) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v not in ("on", "off"):
        _out.fail(f"--thinking takes on or off, not {value!r}", code=_out.EXIT_USAGE, as_json=as_json)
    return v == "on"


def _read_prompt(path: Path | None, as_json: bool) -> str | None:
    if path is None:
        return None
    from .. import documents

    try:
        return documents.read_text(path).text  # regular files only, bounded, UTF-8: as a document is read
    except documents.DocumentError as e:
        _out.fail(f"cannot read the prompt file: {e}", as_json=as_json)


def _finish(reporter: "RichReporter", plan, result: dict, as_json: bool) -> None:
    reporter.stop()
    if as_json:
        _out.print_json({"plan": plan, "result": result} if plan is not None else {"result": result})
        return
    c = _out.console
    for a in result["answers"]:
        title = a["question"] or {"summarize": "Summary"}.get(a["kind"], a["kind"])
        c.print(f"\n[bold]{a['task']}[/] {escape(title)}", highlight=False)
        c.print(a["answer"], highlight=False, markup=False)
    c.print("\n" + summary_text(result), highlight=False, markup=False)
    c.print(f"Answers: {Path(result['dir']) / 'answers.md'}", highlight=False, markup=False)


def _at(tps: float | None) -> str:
    return f" at {tps:,.1f} tok/s" if tps else ""  # no rate when nothing was timed, never "0.0 tok/s"


def summary_text(result: dict) -> str:
    t = result["tokens"]
    peak = result["peak_memory_bytes"]
    resumed = result["resumed_units"]
    return (f"{result['model']} ({result['engine']}, {result['route']}), {result['mode']}: "
            f"{t['prefilled']:,} tokens prefilled{_at(result['prefill_tps'])}, {t['cached']:,} from cache, "
            f"{t['generated']:,} generated{_at(result['decode_tps'])}"
            + (f", peak {_out.human_bytes(peak)}" if peak else "")
            + (f"; {resumed} unit(s) resumed from an earlier run" if resumed else ""))


# --- progress ---------------------------------------------------------------------------------------


class RichReporter:
    """Prefill and generation bars (tokens, tok/s, ETA) on stderr; silent with --json."""

    def __init__(self, quiet: bool = False):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from .. import docjob

        self.quiet = quiet
        self.job: docjob.Job | None = None
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  _RateColumn(), _LeftColumn(), console=_out.err_console, disable=quiet,
                                  transient=True)
        self._pre = self._gen = None
        self._started = False

    def status(self, text: str):
        from contextlib import nullcontext

        return nullcontext() if self.quiet else _out.err_console.status(text)

    def _ensure(self) -> None:
        if not self._started:
            self._progress.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False

    def plan(self, plan) -> None:
        if not self.quiet:
            print_plan(plan)

    def unit_start(self, unit: str, label: str, prompt_tokens: int, max_tokens: int) -> None:
        self._ensure()
        for task in (self._pre, self._gen):
            if task is not None:
                self._progress.remove_task(task)
        short = label if len(label) <= 48 else label[:45] + "..."
        self._pre = self._progress.add_task(escape(f"prefill  {short}"), total=prompt_tokens)
        self._gen = self._progress.add_task(escape(f"generate {short}"), total=max_tokens)

    def prefill(self, done: int, total: int) -> None:
        if self._pre is not None:
            self._update(self._pre, done, total=total)

    def token(self, generated: int) -> None:
        if self._gen is not None:
            self._update(self._gen, generated)

    def _update(self, task, done: int, **kw) -> None:
        # The rate counts from the first report on: what came before it (a cached prefix, restored at once)
        # was not computed, and counting it made rates of millions of tok/s.
        if "base" not in self._progress.tasks[self._progress.task_ids.index(task)].fields:
            kw.update(base=done, since=time.monotonic())
        self._progress.update(task, completed=done, **kw)

    def unit_done(self, answer, resumed: bool = False) -> None:
        if self.quiet:
            return
        self._ensure()
        how = "resumed" if resumed else f"{answer.generation_tokens} tokens, cache {answer.cache}"
        self._progress.console.print(f"  done {answer.unit} ({how})", highlight=False, markup=False)


RATE_AFTER = 0.5  # seconds of work before a rate is shown: two reports a millisecond apart are no rate


def rate(task, now: float) -> float | None:
    """Tokens/s of the work done since the task's first report, or None while too little is timed."""
    base, since = task.fields.get("base"), task.fields.get("since")
    if base is None or now - since < RATE_AFTER or task.completed <= base:
        return None
    return (task.completed - base) / (now - since)


class _RateColumn(ProgressColumn):
    def render(self, task):
        from rich.text import Text

        tps = rate(task, time.monotonic())
        return Text(f"{tps:,.1f} tok/s" if tps else "", style="progress.data.speed")


class _LeftColumn(ProgressColumn):
    """Time left at that same rate (rich's own estimate counts the cached tokens too)."""

    def render(self, task):
        from rich.text import Text

        tps = rate(task, time.monotonic())
        if not tps or task.total is None:
            return Text("")
        left = max(task.total - task.completed, 0) / tps
        return Text(f"{int(left) // 60}:{int(left) % 60:02d} left", style="progress.remaining")


def time_text(plan) -> str:
    """Prefill plus generation (at most every unit's reserved tokens), with where the rates came from; a rate
    is given only where one was measured, and "no rates" only when none was."""
    if plan.cached_prefix and plan.mode == "single":
        pre = "no prefill (the document's prompt cache is on disk)"
    elif plan.prefill_seconds is not None and plan.warmup_tps:
        pre = f"prefill {plan.prefill_tokens:,} tokens ~{plan.prefill_seconds:,.0f} s at {plan.warmup_tps:,.0f} tok/s"
    else:
        pre = f"prefill {plan.prefill_tokens:,} tokens"
    gen = f"generate at most {plan.generate_tokens:,} tokens"
    if plan.generate_seconds is not None and plan.decode_tps:
        gen += f" ~{plan.generate_seconds:,.0f} s at {plan.decode_tps:,.1f} tok/s"
    source = f" (rates from {plan.rates_from})" if plan.rates_from else ""
    if plan.seconds is not None:
        return f"about {plan.seconds:,.0f} s if every answer runs to its reserved length: {pre}; {gen}{source}"
    if plan.warmup_tps or plan.decode_tps:
        missing = "prefill" if not plan.warmup_tps else "generation"
        return f"{pre}; {gen}{source}; no {missing} rate measured for this model here yet: the job measures it"
    return (f"{pre}; {gen}; no rates measured for this model here yet (the plan does not load the weights): "
            "the job measures them when it starts")


FITS_UNKNOWN = ("fits ?: the node's memory is not known; give memory_bytes to each [[cluster.nodes]] in "
                "models.toml, or --exo URL (exo reports it)")


def print_plan(plan) -> None:
    from rich.table import Table

    c = _out.console
    h = _out.human_bytes
    fb = f"; fallback: {plan.fallback_reason}" if plan.fallback_reason else ""
    c.print(f"[bold]Plan[/] {escape(f'{plan.model} ({plan.engine}, {plan.route}{fb})')}", highlight=False)
    exact = "" if plan.tokens_exact else " (estimated: no local tokenizer)"
    c.print(f"  document: {plan.document_tokens:,} tokens{exact}; context {plan.context_limit:,}"
            f" (model {plan.model_context or 0:,}); {plan.reserve_tokens:,} reserved per answer; "
            f"tasks: {len(plan.tasks)}", highlight=False, markup=False)
    if plan.thinking_supported:
        c.print(f"  thinking: {'template default' if plan.thinking is None else ('on' if plan.thinking else 'off')}")
    for line in plan.explanation:
        c.print(f"  {line}", highlight=False, markup=False)
    if plan.memory is not None:
        t = Table(box=None, padding=(0, 1), show_edge=False)
        for col in ("node", "weights", "KV", "Mamba", "activations", "total", "budget", "fits"):
            t.add_column(col)
        for n in plan.memory.nodes:
            fits = "?" if n.fits is None else ("yes" if n.fits else "[red]no[/]")
            t.add_row(escape(n.node), h(n.weights), h(n.kv_cache), h(n.mamba_state), h(n.activation), h(n.total),
                      h(n.budget), fits)
        c.print(f"  memory at {plan.memory.context:,} tokens ({plan.memory.split}):")
        c.print(t)
        if any(n.fits is None for n in plan.memory.nodes):
            c.print("  " + FITS_UNKNOWN, highlight=False, markup=False)
    if plan.feasible:
        c.print("  time: " + time_text(plan), highlight=False, markup=False)
    for s in plan.suggestions:
        c.print(f"  [yellow]would help:[/] {escape(s)}", highlight=False)
