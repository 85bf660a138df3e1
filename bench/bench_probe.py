"""Probe speed on the real-shape Nemotron-3-Nano 8-bit folder (sparse, ~33.5 GB apparent).

Targets of the probe issue: static probe as a CLI process < 1 s wall; full probe (static + miniature smoke +
2-rank equivalence, pipeline and tensor, over real ring ranks) < 30 s on a 2-core machine.

    .venv/bin/python bench/bench_probe.py [--repeat 5] [--full-repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPO_ID = "lmstudio-community/NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit"
CONFIG = ROOT / "arthur_cluster" / "data" / "nemotron-3-nano-30b-a3b-mlx-8bit.config.json"
CLI = str(Path(sys.executable).with_name("arthur-cluster"))


def wall(args: list[str], env: dict, ok=(0, 3)) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run([CLI, *args], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if out.returncode not in ok:
        raise SystemExit(f"{' '.join(args)} failed ({out.returncode}): {out.stderr[-500:]}")
    return dt, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--full-repeat", type=int, default=1)
    args = ap.parse_args()
    from tests import realshape

    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        tmp = Path(tmp)
        folder = realshape.build(tmp / "lms" / REPO_ID, CONFIG)
        env = {**os.environ, "HOME": str(tmp / "home"), "ARTHUR_CLUSTER_HOME": str(tmp / "state"),
               "HF_HUB_OFFLINE": "1"}
        static = [wall([
            "probe", str(folder), "--static-only", "--json", "--no-cache"], env)[0] for _ in range(args.repeat)]
        wall(["probe", str(folder), "--static-only", "--json"], env)  # fill the cache
        cached = [wall(["probe", str(folder), "--static-only", "--json"], env)[0] for _ in range(args.repeat)]
        full, timings = [], {}
        for _ in range(args.full_repeat):
            dt, out = wall(["probe", str(folder), "--json", "--no-cache"], env)
            full.append(dt)
            report = json.loads(out)
            timings = report["timings"]
            proven = [r["engine"] + "/" + r["sharding"] + "/" + r["backend"] + "/" + str(r["nodes"])
                      for r in report["routes"] if r["proven"]]
    rows = [("static probe, CLI process, no cache (median)", statistics.median(static), 1.0),
            ("static probe, CLI process, cached (median)", statistics.median(cached), 1.0),
            ("full probe, CLI process (median)", statistics.median(full), 30.0)]
    print(f"machine: {platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    for name, value, target in rows:
        print(f"| {name} | {value:.2f} s | < {target:g} s | {value / target:.2f}x |")
    print("full probe phases (s):", json.dumps(timings))
    print("proven routes:", ", ".join(proven))


if __name__ == "__main__":
    main()
