"""`arthur-cluster demo` as a user runs it: a separate process, a fresh home, every step on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from huggingface_hub import scan_cache_dir, snapshot_download

from arthur_cluster import catalog


def demo(home: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("arthur-cluster")
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run([str(exe), "demo", "--home", str(home), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_demo_json_runs_every_step_on_real_files(tmp_path):
    home = tmp_path / "demo"
    r = demo(home, "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    cat = catalog.load().for_demo()

    # 1-2: the library is real MLX folders, inspected clean.
    assert sorted(Path(p).name for p in rec["library"]) == sorted(rid.split("/")[1] for rid in cat.candidates())
    assert {m["repo_id"] for m in rec["models"]} == set(cat.candidates())
    assert all(m["format"] == "mlx" and not m["problems"] for m in rec["models"])

    # 3: the links are what huggingface_hub itself reads, and point into the LM Studio folder.
    hf_cache = home / "hf-cache"
    repos = {r.repo_id: r for r in scan_cache_dir(hf_cache).repos}
    assert set(repos) == set(cat.candidates())
    snap = Path(snapshot_download(cat.target, cache_dir=hf_cache, local_files_only=True))
    lms = (home / "lmstudio" / "models" / cat.target).resolve()
    assert (snap / "config.json").resolve() == lms / "config.json"
    assert all(link["exo_link"] for link in rec["links"])

    # 4: the probe proved its routes on real ranks and found a route that runs here.
    probe = rec["probe"]
    assert probe["verdict"] == "ok" and probe["proved"]
    assert any(rt["proven"] and rt["sharding"] == "tensor" for rt in probe["routes"])

    # 5: bring-up answered on the target (no fallback needed for the demo target).
    dep = rec["deployment"]
    assert dep["model"] == cat.target and dep["engine"] == "mlx" and dep["fallback_reason"] is None
    assert dep["smoke"]["generation_tokens"] > 0

    # 6: the document job ran on that deployment and wrote its answers.
    doc = rec["document"]
    assert doc["model"] == cat.target and doc["mode"] == "single"
    assert doc["tokens"]["generated"] > 0 and doc["answers"][0]["answer"]
    assert (Path(doc["dir"]) / "answers.md").is_file()


def test_demo_text_output_and_temporary_home_removed(tmp_path, monkeypatch):
    exe = Path(sys.executable).with_name("arthur-cluster")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    r = subprocess.run([str(exe), "demo", "--no-proof", "--ask", "Who joined first?"], capture_output=True,
                       text=True, env={**os.environ, "COLUMNS": "160"}, timeout=600)
    assert r.returncode == 0, r.stderr
    for step in ("1. Demo library", "2. Discover", "3. Link", "4. Probe", "5. Bring up", "6. Document job"):
        assert step in r.stdout
    assert "up: arthur-demo/" in r.stdout and "Who joined first?" in r.stdout
    assert not list(tmp_path.glob("arthur-demo-*"))  # the temporary home is gone


def test_demo_bad_catalogue_is_one_clear_line(tmp_path, monkeypatch):
    bad = tmp_path / "models.toml"
    bad.write_text('target = "x/y"\nfallbacks = []\n')  # no [demo] section
    monkeypatch.setenv("ARTHUR_CLUSTER_MODELS", str(bad))
    r = demo(tmp_path / "home")
    assert r.returncode == 1
    assert "no [demo] section" in r.stderr and str(bad) in r.stderr and "Traceback" not in r.stderr
