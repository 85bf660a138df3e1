"""Document jobs on the tiny models: plans, single pass, map-reduce, the prompt cache, resume, PDF and several
files, refusals that say what would fit, and exo streaming through exo's own API code (exo-real)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from arthur_cluster import bringup, docjob, documents, memory, paths
from arthur_cluster.fallback import Route
from tests.test_documents import write_pdf

QUESTIONS = ["What is two plus two?", "Which node holds part 3?"]


def make_doc(n: int = 20) -> str:
    return "\n\n".join(f"## Section {i}\n\nThe cluster runs the model across several machines. Node {i} holds "
                       f"part {i} of the weights, and the answer for section {i} is {i * 7}." for i in range(n))


@pytest.fixture(scope="module")
def runner(tiny_models):
    r = docjob.load_local(tiny_models["nemotron_h-8bit"], "tiny/nemotron-8bit")
    yield r
    r.close()


def run_api(runner, tmp_path, text: str, *, name="job", asks=QUESTIONS, **kw):
    f = tmp_path / f"{name}.md"
    f.write_text(text)
    doc = documents.load([str(f)])
    tasks = docjob.make_tasks(asks)
    plan = docjob.plan_job(doc, tasks, runner, max_tokens=kw.get("max_tokens", 12), context=kw.get("context"),
                           warmup=False)
    job = docjob.create_job(doc, tasks, runner, max_tokens=kw.get("max_tokens", 12), thinking=None,
                            context=kw.get("context"), out=tmp_path / name)
    docjob.write_json(job.dir / "plan.json", plan.model_dump(mode="json"))
    return plan, job, docjob.run_job(job, plan, runner)


def unit_ids(job) -> dict[str, list[int]]:
    return {f.stem: json.loads(f.read_text())["token_ids"] for f in sorted((job.dir / "units").glob("*.json"))}


def test_single_pass_shares_one_prefill_and_matches_no_cache(runner, tmp_path):
    runner.use_cache = True
    plan, job, result = run_api(runner, tmp_path, make_doc(), name="cached")
    assert plan.mode == "single" and plan.tokens_exact and plan.memory is not None and plan.memory.fits
    assert result["cache_hits"]["prefill"] == 1 and result["cache_hits"]["memory"] == 1
    assert result["tokens"]["cached"] > plan.document_tokens  # the second question reused the prefix
    assert [a["task"] for a in result["answers"]] == ["q1", "q2"] and result["peak_memory_bytes"] > 0
    assert (job.dir / "answers.md").read_text().count("## q") == 2
    assert json.loads((job.dir / "job.json").read_text())["status"] == "done"
    runner.use_cache = False
    try:
        _, job2, result2 = run_api(runner, tmp_path, make_doc(), name="uncached")
    finally:
        runner.use_cache = True
    assert result2["cache_hits"]["none"] == 2 and result2["tokens"]["cached"] == 0
    assert unit_ids(job2) == unit_ids(job) and result2["answers"] == result["answers"]
    assert unit_ids(job)["answer-q1"] != unit_ids(job)["answer-q2"]  # else a leaked cache could not show


def test_map_reduce_when_the_document_exceeds_the_context(runner, tmp_path):
    plan, job, result = run_api(runner, tmp_path, make_doc(), name="mr", context=400, max_tokens=16)
    assert plan.mode == "map-reduce" and len(plan.chunks) > 2
    assert all(c.tokens <= plan.chunk_budget for c in plan.chunks)
    assert any(b.start < a.end for a, b in zip(plan.chunks, plan.chunks[1:]))  # chunks overlap
    assert "map-reduce" in plan.explanation[0]
    names = set(unit_ids(job))
    assert {f"map-c{c.index:04d}-{t}" for c in plan.chunks for t in ("q1", "q2")} <= names
    assert any(n.startswith("reduce-q1-") for n in names) and any(n.startswith("reduce-q2-") for n in names)
    assert result["mode"] == "map-reduce" and result["cache_hits"]["memory"] == len(plan.chunks)
    # Every prompt, the reduce steps included, stayed inside the working context.
    for f in (job.dir / "units").glob("*.json"):
        u = json.loads(f.read_text())
        assert u["prompt_tokens"] + 16 <= 400


def test_pdf_and_several_files_make_one_job(runner, tmp_path):
    pdf = tmp_path / "spec.pdf"
    write_pdf(pdf, ["The cluster has two nodes.", "Each node holds half of the layers."])
    notes = tmp_path / "notes.txt"
    notes.write_text("Node 1 is the coordinator.")
    result = docjob.run([str(pdf), str(notes)], asks=["How many nodes?"], max_tokens=8, runner=runner,
                        out=tmp_path / "multi")
    doc = (tmp_path / "multi" / "document.txt").read_text()
    assert documents.marker(str(pdf)) in doc and documents.marker(str(notes)) in doc and "coordinator" in doc
    assert result["answers"][0]["task"] == "q1" and result["tokens"]["document"] > 10


def catalogue(tmp_path, monkeypatch, contexts: dict[str, int]) -> None:
    lines = [f'target = "{next(iter(contexts))}"', f"fallbacks = {json.dumps(list(contexts)[1:])}"]
    for rid, ctx in contexts.items():
        lines += [f'[models."{rid}"]', f"context_length = {ctx}", "storage_bytes = 1000000",
                  "kv_bytes_per_token = 1024"]
    f = tmp_path / "models.toml"
    f.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("ARTHUR_CLUSTER_MODELS", str(f))


def test_too_large_for_every_candidate_explains_and_maps(runner, tmp_path, monkeypatch):
    catalogue(tmp_path, monkeypatch, {"tiny/nemotron-8bit": 4096, "tiny/llama-4bit": 2048})
    doc = documents.Document(make_doc(120))
    plan = docjob.plan_job(doc, docjob.make_tasks(QUESTIONS), runner, max_tokens=32, warmup=False)
    assert plan.document_tokens > 4096 and plan.mode == "map-reduce"
    assert any("no candidate model holds the whole document" in e for e in plan.explanation)
    assert [a.model for a in plan.alternatives] == ["tiny/llama-4bit"] and not plan.alternatives[0].single_pass
    # A model with a long enough context is named when the catalogue has one.
    catalogue(tmp_path, monkeypatch, {"tiny/nemotron-8bit": 4096, "big/long-context": 262144})
    plan = docjob.plan_job(doc, docjob.make_tasks(QUESTIONS), runner, max_tokens=32, warmup=False)
    assert any("big/long-context (262,144 tokens)" in s for s in plan.suggestions)


def test_memory_bound_plans_shrink_the_context_or_refuse(runner):
    doc = documents.Document(make_doc(10))
    tasks = docjob.make_tasks(QUESTIONS)
    full = docjob.plan_job(doc, tasks, runner, max_tokens=16, warmup=False)
    assert full.mode == "single"
    small = memory.plan(runner.info, context=512, nodes=1).nodes[0].total
    node = memory.NodeMemory(name="small-mac", memory_bytes=small + 1, usable_fraction=1.0)
    plan = docjob.plan_job(doc, tasks, runner, max_tokens=16, warmup=False, nodes=[node])
    assert plan.mode == "map-reduce" and plan.memory.fits and plan.memory.context <= 512
    assert any(e.startswith("memory: small-mac needs") for e in plan.explanation)
    # A suggestion of more nodes must be true: k such nodes hold the full context in a pipeline, one does not.
    for s in (s for s in plan.suggestions if s.startswith("more nodes:")):
        k = int(s.split()[2])
        need = full.memory.context
        assert k >= 2 and not memory.plan(runner.info, context=need, nodes=[node], prefill_step=runner.step).fits
        nodes = [node.model_copy(update={"name": f"n{i}"}) for i in range(k)]
        assert memory.plan(runner.info, context=need, nodes=nodes, split="pipeline", prefill_step=runner.step).fits
    tiny = memory.NodeMemory(name="tiny-mac", memory_bytes=1000, usable_fraction=1.0)
    plan = docjob.plan_job(doc, tasks, runner, max_tokens=16, warmup=False, nodes=[tiny])
    assert plan.mode == "cannot-run" and not plan.feasible
    with pytest.raises(docjob.DocJobError, match="cannot run"):
        docjob.run_job(None, plan, runner)  # type: ignore[arg-type]


# --- the command line in real processes ---------------------------------------------------------------


def cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "arthur_cluster.cli", "doc", *args], capture_output=True,
                          text=True, timeout=600, **kw)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_cli_plan_refusal_says_what_would_fit(tiny_models, tmp_path):
    f = tmp_path / "doc.md"
    f.write_text(make_doc(20))
    proc = cli(str(f), "--ask", "Q?", "--model", str(tiny_models["nemotron_h-8bit"]), "--context", "120",
               "--max-tokens", "64", "--plan", check=False)
    assert proc.returncode == 3
    assert "too small" in proc.stdout and "smaller --max-tokens" in proc.stdout and "Traceback" not in proc.stderr
    proc = cli("missing.md", "--ask", "Q?", "--model", str(tiny_models["nemotron_h-8bit"]), check=False)
    assert proc.returncode == 1 and "missing.md: no such file" in proc.stderr
    broken = tmp_path / "pub" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text((tiny_models["nemotron_h-8bit"] / "config.json").read_text())
    proc = cli(str(f), "--ask", "Q?", "--model", str(broken), check=False)
    assert proc.returncode == 1 and str(broken) in proc.stderr and "Traceback" not in proc.stderr


def test_cli_disk_cache_in_a_second_process(tiny_models, tmp_path):
    f = tmp_path / "doc.md"
    f.write_text(make_doc(12))
    base = [str(f), "--ask", QUESTIONS[0], "--ask", QUESTIONS[1], "--model", str(tiny_models["llama-4bit"]),
            "--max-tokens", "10", "--json"]
    first = json.loads(cli(*base, "--out", str(tmp_path / "a")).stdout)["result"]
    second = json.loads(cli(*base, "--out", str(tmp_path / "b")).stdout)["result"]
    plain = json.loads(cli(*base, "--out", str(tmp_path / "c"), "--no-cache").stdout)["result"]
    assert first["cache_hits"] == {"memory": 1, "disk": 0, "prefill": 1, "none": 0}
    assert second["cache_hits"]["disk"] == 1 and second["tokens"]["prefilled"] < first["tokens"]["prefilled"]
    assert first["answers"] == second["answers"] == plain["answers"]
    assert list(paths.prompt_cache_dir().glob("resident/*.safetensors"))


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_models, tmp_path):
    f = tmp_path / "doc.md"
    f.write_text(make_doc(16))
    base = [str(f), "--ask", QUESTIONS[0], "--ask", QUESTIONS[1], "--model", str(tiny_models["nemotron_h-8bit"]),
            "--context", "400", "--max-tokens", "16", "--json"]
    whole = json.loads(cli(*base, "--out", str(tmp_path / "whole"), "--no-cache").stdout)["result"]
    units = tmp_path / "killed" / "units"
    proc = subprocess.Popen([sys.executable, "-m", "arthur_cluster.cli", "doc", *base, "--out",
                             str(tmp_path / "killed"), "--no-cache"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(units.glob("*.json"))) < 3 and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(units.glob("*.json")))
    assert 3 <= done < whole["units"], "the job was not killed mid-way"
    assert json.loads((tmp_path / "killed" / "job.json").read_text())["status"] == "running"
    other = cli("--resume", "--out", str(tmp_path / "killed"), "--model", str(tiny_models["llama-4bit"]), check=False)
    assert other.returncode == 1 and "was started with" in other.stderr  # its parts came from another model
    resumed = json.loads(cli("--resume", "--out", str(tmp_path / "killed"), "--json").stdout)["result"]
    assert resumed["resumed_units"] >= done and resumed["units"] == whole["units"]
    assert resumed["answers"] == whole["answers"]
    assert (tmp_path / "killed" / "answers.md").read_text() == (tmp_path / "whole" / "answers.md").read_text()


# --- exo --------------------------------------------------------------------------------------------------


class Recorder(docjob.Reporter):
    def __init__(self):
        self.prefill_events: list[tuple[int, int]] = []
        self.tokens = 0

    def prefill(self, done: int, total: int) -> None:
        self.prefill_events.append((done, total))

    def token(self, generated: int) -> None:
        self.tokens = generated


def test_a_document_job_on_an_exo_deployment(shared_exo, tiny_models, tmp_path):
    """exo's own API code serves the deployment (its runners are faked: every answer is "2 + 2 = 4.")."""
    from arthur_cluster.exo_client import ExoClient
    from tests.fixtures_exo import LLAMA_ID

    client = ExoClient(shared_exo.url)
    inst = client.place_and_wait(LLAMA_ID, 'Pipeline', 'MlxRing', 2, timeout=60, poll=0.05)
    dep = bringup.Deployment(
        model=LLAMA_ID, served_id=LLAMA_ID, engine="exo",
        route=Route(engine="exo", sharding="pipeline", backend="ring", nodes=2), endpoint=shared_exo.url,
        nodes=inst.node_ids, fallback_reason="target does not fit",
        model_path=tiny_models["llama-4bit"], smoke=bringup.Smoke(question="q", answer="a"))
    bringup.write_record(dep)
    f = tmp_path / "doc.md"
    f.write_text(make_doc(6))
    rec = Recorder()
    result = docjob.run([str(f)], asks=QUESTIONS, max_tokens=6, reporter=rec, out=tmp_path / "exo")
    assert result["engine"] == "exo" and result["model"] == LLAMA_ID
    assert result["route"] == "exo pipeline/ring on 2 nodes" and result["fallback_reason"] == "target does not fit"
    assert rec.prefill_events and rec.prefill_events[-1][0] == rec.prefill_events[-1][1] > 0  # prefill_progress
    assert rec.tokens == 6
    # Every answer's text came through (the raw text: a random model may close a think block and say nothing after).
    texts = [json.loads(f.read_text())["text"] for f in (tmp_path / "exo" / "units").glob("*.json")]
    assert len(texts) == 2 and all(texts), texts
    assert result["tokens"]["generated"] == 12 and result["decode_tps"] > 0
    plan = json.loads((tmp_path / "exo" / "plan.json").read_text())
    assert plan["tokens_exact"] and plan["nodes"][0]["name"] in inst.node_ids
    client.delete_instance(inst.instance_id)


