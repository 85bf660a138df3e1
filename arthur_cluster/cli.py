"""The arthur-cluster command line: parses arguments and prints; the work lives in the modules."""

from __future__ import annotations

import importlib
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
