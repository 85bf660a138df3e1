"""The arthur-cluster command line: parses arguments and prints; the work lives in the modules."""

from __future__ import annotations

import importlib

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