def test_every_question_reuses_one_tokenization_of_the_document(tiny_models):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_models["llama-4bit"])
    seen: list[int] = []
    encode = tok.encode
    tok.encode = lambda text, **kw: seen.append(len(text)) or encode(text, **kw)
    prompter = docjob.Prompter(tok)
    head = docjob.single_head(make_doc(8))
    first, second = prompter.build(head, "Question: one?"), prompter.build(head, "Question: two?")
    assert first.prefix == second.prefix and first.suffix != second.suffix
    assert sum(n > len(head) // 2 for n in seen) == 1  # the document itself was encoded once


# --- every answer against a from-scratch run --------------------------------------------------------------
# The cached path (document prefilled once, rewound for each question) must give what prefilling the document and
# that question from nothing gives: the same tokens, log-probs within float32 rounding (the two paths cut the
# prompt into prefill steps at different places). The questions give different answers, so a state left over
# from one question (a Mamba state not rewound, a KV cache one token long) changes the next one.

STEP = 16  # prefill step: the document is not a multiple of it and every question is longer than it
LONG_QUESTIONS = [
    "Which node holds part 3 of the weights, and what is the answer for section 3 of the document?",
    "Summarize how the cluster splits the model across the machines, section by section, in one line.",
    "What is two plus two, and which section of the document says the answer is fourteen?",
]
LOGPROB_ATOL = 1e-5  # measured: at most 2.4e-6 between the cached and the from-scratch path (float32, CPU)


class Tap:
    """The model, recording the last position's logits of every call of one token (the generation steps)."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def __call__(self, inputs, cache=None, **kw):
        import mlx.core as mx

        out = self.model(inputs, cache=cache, **kw)
        if inputs.shape[1] == 1:
            row = out[0, -1]
            mx.eval(row)  # evaluated on the thread that runs the model (MLX streams belong to their thread)
            self.rows.append(row)
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


def _one_token_chunk(n: int, step: int, keep_last: bool) -> bool:
    """Would prefilling n tokens in steps of `step` make a one-token chunk (which the tap would take for a
    generation step)? `keep_last`: mlx-lm's generate keeps the last prompt token for the first step."""
    m = n - 1 if keep_last else n
    return m > 0 and m % step == 1


@pytest.fixture(scope="module")
def f32_models(tiny_models, tmp_path_factory):
    from arthur_cluster import miniature

    llama = miniature.make(tmp_path_factory.mktemp("llama-f32") / "m", "llama",
                           overrides={"tie_word_embeddings": False})
    return {"nemotron_h": tiny_models["nemotron_h-f32"], "llama": llama}


def _scratch(tap, tok, tokens: list[int], max_tokens: int) -> tuple[list[int], list]:
    """Greedy ids and log-probs of a from-scratch run, cut like the runner's answers (no end token)."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    assert not _one_token_chunk(len(tokens), STEP, keep_last=True)
    tap.rows = []
    ids = []
    for r in stream_generate(tap, tok, tokens, max_tokens=max_tokens, sampler=make_sampler(temp=0.0),
                             prefill_step_size=STEP):
        if r.finish_reason is None or r.finish_reason == "length":
            ids.append(r.token)
    rows = [x - mx.logsumexp(x) for x in tap.rows[:len(ids)]]
    assert [int(mx.argmax(x)) for x in rows] == ids  # the tap saw the steps that made the tokens
    return ids, rows


@pytest.mark.parametrize("arch", ["nemotron_h", "llama"])
def test_every_cached_answer_equals_a_from_scratch_prefill(f32_models, arch, tmp_path, monkeypatch):
    import mlx.core as mx
    from mlx_lm import load

    from arthur_cluster.engines.mlx import MlxEngine
    from arthur_cluster.parallel import server

    folder = f32_models[arch]
    model, tok = load(str(folder))
    tap = Tap(model)
    prompter = docjob.Prompter(tok)
    head = docjob.single_head(make_doc(7))
    prompts = [prompter.build(head, docjob.task_tail(t, "single")) for t in docjob.make_tasks(LONG_QUESTIONS)]
    n_prefix = len(prompts[0].prefix)
    assert n_prefix % STEP and all(len(p.suffix) > STEP for p in prompts)
    assert not _one_token_chunk(n_prefix, STEP, keep_last=False)
    max_tokens = 10
    refs = [_scratch(tap, tok, p.prefix + p.suffix, max_tokens) for p in prompts]
    assert len({tuple(ids) for ids, _ in refs}) == len(refs), "the questions must give different answers"

    loaded = server.load_model
    monkeypatch.setattr(server, "load_model", lambda args, group: (tap, *loaded(args, group)[1:]))

    def runner() -> docjob.MlxRunner:
        # the engine in this process, on the tapped model; restore points only where the document ends (no block
        # multiples), so every prefill chunk is longer than one token and the tap sees generation steps only
        eng = MlxEngine(folder, model_id=f"tiny/{arch}", prefill_step=STEP, options=["--block", "100000"])
        return docjob.MlxRunner(eng, model_id=f"tiny/{arch}", path=folder, step=STEP)

    first = runner()
    order = [0, 1, 2, 0, 2]  # every question, then two again: the cache is rewound four times
    got = []
    for i in order:
        assert not _one_token_chunk(len(prompts[i].suffix), STEP, keep_last=True)
        tap.rows = []
        a = first.answer(f"q{i}", prompts[i], max_tokens=max_tokens, temperature=0.0, reporter=docjob.Reporter())
        got.append((i, a, tap.rows[:len(a.token_ids)]))
    first.close()
    second = runner()  # a new runner: the document's cache from disk
    tap.rows = []
    a = second.answer("q1-disk", prompts[1], max_tokens=max_tokens, temperature=0.0, reporter=docjob.Reporter())
    got.append((1, a, tap.rows[:len(a.token_ids)]))
    second.close()
    assert [a.cache for _, a, _ in got] == ["prefill", "memory", "memory", "memory", "memory", "disk"]
    for i, a, rows in got:
        ids, ref_rows = refs[i]
        assert a.token_ids == ids, (a.unit, a.cache)
        worst = max(float(mx.max(mx.abs((x - mx.logsumexp(x)) - y))) for x, y in zip(rows, ref_rows))
        assert worst <= LOGPROB_ATOL, (a.unit, a.cache, worst)
