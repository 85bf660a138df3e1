"""The README is a test: every `arthur-cluster` command that README.md and docs/*.md show runs on the demo library
(`arthur-cluster demo --keep` makes it), exits 0 and prints what a user would accept; the exo steps run against
exo's own API code (exo-real). The commands are read from the documents' text, so a changed document is tested.

Placeholders and the real model's names are mapped onto the demo world (PLACES); an option group `[--x]` runs
with none and with all of its options; `A|B` runs each; `doc ... --plan` also runs without --plan, as the README
says ("drop --plan to run it"). A new kind of command in the documents fails `test_every_documented_command_is_run`
until it gets a place in STAGES.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_exo import start_harness
from tests.test_documents import write_pdf

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
QUESTION = "Which node holds the most memory?"

# The real model's names, as the walk-through shows them, and the placeholders of the command table.
PLACES = {
    "lmstudio-community/NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit": "arthur-demo/Tiny-NemotronH-MLX-8bit",
    "NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit": "Tiny-NemotronH-MLX-8bit",
    "mlx-community/NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8Bit": "arthur-demo/Tiny-NemotronH-Linked-As",
    "MODEL": "Tiny-NemotronH-MLX-8bit", "NAME": "Tiny-Llama-MLX-4bit", "N": "2", "R": "mlx/tensor/ring/2",
    "Q": QUESTION, "What changed?": QUESTION, "COMMAND": "models",
    "65536": "4096",  # the demo model's whole context
}
# `demo` runs once, in the fixture (`demo --keep --no-proof`); tests/test_demo.py runs `demo --json` (with the
# proof) and `demo --no-proof` (its temporary home removed): a full demo takes most of a minute on two cores.
COVERED = [["demo"], ["demo", "--keep"], ["demo", "--keep", "--no-proof", "--json"]]
# When each kind of command runs (first word after the global options, and whether it talks to exo).
STAGES = ["version", "debug", "models", "link", "doctor", "probe", "pick", "up-exo", "doc", "down", "up", "unlink",
          "demo"]


# --- reading the documents ---------------------------------------------------------------------------------


def documented() -> list[str]:
    """Every arthur-cluster command in the documents, as written (code spans and code blocks)."""
    out: list[str] = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")  # shell line continuations
        text = re.sub(r"`(arthur-cluster[^`\n]*)\n\s*([^`\n]*)`", r"`\1 \2`", text)  # a span across a line break
        for line in text.splitlines():
            spans = re.findall(r"`([^`]+)`", line) or ([line.strip()] if line.startswith(("    ", "python")) else [])
            said = any(s.startswith("arthur-cluster ") for s in spans)
            for s in spans:
                s = s.split("&&")[-1].strip() if "&& arthur-cluster" in s else s.strip()
                words = s.split()
                if s.startswith("arthur-cluster "):
                    out.append(s)
                elif words and words[0] in ("up", "down", "pick") and (said or len(words) > 1):
                    out.append("arthur-cluster " + s)  # `arthur-cluster pick`, `up`, `down`; `up --engine mlx`
    return list(dict.fromkeys(out))


def variants(command: str) -> list[list[str]]:
    """The command with its option groups left out and all put in, and each alternative of A|B."""
    tokens = shlex.split(command.replace("\\|", "|"))[1:]
    required: list[list[str]] = []  # each item: its alternatives, each a token list
    optional: list[str] = []
    group: list[str] | None = None
    for t in tokens:
        if group is not None or t.startswith("["):
            group = (group or []) + [t.strip("[]")]
            if t.endswith("]"):
                optional += group
                group = None
        elif "|" in t and not t.startswith(("http", "--exo")):
            required.append([[a] for a in t.split("|")])
        else:
            required.append([[t]])
    out: list[list[str]] = []
    for pick in range(max(len(r) for r in required) if required else 1):
        base = [tok for r in required for tok in r[min(pick, len(r) - 1)]]
        out += [base] + ([base + optional] if optional and pick == 0 else [])
    for v in list(out):
        if v[:1] == ["doc"] and "--plan" in v:
            out.append([t for t in v if t != "--plan"])  # "drop --plan to run it on the deployment"
    return [list(v) for v in dict.fromkeys(tuple(v) for v in out)]


def stage(argv: list[str]) -> str:
    if argv[:1] == ["--version"]:
        return "version"
    if argv[:1] == ["--debug"]:
        return "debug"
    if argv[0] == "up" and "--exo" in argv:
        return "up-exo"
    return argv[0]


def test_the_documents_show_the_commands_this_test_expects():
    """The extraction itself: it finds the table, the walk-through and docs/exo.md (a broken reader tests
    nothing)."""
    found = documented()
    kinds = {stage(v) for c in found for v in variants(c)}
    assert {"models", "link", "doctor", "unlink", "probe", "pick", "up", "up-exo", "down", "doc", "demo", "version",
            "debug"} <= kinds, kinds
    assert any("--repo-id" in c for c in found)  # docs/exo.md's command, across its line continuation
    assert ["doc", "FILE", "--ask", "Q", "--summarize"] in variants(
        "arthur-cluster doc FILE --ask Q [--summarize] [--plan]")


# --- running them -----------------------------------------------------------------------------------------


def _env_sh(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0]
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """`arthur-cluster demo --keep --no-proof`, as the README shows it; then its env.sh, a PDF report and exo-real."""
    root = tmp_path_factory.mktemp("readme")
    (root / "home").mkdir()
    base = {**os.environ, "HOME": str(root / "home"), "TMPDIR": str(root), "COLUMNS": "100",
            "EXO_API": "http://127.0.0.1:9"}  # no exo at the default address: `up` alone means MLX here
    for var in ("ARTHUR_CLUSTER_HOME", "ARTHUR_CLUSTER_MODELS", "ARTHUR_LMSTUDIO_HOME", "ARTHUR_LMSTUDIO_MODELS",
                "HF_HUB_CACHE", "HF_HOME", "EXO_HOME", "EXO_MODELS_READ_ONLY_DIRS"):
        base.pop(var, None)
    demo = run(["demo", "--keep", "--no-proof"], base, cwd=root)
    home = Path(re.search(r"Demo home kept at (\S+)\. To use it", demo.stdout).group(1))
    assert f". {home / 'env.sh'}" in demo.stdout  # it says how to use what it kept
    for step in ("1. Demo library", "4. Probe", "5. Bring up", "6. Document job", "answer (random weights"):
        assert step in demo.stdout, demo.stdout
    env = {**base, **_env_sh(home / "env.sh")}
    pdf = root / "report.pdf"
    log = (home / "documents" / "operations-log.md").read_text().splitlines()
    write_pdf(pdf, ["\n".join(line[:90] for line in log[i:i + 40] if line) for i in range(0, len(log), 40)])
    world = {"env": env, "root": root, "home": home, "pdf": pdf, "exo": None, "demo": demo}
    yield world
    if world["exo"] is not None:
        world["exo"].stop()


def exo_url(world: dict) -> str:
    """exo-real, started when the first exo step runs (the steps before it need none), its read-only dir the
    demo home's exo links directory, as `link` printed it."""
    if world["exo"] is None:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in world["env"].items():
                mp.setenv(k, v)
            from arthur_cluster import paths

            links = paths.exo_links_dir()
        world["exo"] = start_harness(world["root"] / "exo", "--nodes", "2", "--ram-gib", "48", links=links)
    return world["exo"].url


