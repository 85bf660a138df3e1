"""`arthur-cluster demo`: the whole path on a demo library, in a temporary home, on this machine."""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import typer

from rich.markup import escape

from . import _out


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        home: Optional[Path] = typer.Option(
            None, "--home", help="Folder for the demo home (default: a new temporary folder, removed at the end)."
        ),
        keep: bool = typer.Option(False, "--keep", help="Keep the temporary home and print where it is."),
        proof: bool = typer.Option(True, "--proof/--no-proof",
                                   help="Prove the probe's routes on 2 real ranks (about 10 s on 2 cores)."),
        question: str = typer.Option(None, "--ask", help="The document job's question (default: a demo one)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON record of every step."),
    ) -> None:
        """The whole path on a demo library, on this machine's MLX.

        Builds a demo LM Studio library (tiny NemotronH and Llama, random weights, real files); discovers,
        inspects and links it into a temporary Hugging Face cache and exo directory; probes the target; brings
        it up; runs a document job on the deployment."""
        from .. import catalog, demo

        root = home or Path(tempfile.mkdtemp(prefix="arthur-demo-"))
        dhome = demo.home_at(root.resolve())
        demo.activate(dhome)
        record: dict = {"home": str(dhome.root)}
        try:
            cat = catalog.load().for_demo()
            _step_library(dhome, cat, record, as_json)
            _step_models(dhome, record, as_json)
            _step_link(dhome, cat, record, as_json)
            _step_probe(cat, record, proof, as_json)
            _step_up(cat, record, as_json)
            _step_doc(dhome, question or demo.DEMO_QUESTION, record, as_json, kept=home is not None or keep)
        except _errors() as e:
            _out.fail(str(e), as_json=as_json)
        finally:
            if home is None and not keep:
                shutil.rmtree(root, ignore_errors=True)
            else:
                _kept(dhome, record, as_json)
        if as_json:
            _out.print_json(record)


def _kept(dhome, record: dict, as_json: bool) -> None:
    """Say how to use what was kept: the same commands, pointed at the demo home."""
    from .. import catalog, demo

    try:
        cat = catalog.load()
        env = demo.write_shell_setup(dhome, cat)
    except (OSError, catalog.CatalogError) as e:
        if not as_json:
            _out.console.print(f"Demo home kept at {dhome.root} ({e})", highlight=False, markup=False)
        return
    record["env"] = str(env)
    if as_json:
        return
    doc = shlex.quote(str(dhome.root / "documents" / "operations-log.md"))
    short = cat.for_demo().target.split("/")[-1]
    _out.console.print(
        f"Demo home kept at {dhome.root}. To use it from this shell:\n"
        f"  . {shlex.quote(str(env))}\n"
        "then, for example:\n"
        "  arthur-cluster models\n"
        f"  arthur-cluster probe {short} --static-only\n"
        f"  arthur-cluster doc {doc} --ask \"Which node holds the most memory?\" --summarize\n"
        "  arthur-cluster down", highlight=False, markup=False)


def _errors() -> tuple[type[Exception], ...]:
    """What a step raises for a reason the user can act on (printed as one line, not a traceback)."""
    from .. import bringup, catalog, docjob, linker, modelfiles, probe

    return (catalog.CatalogError, modelfiles.ModelFileError, linker.LinkError, probe.ProbeError,
            bringup.BringUpError, docjob.DocJobError)


def _say(as_json: bool, text: str, plain: str = "") -> None:
    """`text` may hold markup; `plain` (paths, ids, user text) is printed as written."""
    if not as_json:
        _out.console.print(text + escape(plain), highlight=False)


def _step_library(dhome, cat, record: dict, as_json: bool) -> None:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from .. import demo

    _say(as_json, "[bold]1. Demo library[/] in ", str(dhome.lmstudio_models))
    ids = cat.candidates()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), disable=as_json, transient=True) as bar:
        task = bar.add_task(f"building {len(ids)} miniature models", total=len(ids))
        built = demo.build_library(dhome, cat, on_model=lambda rid, _: bar.advance(task))
    record["library"] = [str(p) for p in built]
    for rid in ids:
        _say(as_json, "", f"   built {rid}")


