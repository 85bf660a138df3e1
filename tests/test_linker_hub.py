"""huggingface_hub's own readers and deleters, and mlx_lm.load, on the linker's output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download, try_to_load_from_cache

from arthur_cluster import linker, paths
from tests.linkhelp import content_hashes, do_link, tree

NEMO = "lmstudio-community/Tiny-NemotronH-MLX-8bit"
LLAMA = "mlx-community/Tiny-Llama-MLX-4bit"


@pytest.fixture
def linked(lmstudio_home):
    models = lmstudio_home / "models"
    results = {rid: do_link(models / rid, rid, true_hashes=(rid == LLAMA)) for rid in (NEMO, LLAMA)}
    hashes = {rid: content_hashes(models / rid) for rid in results}
    return models, results, hashes


def _sources_intact(models: Path, hashes: dict) -> None:
    for rid, before in hashes.items():
        assert content_hashes(models / rid) == before, rid


def _blobs_are_links_to_sources(models: Path, results: dict) -> None:
    """Zero-copy: every blob is a symlink whose target is the source file itself (same inode), and every
    snapshot file reaches the source through its blob. A copy would pass the hub's own checks."""
    for rid, res in results.items():
        blobs = list((res.hf_repo / "blobs").iterdir())
        assert blobs, rid
        sources = {os.path.realpath(p) for p in (models / rid).rglob("*") if p.is_file()}
        for blob in blobs:
            assert blob.is_symlink(), blob
            real = os.path.realpath(blob)
            assert real in sources, (blob, real)
            assert os.stat(blob).st_ino == os.stat(real).st_ino
        for f in res.snapshot.rglob("*"):
            if not f.is_dir():
                assert os.path.realpath(f) in sources and os.stat(f).st_ino == os.lstat(os.path.realpath(f)).st_ino


def test_the_cache_links_to_the_sources(linked):
    models, results, _ = linked
    _blobs_are_links_to_sources(models, results)
    blob = next((results[NEMO].hf_repo / "blobs").iterdir())
    assert os.lstat(blob).st_size < 1024  # the link itself, not the weights


def test_scan_cache_dir_full_size_no_warnings(linked):
    models, results, _ = linked
    info = scan_cache_dir(paths.hf_cache())
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    for rid in results:
        apparent = sum(p.stat().st_size for p in (models / rid).rglob("*") if p.is_file())
        assert repos[rid].size_on_disk == apparent
        (rev,) = repos[rid].revisions
        assert rev.refs == frozenset({"main"}) and rev.commit_hash == results[rid].commit


def test_offline_lookups(linked):
    models, results, _ = linked
    cache = paths.hf_cache()  # the hub reads HF_HOME/HOME once, at import: name this test's cache
    for rid, res in results.items():
        assert Path(snapshot_download(rid, local_files_only=True, cache_dir=cache)) == res.snapshot
        path = hf_hub_download(rid, "config.json", local_files_only=True, cache_dir=cache)
        assert Path(path).read_bytes() == (models / rid / "config.json").read_bytes()
        assert try_to_load_from_cache(rid, "model.safetensors.index.json", cache_dir=cache) == str(
            res.snapshot / "model.safetensors.index.json")
        assert try_to_load_from_cache(rid, "no-such-file.bin", cache_dir=cache) is None


@pytest.mark.parametrize("rid", [NEMO, LLAMA])
def test_mlx_lm_loads_linked_model_by_repo_id(linked, rid, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative org/name folder in the CWD would win over the repo id
    code = (
        "import mlx_lm, sys\n"
        f"model, tok = mlx_lm.load({rid!r})\n"
        "text = mlx_lm.generate(model, tok, prompt='hello', max_tokens=4, verbose=False)\n"
        "ids = tok.encode(text)\n"
        "print('GENERATED', len(ids))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "GENERATED" in r.stdout and int(r.stdout.split("GENERATED")[1]) > 0


# --- the deletion matrix -------------------------------------------------------------------------


def _hf(*args: str) -> None:
    exe = Path(sys.executable).with_name("hf")
    r = subprocess.run([str(exe), "cache", *args, "--cache-dir", str(paths.hf_cache())], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_delete_whole_repo_keeps_sources(linked):
    models, results, hashes = linked
    _blobs_are_links_to_sources(models, results)  # else deleting a copy keeps the sources trivially
    info = scan_cache_dir(paths.hf_cache())
    info.delete_revisions(results[NEMO].commit).execute()
    assert not results[NEMO].hf_repo.exists()
    _hf("rm", f"model/{LLAMA}", "-y")
    assert not results[LLAMA].hf_repo.exists()
    _sources_intact(models, hashes)


def test_delete_single_files_keeps_sources(linked):
    models, results, hashes = linked
    info = scan_cache_dir(paths.hf_cache())
    files = [f for r in info.repos if r.repo_id == NEMO for rev in r.revisions for f in rev.files
             if f.file_name.endswith(".safetensors")]
    assert files
    info.delete_files(*files).execute()
    assert not any(results[NEMO].snapshot.glob("*.safetensors"))
    _hf("rm", f"hf://models/{LLAMA}/model.safetensors", "-y")
    assert not (results[LLAMA].snapshot / "model.safetensors").exists()
    _sources_intact(models, hashes)
    # The damaged entry is found and repaired by a relink.
    assert any(f.kind == "damaged" for f in linker.doctor().findings)
    do_link(models / NEMO, NEMO)
    do_link(models / LLAMA, LLAMA)
    assert linker.doctor().ok


def test_prune_detached_revision_keeps_sources(linked):
    models, results, hashes = linked
    _blobs_are_links_to_sources(models, results)
    for res in results.values():
        os.unlink(res.hf_repo / "refs" / "main")  # detach the linked revision
    _hf("prune", "-y")
    for res in results.values():
        assert not res.snapshot.exists()
    _sources_intact(models, hashes)


def test_unlink_and_stale_keep_sources(linked):
    models, results, hashes = linked
    linker.unlink(NEMO)
    assert not results[NEMO].hf_repo.exists()
    _sources_intact(models, hashes)
    out = linker.unlink(all=True)
    assert str(results[LLAMA].hf_repo) in out.removed
    _sources_intact(models, hashes)
    assert not any(p.name.startswith("models--") for p in paths.hf_cache().iterdir())


def test_unlink_leaves_a_real_download_alone(linked, lmstudio_home):
    models, results, hashes = linked
    real = paths.hf_cache() / "models--someone--real-model"
    snap = real / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    (real / "blobs").mkdir()
    (real / "blobs" / ("d" * 64)).write_bytes(b"weights")
    os.symlink("../../blobs/" + "d" * 64, snap / "model.safetensors")
    (real / "refs").mkdir()
    (real / "refs" / "main").write_text("c" * 40)
    before = tree(real)
    linker.unlink(all=True)
    assert tree(real) == before
    _sources_intact(models, hashes)
