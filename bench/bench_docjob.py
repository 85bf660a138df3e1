"""Document-job overhead on CPU: the job (prompt building, prefix cache, disk cache, unit files, outputs) versus
raw mlx_lm.stream_generate on the same kind of prompt, with a tiny Nemotron-shaped 8-bit model. The job runs on the
MLX engine in this process (its rank thread); each run's document differs in its first line, so each job prefills.

    .venv/bin/python bench/bench_docjob.py [--tokens 2000] [--max-tokens 128] [--repeat 5]

Prints JSON; "ratio" = raw seconds / job seconds (target >= 0.97), best of --repeat interleaved runs;
"cpu_ratio" the same in process CPU time, which other load on the machine disturbs less. Model load and planning are outside both
timings (planning, with its warm-up, is reported on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000, help="document size, roughly")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-docjob-"))
    os.environ["ARTHUR_CLUSTER_HOME"] = str(root / "state")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        print(json.dumps(run(root, args), indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, args) -> dict:
    from mlx_lm import load, stream_generate

    from arthur_cluster import docjob, documents, miniature
    from arthur_cluster.demo import REAL_CONFIGS

    real = json.loads(REAL_CONFIGS["nemotron_h"].read_text())
    folder = miniature.make(root / "model", "nemotron_h", like=real, quant=miniature.quantization_like(real))
    runner = docjob.load_local(folder, "bench/tiny-nemotron-8bit")  # the MLX engine in this process (its thread)
    model, tok = load(str(folder))  # mlx-lm's own copy, on this thread, for the raw runs
    para = "The cluster runs the model across several machines; each node holds part of the weights. "
    text = "\n\n".join(f"## Part {i}\n\n{para * 2}" for i in range(args.tokens // 70))
    tasks = docjob.make_tasks(["What does the document say about the nodes?"])

    def document(i: int):
        """Each run its own document (one line differs at the start), so every job prefills it again."""
        f = root / f"doc{i}.md"
        f.write_text(f"Run {i}.\n\n{text}")
        return documents.load([str(f)])

    t0 = time.perf_counter()
    plan = docjob.plan_job(document(-1), tasks, runner, max_tokens=args.max_tokens)
    plan_s = time.perf_counter() - t0
    if plan.mode != "single":
        raise SystemExit(f"the document ({plan.document_tokens} tokens) must fit one pass: lower --tokens")

    def raw(i: int) -> tuple[float, float, int]:
        doc = document(i)
        p = docjob.Prompter(tok).build(docjob.single_head(doc.text), docjob.task_tail(tasks[0], "single"))
        t, c = time.perf_counter(), time.process_time()
        n = 0
        for r in stream_generate(model, tok, p.prefix + p.suffix, max_tokens=args.max_tokens,
                                 prefill_step_size=runner.step):
            n = r.generation_tokens
        return time.perf_counter() - t, time.process_time() - c, n

    def job(i: int) -> tuple[float, float, int]:
        doc = document(i)
        t, c = time.perf_counter(), time.process_time()
        j = docjob.create_job(doc, tasks, runner, max_tokens=args.max_tokens, thinking=None, context=None,
                              out=root / f"job{i}")
        res = docjob.run_job(j, plan, runner)
        return time.perf_counter() - t, time.process_time() - c, res["tokens"]["generated"]

    raw(-2)  # compile and warm both paths once
    job(-2)
    raws, jobs = [], []
    for i in range(args.repeat):  # interleaved, so drift in the machine's speed hits both alike
        raws.append(raw(i))
        jobs.append(job(i))
    runner.close()
    r, j = min(x[0] for x in raws), min(x[0] for x in jobs)
    rc, jc = min(x[1] for x in raws), min(x[1] for x in jobs)  # CPU time: steadier on a shared machine
    return {
        "machine": os.uname().nodename, "max_tokens": args.max_tokens, "document_tokens": plan.document_tokens,
        "generated": {"raw": raws[0][2], "job": jobs[0][2]}, "raw_s": round(r, 4), "job_s": round(j, 4),
        "ratio": round(r / j, 4), "raw_cpu_s": round(rc, 4), "job_cpu_s": round(jc, 4),
        "cpu_ratio": round(rc / jc, 4), "plan_s": round(plan_s, 3), "plan_mode": plan.mode,
        "raw_runs": [round(x[0], 4) for x in raws], "job_runs": [round(x[0], 4) for x in jobs],
    }


if __name__ == "__main__":
    main()
