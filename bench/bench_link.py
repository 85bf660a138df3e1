"""Linker speed on the real-shape Nemotron-3-Nano 8-bit folder (sparse, ~33.5 GB apparent).

Prints figures and ratios against the targets of the linker issue:
  link as a CLI process < 1.5 s (in-process < 0.3 s), < 1 MB written to the cache,
  `models` and inspection as a CLI < 1 s, `--hash` throughput >= 0.9x `sha256sum` on the same file.

    .venv/bin/python bench/bench_link.py [--hash-mb 1024] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
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


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run(args: list[str], env: dict) -> None:
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def written(folder: Path) -> tuple[int, int]:
    """(apparent bytes of every entry, not following links; bytes of disk blocks allocated)."""
    apparent = blocks = 0
    for dirpath, dirs, files in os.walk(folder):
        for n in dirs + files:
            st = os.lstat(os.path.join(dirpath, n))
            apparent += st.st_size
            blocks += st.st_blocks * 512
    return apparent, blocks


def line(name: str, value: float, target: float | None = None, unit: str = "s", better: str = "lower") -> None:
    if target is None:
        print(f"  {name:44} {value:10.3f} {unit}")
        return
    ratio = value / target
    ok = ratio <= 1 if better == "lower" else ratio >= 1
    print(f"  {name:44} {value:10.3f} {unit}   target {target:g} {unit}  ({ratio:.2f}x of target, "
          f"{'met' if ok else 'MISSED'})")


def bench_link(work: Path, repeat: int) -> None:
    from arthur_cluster import linker, modelfiles, paths
    from tests import realshape

    home = work / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1"}
    for k in ("HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "XDG_DATA_HOME", "EXO_HOME", "ARTHUR_CLUSTER_HOME"):
        env.pop(k, None)
    os.environ.clear()
    os.environ.update(env)
    models = home / ".lmstudio" / "models"
    src = models / REPO_ID
    realshape.build(src, CONFIG)
    apparent = sum(p.stat().st_size for p in src.iterdir())
    disk = sum(p.stat().st_blocks * 512 for p in src.iterdir())
    print(f"fixture: {len(list(src.iterdir()))} files, {apparent / 1e9:.2f} GB apparent, {disk / 1e6:.1f} MB on disk")

    py = [sys.executable, "-c", "pass"]
    start = statistics.median(timed(lambda: run(py, env), repeat))
    line("python start (reference)", start)

    def cli_link():
        run([CLI, "link", REPO_ID], env)

    def cli_unlink():
        run([CLI, "unlink", "--all"], env)

    creates = []
    for _ in range(repeat):
        creates += timed(cli_link, 1)
        cli_unlink()
    line("link CLI, first link (create)", statistics.median(creates), 1.5)
    cli_link()
    line("link CLI, relink (no-op)", statistics.median(timed(cli_link, repeat)), 1.5)
    repo = paths.hf_cache() / paths.hf_repo_folder(REPO_ID)
    app, blk = written(repo)
    exo_app, exo_blk = written(paths.exo_links_dir())
    card = paths.exo_custom_cards_dir()
    card_bytes = sum(p.stat().st_size for p in card.iterdir())
    line("bytes written to the HF cache entry (apparent)", app / 1e6, 1.0, "MB")
    line("  ... disk blocks allocated", blk / 1e6, None, "MB")
    line("bytes written for exo (links dir + card)", (exo_app + card_bytes) / 1e6, None, "MB")
    line("HF cache entry, size the hub reports", _hub_size(repo.parent, REPO_ID) / 1e9, None, "GB")

    info = modelfiles.inspect(src, repo_id=REPO_ID, source="lmstudio")
    line("inspect in-process", statistics.median(timed(
        lambda: modelfiles.inspect(src, repo_id=REPO_ID, source="lmstudio"), repeat)), 1.0)
    linker.unlink(all=True)

    def create_unlink():
        t = time.perf_counter()
        linker.link(info)
        dt = time.perf_counter() - t
        linker.unlink(all=True)
        return dt

    line("link in-process (create)", statistics.median(create_unlink() for _ in range(repeat)), 0.3)
    linker.link(info)
    line("link in-process (relink, no-op)", statistics.median(timed(lambda: linker.link(info), repeat)), 0.3)
    line("models CLI (--json)", statistics.median(timed(lambda: run([CLI, "models", "--json"], env), repeat)), 1.0)
    line("models CLI, LM Studio only", statistics.median(timed(
        lambda: run([CLI, "models", "--json", "--source", "lmstudio"], env), repeat)), 1.0)
    line("doctor CLI", statistics.median(timed(lambda: run([CLI, "doctor", "--json"], env), repeat)), None)


def _hub_size(cache: Path, repo_id: str) -> int:
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    return next(r.size_on_disk for r in info.repos if r.repo_id == repo_id)


def bench_hash(work: Path, size_mb: int, repeat: int) -> None:
    from arthur_cluster import etags

    path = work / "big.bin"
    chunk = os.urandom(16 * 1024 * 1024)
    with open(path, "wb") as f:
        for _ in range(size_mb // 16):
            f.write(chunk)
    size = path.stat().st_size
    print(f"hash: {size / 1e9:.2f} GB real file (page cache warm: both read the same cached bytes)")
    subprocess.run(["sha256sum", str(path)], check=True, capture_output=True)  # warm the page cache
    sums, ours = [], []
    want = subprocess.run(["sha256sum", str(path)], check=True, capture_output=True, text=True).stdout.split()[0]
    for _ in range(repeat):  # alternate so both see the same machine state
        sums += timed(lambda: subprocess.run(["sha256sum", str(path)], check=True, capture_output=True), 1)
        t = time.perf_counter()
        got = etags.sha256_file(path, progress=lambda n, name: None)
        ours.append(time.perf_counter() - t)
        assert got == want
    a, b = size / min(sums) / 1e6, size / min(ours) / 1e6
    line("sha256sum throughput", a, None, "MB/s")
    line("--hash (etags.sha256_file) throughput", b, None, "MB/s")
    line("--hash / sha256sum", b / a, 0.9, "x", better="higher")
    t = time.perf_counter()
    etags.git_blob_sha1(path, size)
    line("git blob sha1 throughput (small-file etags)", size / (time.perf_counter() - t) / 1e6, None, "MB/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hash-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}")
    work = Path(tempfile.mkdtemp(prefix="bench-link-"))
    try:
        bench_link(work, args.repeat)
        bench_hash(work, args.hash_mb, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
