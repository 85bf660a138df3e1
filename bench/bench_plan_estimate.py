"""How good is the document plan's time estimate: estimate / actual on a miniature model, on this machine.

    .venv/bin/python bench/bench_plan_estimate.py [--max-tokens 48]

Three jobs on a tiny Nemotron-shaped 8-bit model (mlx-lm in this process): a single pass with two questions and
map-reduce with two questions over several chunks, each planned with the loaded model (warm-up: prefill and
decode rates measured on the document's start) and then run; and the map-reduce job planned again without the
weights, from the rates the earlier run recorded (what `doc --plan` does). Target: every ratio within 1/1.5 .. 1.5.
Also `doc --plan` on the 33.6 GB real-shape Nemotron folder in a child process: wall time and peak RSS (target
5 s, 1 GB). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each job; the median ratio is reported")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    os.environ["ARTHUR_CLUSTER_HOME"] = str(root / "state")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        out = {"estimates": estimates(root, args.max_tokens, args.repeat), "realshape_plan": realshape_plan(root),
               "load_average": os.getloadavg(), "cpus": os.cpu_count()}
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _job(root: Path, runner, doc, tasks, name: str, context: int | None, max_tokens: int, repeat: int) -> dict:
    runs = [_one(root, runner, doc, tasks, f"{name}-{i}", context, max_tokens) for i in range(repeat)]
    last = runs[-1]["actual_s"]  # the run whose rates were recorded last
    runs.sort(key=lambda r: r["ratio"])
    mid = runs[len(runs) // 2]
    return {**mid, "job": name, "ratios": [r["ratio"] for r in runs], "last_actual_s": last}


def _one(root: Path, runner, doc, tasks, name: str, context: int | None, max_tokens: int) -> dict:
    from arthur_cluster import docjob

    plan = docjob.plan_job(doc, tasks, runner, max_tokens=max_tokens, context=context)
    job = docjob.create_job(doc, tasks, runner, max_tokens=max_tokens, thinking=None, context=context,
                            out=root / name)
    t0 = time.perf_counter()
    result = docjob.run_job(job, plan, runner)
    actual = time.perf_counter() - t0
    docjob.record_rates(runner, result)
    return {"job": name, "mode": plan.mode, "units": docjob.unit_count(plan), "estimate_s": round(plan.seconds, 2),
            "actual_s": round(actual, 2), "ratio": round(plan.seconds / actual, 3),
            "generated": result["tokens"]["generated"], "generate_at_most": plan.generate_tokens,
            "prefill_tps": plan.warmup_tps, "decode_tps": plan.decode_tps, "plan": plan}


def estimates(root: Path, max_tokens: int, repeat: int) -> list[dict]:
    from arthur_cluster import docjob, documents, miniature
    from arthur_cluster.demo import REAL_CONFIGS

    real = json.loads(REAL_CONFIGS["nemotron_h"].read_text())
    folder = miniature.make(root / "lms" / "bench" / "tiny-nemotron-8bit", "nemotron_h", like=real,
                            quant=miniature.quantization_like(real))
    runner = docjob.load_local(folder, "bench/tiny-nemotron-8bit", use_cache=False)
    para = "The cluster runs the model across several machines; each node holds part of the weights. "
    (root / "doc.md").write_text("\n\n".join(f"## Part {i}\n\n{para * 2}" for i in range(30)))
    doc = documents.load([str(root / "doc.md")])
    tasks = docjob.make_tasks(["What does the document say about the nodes?", "How many parts are there?"])
    rows = [_job(root, runner, doc, tasks, "single", None, max_tokens, repeat),
            _job(root, runner, doc, tasks, "map-reduce", 512, max_tokens, repeat)]
    # The same map-reduce job planned without the weights: the rates come from the run above.
    planner = docjob.plan_runner(str(folder), use_cache=False)
    plan = docjob.plan_job(doc, tasks, planner, max_tokens=max_tokens, context=512, warmup=False)
    mr = rows[1]
    rows.append({"job": "map-reduce, planned without weights", "mode": plan.mode, "rates_from": plan.rates_from,
                 "estimate_s": round(plan.seconds, 2), "actual_s": mr["last_actual_s"],
                 "ratio": round(plan.seconds / mr["last_actual_s"], 3),
                 "note": "rates recorded by the last map-reduce run, compared with that run"})
    for r in rows:
        r.pop("plan", None)
    return rows


def realshape_plan(root: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests import realshape

    folder = realshape.build(root / "rs" / "nemotron", ROOT / "arthur_cluster" / "data" /
                             "nemotron-3-nano-30b-a3b-mlx-8bit.config.json")
    (root / "long.md").write_text("\n\n".join(f"Paragraph {i}: the cluster splits the layers." for i in range(4000)))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "arthur_cluster.cli", "doc", str(root / "long.md"), "--ask", "Q?",
                           "--model", str(folder), "--plan", "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    plan = json.loads(proc.stdout)
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"weights_gb": round(weights / 1e9, 1), "wall_s": round(wall, 2), "wall_vs_5s_target": round(wall / 5, 3),
            "peak_rss_mb": round(rss / 2**20), "rss_vs_1gb_target": round(rss / 2**30, 3),
            "document_tokens": plan["document_tokens"], "fits": plan["memory"]["fits"]}


if __name__ == "__main__":
    main()
