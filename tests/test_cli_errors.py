"""One error path: every command prints the project's errors and the parsing errors of what it reads as one
line naming the file (`{"error": ...}` with --json), a traceback only with --debug; --version."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer
from pydantic import BaseModel
from typer.testing import CliRunner

from arthur_cluster import errors
from arthur_cluster.commands import _errors

ARTHUR = [sys.executable, "-m", "arthur_cluster.cli"]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*ARTHUR, *args], capture_output=True, text=True, timeout=120, **kw)


class Point(BaseModel):
    x: int


def _raise(kind: str, path: Path) -> None:
    """Real errors of each kind, raised by the real parsers on real bad input in a file named `path`."""
    if kind == "json":
        json.loads(path.read_text())
    elif kind == "toml":
        tomllib.loads(path.read_text())
    elif kind == "pydantic":
        Point.model_validate_json(path.read_text())
    elif kind == "unicode":
        path.read_bytes().decode("utf-8")
    elif kind == "recursion":
        json.loads(path.read_text())
    elif kind == "oserror":
        open(path / "missing")  # noqa: SIM115
    elif kind == "arthur":
        raise errors.ArthurError(f"{path}: refused; fix it")


CONTENT = {"json": "{bad", "toml": "a = = 1", "pydantic": '{"x": "nope"}', "unicode": b"\xff\xfe",
           "recursion": "[" * 100_000 + "]" * 100_000, "oserror": "", "arthur": ""}


def guarded_app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def read(kind: str, path: Path, as_json: bool = typer.Option(False, "--json")) -> None:
        _raise(kind, path)

    @app.command()
    def other() -> None:
        pass

    _errors.guard_all(app)
    return app


@pytest.mark.parametrize("kind", list(CONTENT))
def test_each_kind_prints_one_line_naming_the_file(kind, tmp_path):
    f = tmp_path / f"input.{kind}"
    data = CONTENT[kind]
    f.write_bytes(data) if isinstance(data, bytes) else f.write_text(data)
    app = guarded_app()
    res = CliRunner().invoke(app, ["read", kind, str(f)])
    assert res.exit_code == 1, (res.exit_code, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    out = res.output.strip()
    assert out.startswith("error:") and len(out.splitlines()) == 1 and str(f) in out.replace("\n", ""), out
    res = CliRunner().invoke(app, ["read", kind, str(f), "--json"])
    assert res.exit_code == 1 and str(f) in json.loads(res.stdout)["error"], res.exit_code


def test_debug_shows_the_traceback(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{bad")
    app = guarded_app()
    _errors.DEBUG["on"] = True
    try:
        res = CliRunner().invoke(app, ["read", "json", str(f)])
    finally:
        _errors.DEBUG["on"] = False
    assert isinstance(res.exception, json.JSONDecodeError)


def test_a_bug_is_not_hidden(tmp_path):
    """Anything that is not an error a user can cause (here a ZeroDivisionError) still raises."""
    assert _errors.message(ZeroDivisionError("x")) is None


def test_every_registered_command_is_guarded():
    from arthur_cluster import cli as cli_module

    names = [c.callback.__name__ for c in cli_module.app.registered_commands]
    assert names and all(getattr(c.callback, "__wrapped__", None) for c in cli_module.app.registered_commands)


def test_version_and_debug_in_a_real_process(tmp_path):
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("arthur-cluster ")
    proc = cli("probe", "")
    assert "Traceback" not in proc.stderr and proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: an empty model name"), proc.stderr
    proc = cli("--debug", "probe", "")
    assert "Traceback" in proc.stderr and "ModelNameError" in proc.stderr


# --- damaged jobs ------------------------------------------------------------------------------------------

GOOD_META = {"model": "m", "options": {"max_tokens": 8, "thinking": None}, "tasks": [{"id": "q1", "kind": "ask",
             "text": "Q?"}], "document": {"sha256": "0" * 64, "files": ["a.md"]}, "status": "running"}


@pytest.mark.parametrize("meta, doc, needle", [
    ("[]", "text", "damaged"),
    ("{}", "text", "damaged (model"),
    (json.dumps({**GOOD_META, "options": {}}), "text", "options.max_tokens"),
    ("{not json", "text", "unreadable"),
    (json.dumps(GOOD_META), None, "document.txt: unreadable"),
    (json.dumps(GOOD_META), b"\xff\xfe text", "not UTF-8"),
])
def test_damaged_resume_jobs_are_refused_in_one_line(tmp_path, meta, doc, needle):
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_text(meta)
    (job / "plan.json").write_text(json.dumps({"model": "m", "engine": "mlx", "route": "local", "context_limit": 100,
                                               "document_tokens": 1, "reserve_tokens": 8, "mode": "single"}))
    if isinstance(doc, bytes):
        (job / "document.txt").write_bytes(doc)
    elif doc is not None:
        (job / "document.txt").write_text(doc)
    proc = cli("doc", "--resume", "--out", str(job))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error:") and needle in proc.stderr and str(job) in proc.stderr, proc.stderr