def run(argv: list[str], env: dict, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "arthur_cluster.cli", *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)
    shown = f"$ arthur-cluster {shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    return proc


def concrete(argv: list[str], world: dict, lazy: bool = False) -> list[str]:
    """The command in the demo world; `lazy` leaves DIR (the newest job, known only when it runs)."""
    jobs = Path(world["env"]["ARTHUR_CLUSTER_HOME"]) / "jobs"
    places = {**PLACES, "FILE": str(world["pdf"]), "report.pdf": str(world["pdf"])}
    out = [places.get(t, t) for t in argv]
    if not lazy:
        out = [exo_url(world) if t in ("URL", "http://mac1:52415") else t for t in out]
    if "DIR" in out and not lazy:  # the job to continue: the newest one
        out[out.index("DIR")] = str(max(jobs.iterdir(), key=lambda p: p.stat().st_mtime))
    return out


def interrupt_newest_job(world: dict) -> None:
    """What Ctrl-C leaves: the newest job with its last unit not finished (the README's --resume continues it)."""
    jobs = Path(world["env"]["ARTHUR_CLUSTER_HOME"]) / "jobs"
    job = max(jobs.iterdir(), key=lambda p: p.stat().st_mtime)
    units = sorted((job / "units").glob("*.json"), key=lambda p: p.stat().st_mtime)
    units[-1].unlink()
    meta = json.loads((job / "job.json").read_text())
    meta["status"] = "interrupted"
    (job / "job.json").write_text(json.dumps(meta))


def accept(argv: list[str], proc: subprocess.CompletedProcess) -> None:
    """Output a user would accept, per kind of command."""
    out = proc.stdout
    kind = stage(argv)
    if "--json" in argv:
        json.loads(out)
    elif kind == "models":
        assert "arthur-demo/" in out and "Tiny-NemotronH-MLX-8bit" in out and "src:" in out
    elif kind == "link":
        assert "arthur-demo/" in out and ("would" in out if "--dry-run" in argv else "EXO_MODELS_READ_ONLY_DIRS" in out)
    elif kind == "doctor":
        assert "no problems" in out
    elif kind == "probe":
        assert re.search(r"-> ok \(", out), out
    elif kind in ("pick",):
        assert "arthur-demo/Tiny-NemotronH-MLX-8bit" in out and "why:" in out
    elif kind in ("up", "up-exo"):
        assert "up: arthur-demo/" in out and re.search(r"answer:\s+'.+'", out), out
        assert ("exo" in out.split("route:")[1].split("\n")[0]) == (kind == "up-exo"), out
    elif kind == "doc" and "--plan" in argv:
        assert "Plan arthur-demo/" in out and "time:" in out
    elif kind == "doc":
        answers = re.findall(r"^q\d+ (.+)\n(.+)$", out, re.M)
        assert answers and all(a.strip() for _, a in answers), out  # non-empty answers
        assert "Answers: " in out and re.search(r"tokens prefilled.*generated", out), out  # the summary
        if "--summarize" in argv:
            assert any(title == "Summary" for title, _ in answers), out
    elif kind == "version":
        assert out.startswith("arthur-cluster ")


def test_every_documented_command_is_run(world):
    todo = list(dict.fromkeys(tuple(concrete(v, world, lazy=True)) for c in documented() for v in variants(c)))
    todo = [list(v) for v in todo]
    todo = [v for v in todo if v[0] != "demo" or v not in COVERED]
    unknown = sorted({stage(v) for v in todo} - set(STAGES))
    assert not unknown, f"documented commands with no place in this test: {unknown}"
    todo.sort(key=lambda v: (STAGES.index(stage(v)), "--resume" in v, "--plan" not in v))
    if any(stage(v) == "up" for v in todo):
        todo.append(["down"])  # the last `up` is taken down again
    ran = []
    for argv in todo:
        if "--resume" in argv:
            interrupt_newest_job(world)
        args = concrete(argv, world)
        proc = run(args, world["env"], cwd=world["root"])
        accept(argv, proc)
        ran.append(argv)
    assert len(ran) >= 20, ran
