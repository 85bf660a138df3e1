"""What people read: `doc --summarize` and its resume, rates that are right or absent, progress rates that count
only computed tokens, plans that do not contradict themselves, `fits ?` explained, user text printed as written,
help without Python types, `probe --route` showing that route, suggestions that address the actual cause, and
clear errors for hostile probe inputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from arthur_cluster import docjob, documents, memory
from arthur_cluster.commands import doc as doc_cmd
from tests import realshape
from tests.conftest import NEMOTRON_CONFIG, copy_model


def cli(*args: str, env: dict | None = None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arthur_cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "100", **(env or {})}, cwd=cwd)


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]


# --- doc --summarize, then --resume of an interrupted summarize job ----------------------------------------


def test_doc_summarize_and_its_resume(tmp_path, tiny_models):
    doc = tmp_path / "log.md"
    doc.write_text("\n\n".join(f"Day {i}: node n{i % 3} held layers {i} to {i + 3}." for i in range(40)))
    model = str(tiny_models["llama-4bit"])
    job = tmp_path / "job"
    first = cli("doc", str(doc), "--summarize", "--ask", "Which node?", "--model", model, "--max-tokens", "6",
                "--out", str(job))
    no_traceback(first)
    assert first.returncode == 0, first.stderr[-2000:]
    assert re.search(r"^q2 Summary$", first.stdout, re.M) and re.search(r"^q1 Which node\?$", first.stdout, re.M)
    answers = {a["task"]: a for a in json.loads((job / "result.json").read_text())["answers"]}
    assert answers["q2"]["kind"] == "summarize" and answers["q2"]["answer"].strip()
    assert "## q2: Summary" in (job / "answers.md").read_text()
    # Interrupted before the summary: its unit is gone and the job is not finished; --resume does the rest.
    (job / "units" / "answer-q2.json").unlink()
    meta = json.loads((job / "job.json").read_text())
    meta["status"] = "interrupted"
    (job / "job.json").write_text(json.dumps(meta))
    again = cli("doc", "--resume", "--out", str(job), "--model", model)
    no_traceback(again)
    assert again.returncode == 0, again.stderr[-2000:]
    assert re.search(r"^q2 Summary$", again.stdout, re.M) and "1 unit(s) resumed from an earlier run" in again.stdout
    assert (job / "units" / "answer-q2.json").is_file()
    for out in (first.stdout, again.stdout):
        assert " 0.0 tok/s" not in out and "None" not in out


# --- numbers: right or absent ----------------------------------------------------------------------------


def _result(prefill_tps, decode_tps, resumed=0):
    return {"model": "m", "engine": "mlx", "route": "local", "mode": "single", "peak_memory_bytes": None,
            "tokens": {"prefilled": 0, "cached": 100, "generated": 42}, "prefill_tps": prefill_tps,
            "decode_tps": decode_tps, "resumed_units": resumed}


def test_a_rate_nothing_timed_is_absent_not_zero():
    assert docjob._rate(42, 0.0) is None and docjob._rate(0, 1.0) is None and docjob._rate(42, 2.0) == 21.0
    text = doc_cmd.summary_text(_result(None, None, resumed=1))
    assert "tok/s" not in text and "None" not in text and "42 generated" in text
    assert "42 generated at 21.0 tok/s" in doc_cmd.summary_text(_result(None, 21.0))


def test_the_progress_rate_counts_only_computed_tokens():
    """A cached prefix arrives at once in the first report: it is not a rate of millions of tok/s."""
    rep = doc_cmd.RichReporter(quiet=False)
    try:
        rep.unit_start("answer-q1", "Q", prompt_tokens=2400, max_tokens=8)
        rep.prefill(2347, 2400)  # restored from the cache: no work
        rep.prefill(2367, 2400)  # 20 tokens computed
        task = next(t for t in rep._progress.tasks if t.id == rep._pre)
        since = task.fields["since"]
        assert doc_cmd.rate(task, since + 1.0) == pytest.approx(20.0)
        assert doc_cmd.rate(task, since + 0.01) is None  # too little timed to say
    finally:
        rep.stop()


def _plan(**kw):
    base = dict(cached_prefix=False, mode="single", prefill_seconds=None, warmup_tps=None, prefill_tokens=1000,
                generate_tokens=64, generate_seconds=None, decode_tps=None, seconds=None, rates_from=None)
    return SimpleNamespace(**{**base, **kw})


def test_the_time_line_never_gives_a_rate_and_says_none_was_measured():
    only_decode = doc_cmd.time_text(_plan(decode_tps=32.0, generate_seconds=2.0, rates_from="warm-up"))
    assert "32.0 tok/s" in only_decode and "no rates measured" not in only_decode
    assert "no prefill rate measured" in only_decode
    cached = doc_cmd.time_text(_plan(cached_prefix=True, prefill_seconds=0.0, decode_tps=30.0, generate_seconds=2.0,
                                     seconds=2.0, rates_from="warm-up"))
    assert "None" not in cached and "rates from warm-up" in cached
    nothing = doc_cmd.time_text(_plan())
    assert "no rates measured" in nothing and "tok/s" not in nothing


def test_fits_unknown_is_explained(capsys):
    mp = memory.plan(json.loads(NEMOTRON_CONFIG.read_text()), context=4096, nodes=2, split="pipeline")
    assert all(n.fits is None for n in mp.nodes)
    plan = _plan(model="m", engine="mlx", route="r", fallback_reason=None, tokens_exact=True, document_tokens=10,
                 context_limit=4096, model_context=4096, reserve_tokens=8, tasks=[1], thinking_supported=False,
                 explanation=[], memory=mp, suggestions=[], feasible=True)
    doc_cmd.print_plan(plan)
    out = capsys.readouterr().out
    assert "fits ?: the node's memory is not known" in out and "[[cluster.nodes]]" in out


# --- user text printed as written -------------------------------------------------------------------------


def test_user_text_with_brackets_is_printed_as_written(tmp_path, tiny_models):
    doc = tmp_path / "d.md"
    doc.write_text("A note.")
    q = "What is [bold]this[/bold] in [[cluster.nodes]]?"
    proc = cli("doc", str(doc), "--ask", q, "--model", str(tiny_models["llama-4bit"]), "--max-tokens", "4",
               "--out", str(tmp_path / "job"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"q1 {q}" in proc.stdout


# --- help reads as the user's words ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["models", "link", "unlink", "doctor", "probe", "pick", "up", "down", "doc",
                                     "demo", None])
def test_help_shows_no_python_types(command):
    proc = cli(*([command] if command else []), "--help", env={"COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"<(bool|str|int|path|list\[str\]|float)>", proc.stdout), proc.stdout
    assert "Unused" not in proc.stdout
    if command == "probe":
        assert re.search(r"--exo\s+URL", proc.stdout) and re.search(r"--route\s+ROUTE", proc.stdout)


# --- probe: --route shows that route; hostile inputs are one clear line ---------------------------------------


def test_probe_route_prints_only_the_asked_routes(lmstudio_home):
    proc = cli("probe", "Tiny-NemotronH-MLX-8bit", "--route", "mlx/tensor", "--static-only")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys = set(re.findall(r"\b(?:exo|mlx)/(?:single|pipeline|tensor)/\w+/\d+\b", proc.stdout.split("other route")[0]))
    assert keys and all(k.startswith("mlx/tensor/") for k in keys), keys
    assert "other route(s) probed" in proc.stdout and "fits ?:" in proc.stdout


def test_probe_refuses_a_non_ascii_node_count_in_one_line(lmstudio_home):
    proc = cli("probe", "Tiny-NemotronH-MLX-8bit", "--route", "mlx/tensor/ring/²", "--static-only")
    no_traceback(proc)
    assert proc.returncode == 1 and "node count must be a positive number" in proc.stderr, proc.stderr


def test_probe_of_a_huge_layer_count_names_the_cap(tmp_path, tiny_models):
    folder = copy_model(tiny_models["llama-4bit"], tmp_path / "org" / "Huge")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**15
    (folder / "config.json").write_text(json.dumps(cfg))
    proc = cli("probe", str(folder), "--static-only")
    no_traceback(proc)
    assert proc.returncode == 3, proc.stderr[-2000:]  # blocked, with the cap named
    assert "num_hidden_layers = 1000000000000000 is outside 0..100000 (the cap)" in proc.stdout


# --- suggestions that address the actual cause -------------------------------------------------------------


def test_pick_with_the_stock_catalogue_names_a_model_on_disk(lmstudio_home, tmp_path):
    assert cli("link", "--all").returncode == 0  # linked entries are the same models: named once
    proc = cli("pick", "--engine", "mlx", env={"EXO_API": "http://127.0.0.1:9"}, cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 1
    err = " ".join(proc.stderr.split())
    assert "on disk but not in the catalogue:" in err and "mlx-community/Tiny-Llama-MLX-4bit" in err, err
    listed = err.split("on disk but not in the catalogue:")[1].split(";")[0]
    assert sorted(listed.replace(",", " ").split()) == ["lmstudio-community/Tiny-NemotronH-MLX-8bit",
                                                        "mlx-community/Tiny-Llama-MLX-4bit"], listed  # each once
    assert "(`arthur-cluster up " in err


def test_a_plan_whose_weights_cannot_fit_suggests_a_smaller_model_not_max_tokens(tmp_path):
    folder = realshape.build(tmp_path / "lmstudio-community" / "NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit",
                             NEMOTRON_CONFIG)
    f = tmp_path / "d.md"
    f.write_text("\n\n".join(f"Paragraph {i}: the cluster splits the model's layers." for i in range(300)))
    planner = docjob.plan_runner(str(folder))
    small = memory.NodeMemory(name="mini", memory_bytes=16 << 30)  # 33.6 GB of weights cannot fit
    plan = docjob.plan_job(documents.load([str(f)]), docjob.make_tasks(["Q?"]), planner, nodes=[small],
                           warmup=False)
    assert not plan.feasible
    text = " ".join(plan.suggestions)
    assert "--max-tokens" not in text and "lower-bit quantization" in text, plan.suggestions
