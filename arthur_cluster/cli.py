"""The arthur-cluster command line: parses arguments and prints; the work lives in the modules."""

from __future__ import annotations

import importlib
import importlib.metadata
import signal

import typer

app = typer.Typer(
    name="arthur-cluster",
    help="Run the models LM Studio already downloaded across a cluster of Apple-silicon Macs (exo, MLX).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module under arthur_cluster/commands/ registers its own commands; heavy imports stay inside them.
COMMANDS = ["models", "link", "demo", "doc", "probe", "cluster"]

for _name in COMMANDS:
    importlib.import_module(f"arthur_cluster.commands.{_name}").register(app)


def version() -> str:
    try:
        return importlib.metadata.version("arthur-cluster")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"arthur-cluster {version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                      help="Print the version and exit."),
) -> None:
    from .commands import _errors

    _errors.DEBUG["on"] = debug


# One error path: every command's known errors print as one line (commands/_errors.py).
importlib.import_module("arthur_cluster.commands._errors").guard_all(app)
importlib.import_module("arthur_cluster.commands._help").name_values(app)


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    # SIGTERM and SIGHUP unwind like Ctrl-C, so the cleanup that stops rank processes and exo instances runs
    # (on macOS nothing else ends ranks whose parent died).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    app()


if __name__ == "__main__":
    main()