def _step_models(dhome, record: dict, as_json: bool) -> None:
    from .models import inventory

    _say(as_json, "[bold]2. Discover and inspect[/] (headers only)")
    rows = inventory(("lmstudio",), None, None)
    record["models"] = rows
    for r in rows:
        q = r["quantization"]
        quant = f"{q['bits']}-bit" if q else "unquantized"
        state = "ok" if not r["problems"] else "; ".join(r["problems"])
        _say(as_json, "", f"   {r['repo_id']}: {r['architecture']}, {r['parameters']:,} parameters, {quant}, "
                      f"{_out.human_bytes(r['bytes'])}, context {r['context_length']}: {state}")


def _step_link(dhome, cat, record: dict, as_json: bool) -> None:
    from .. import linker, modelfiles, sources

    _say(as_json, "[bold]3. Link[/] ", f"into {dhome.hf_cache} and exo's read-only directory")
    results = []
    for found in sources.lmstudio():
        info = modelfiles.require_ok(modelfiles.inspect(found.path, repo_id=found.repo_id, source="lmstudio"))
        res = linker.link(info)
        results.append(res)
        _say(as_json, "", f"   {found.repo_id}: HF cache {res.snapshot}, exo {res.exo_link or '-'}"
                      + "".join(f"\n   warning: {w}" for w in res.warnings))
    record["links"] = results
    if results and results[-1].env_line:
        _say(as_json, "", f"   exo: add {results[-1].env_line} to exo's environment")


def _step_probe(cat, record: dict, proof: bool, as_json: bool) -> None:
    from .. import probe
    from .probe import print_report

    how = "static checks and a proof on 2 real ranks" if proof else "static checks"
    _say(as_json, "[bold]4. Probe[/] ", f"{cat.target} ({how})")
    status = _out.err_console.status("probing") if not as_json else None
    if status:
        status.start()
    try:
        report = probe.run(cat.target, nodes=2, static_only=not proof,
                           progress=(lambda text: status.update(text)) if status else None)
    finally:
        if status:
            status.stop()
    record["probe"] = report
    if not as_json:
        print_report(report)


def _step_up(cat, record: dict, as_json: bool) -> None:
    from .. import bringup
    from .cluster import _print_deployment, _Reporter

    _say(as_json, "[bold]5. Bring up[/] on this machine's MLX (the embedded default engine)")
    rep = _Reporter(quiet=as_json)
    with rep.bar:
        dep = bringup.up(cat, engine="mlx",
                         hooks=bringup.Hooks(say=rep.say, progress=rep.progress))
    record["deployment"] = dep
    if not as_json:
        from .. import paths

        _print_deployment(dep, paths.deployment_file())


def _step_doc(dhome, question: str, record: dict, as_json: bool, kept: bool) -> None:
    from .. import demo, docjob
    from .doc import RichReporter, _at

    path = demo.write_document(dhome)
    _say(as_json, "[bold]6. Document job[/] ", f"on the deployment: {path.name}, asking {question!r}")
    reporter = RichReporter(quiet=as_json)
    try:
        result = docjob.run([str(path)], asks=[question], max_tokens=24, reporter=reporter,
                            out=dhome.root / "jobs" / "demo")
    finally:
        reporter.stop()
    record["document"] = result
    if not as_json:
        for a in result["answers"]:
            _out.console.print("   answer (random weights, so noise): " + repr(a["answer"].strip()),
                               highlight=False, markup=False)
        t = result["tokens"]
        _out.console.print(f"   {result['mode']} pass on {result['route']}: {t['document']:,} document tokens, "
                           f"{t['generated']} generated{_at(result['decode_tps'])}; answers in {result['dir']}"
                           + ("" if kept else " (removed with the demo home; --keep keeps it)"),
                           highlight=False)
