"""The linker on real folders: layout B, stable names, true etags, atomicity, locking, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arthur_cluster import etags, linker, paths
from tests.conftest import copy_model, make_read_only
from tests.linkhelp import cli_app, content_hashes, do_link, inspect, tree

ROOT = Path(__file__).resolve().parents[1]
RID = "lmstudio-community/Tiny-NemotronH-MLX-8bit"


@pytest.fixture
def src(lmstudio_home) -> Path:
    return lmstudio_home / "models" / RID


def repo_dir() -> Path:
    return paths.hf_cache() / paths.hf_repo_folder(RID)


def test_layout_b(src):
    res = do_link(src, RID)
    repo = repo_dir()
    commit = (repo / "refs" / "main").read_bytes()
    assert len(commit) == 40 and not commit.endswith(b"\n")
    assert res.commit == commit.decode() and sorted(os.listdir(repo)) == sorted(
        ["blobs", "refs", "snapshots", paths.LINK_MARKER])
    assert not (paths.hf_cache() / "blobs").exists() and not (repo / "trees").exists()
    snap = repo / "snapshots" / res.commit
    names = sorted(f.name for f in inspect(src, RID).files)
    assert sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if not p.is_dir()) == names
    for name in names:
        link = snap / name
        target = os.readlink(link)
        assert target.startswith("../../blobs/")
        blob = repo / "blobs" / target.rsplit("/", 1)[1]
        assert os.readlink(blob) == str(src / name)  # absolute, one hop to the source
        assert link.read_bytes() == (src / name).read_bytes()
    marker = json.loads((repo / paths.LINK_MARKER).read_text())
    assert marker["source"] == str(src) and marker["etag_mode"] == "pseudo"
    assert {f["name"] for f in marker["files"]} == set(names)


def test_relink_is_a_noop_and_pseudo_names_are_stable(src):
    first = do_link(src, RID)
    before = tree(paths.hf_cache()), tree(paths.exo_links_dir())
    again = do_link(src, RID)
    assert [a.op for a in again.actions] == ["keep", "keep"] and not again.changed
    assert again.commit == first.commit
    assert (tree(paths.hf_cache()), tree(paths.exo_links_dir())) == before


def test_changed_source_file_relinks_under_new_commit(src):
    first = do_link(src, RID)
    cfg = src / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    second = do_link(src, RID)
    assert second.commit != first.commit and [a.op for a in second.actions][0] == "replace"
    assert os.listdir(repo_dir() / "snapshots") == [second.commit]
    assert (second.snapshot / "config.json").read_text() == cfg.read_text()


def test_nested_files_spaces_and_non_ascii(tmp_path, tiny_models):
    folder = tmp_path / "Mes modèles é" / "org" / "Tiny Model"
    copy_model(tiny_models["llama-4bit"], folder)
    (folder / "sub dir" / "déjà").mkdir(parents=True)
    (folder / "sub dir" / "déjà" / "notes ü.txt").write_text("ü")
    res = do_link(folder, "org/Tiny-Model", exo=False)
    link = res.snapshot / "sub dir" / "déjà" / "notes ü.txt"
    assert os.readlink(link).startswith("../../../../blobs/") and link.read_text() == "ü"


def test_true_etags_match_git_and_sha256(src):
    res = do_link(src, RID, true_hashes=True)
    marker = json.loads((res.hf_repo / paths.LINK_MARKER).read_text())
    assert marker["etag_mode"] == "true"
    for f in marker["files"]:
        data = (src / f["name"]).read_bytes()
        if etags.is_lfs(f["name"], f["size"]):
            want = hashlib.sha256(data).hexdigest()
        else:
            want = subprocess.run(["git", "hash-object", str(src / f["name"])], capture_output=True, text=True,
                                  check=True).stdout.strip()
        assert f["etag"] == want, f["name"]
        assert (res.hf_repo / "blobs" / want).is_symlink()


def test_hash_progress_and_cache(src):
    seen = []
    do_link(src, RID, true_hashes=True, exo=False, progress=lambda d, t, n: seen.append((d, t, n)))
    shards = [f for f in inspect(src, RID).files if f.name.endswith(".safetensors")]
    assert seen[-1][0] == seen[-1][1] >= sum(f.size for f in shards)
    cache = json.loads(etags.cache_file().read_text())["etags"]
    assert len(cache) == len(inspect(src, RID).files)
    # A cached etag is used without reading: prove it by hashing nothing on a second, fresh cache entry.
    key = etags.EtagCache.key(src / shards[0].name, shards[0].size, shards[0].mtime_ns)
    assert cache[key] == hashlib.sha256((src / shards[0].name).read_bytes()).hexdigest()
    calls = []
    real = etags.true_etag
    try:
        etags.true_etag = lambda *a, **k: calls.append(a) or real(*a, **k)
        linker.unlink(RID)
        do_link(src, RID, true_hashes=True, exo=False)
    finally:
        etags.true_etag = real
    assert calls == []


def test_read_only_source(tmp_path, tiny_models):
    folder = copy_model(tiny_models["nemotron_h-8bit"], tmp_path / "ro" / "org" / "RO-Model")
    make_read_only(folder)
    before = tree(folder), content_hashes(folder)
    try:
        res = do_link(folder, "org/RO-Model", true_hashes=True)
        assert res.snapshot.is_dir() and linker.doctor().ok
        assert (tree(folder), content_hashes(folder)) == before
    finally:
        for p in [folder, *folder.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)


def test_dry_run_changes_nothing(src):
    home = Path(os.environ["HOME"])
    before = tree(home)
    res = do_link(src, RID, dry_run=True)
    assert [a.op for a in res.actions] == ["create", "create"] and res.dry_run
    assert tree(home) == before


# --- refusals: clear error, nothing changed ------------------------------------------------------


def _snapshot_all(*folders: Path):
    return [tree(f) for f in folders] + [content_hashes(f) for f in folders if f.exists()]


def _refused(src: Path, match: str, **kw):
    home = Path(os.environ["HOME"])
    before = _snapshot_all(home, src)
    with pytest.raises((linker.LinkError, linker.ModelFileError), match=match):
        do_link(src, kw.pop("repo_id", RID), **kw)
    assert _snapshot_all(home, src) == before


def test_refuses_real_download(src):
    real = repo_dir()
    (real / "refs").mkdir(parents=True)
    (real / "refs" / "main").write_text("a" * 40)
    (real / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (real / "snapshots" / ("a" * 40) / "config.json").write_text("{}")
    _refused(src, "not made by arthur-cluster")


def test_refuses_weight_map_traversal(tmp_path, tiny_models):
    folder = copy_model(tiny_models["nemotron_h-8bit"], tmp_path / "lib" / "org" / "Evil")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../../../etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(folder, "outside the folder", repo_id="org/Evil")


def test_symlink_loop_skipped_and_broken_links_refused(tmp_path, tiny_models):
    folder = copy_model(tiny_models["llama-4bit"], tmp_path / "lib" / "org" / "Loop")
    os.symlink("..", folder / "again")
    res = do_link(folder, "org/Loop", exo=False)
    assert any("symlink loop" in w and "again" in w for w in res.warnings)
    assert not os.path.lexists(res.snapshot / "again") and linker.doctor().ok
    linker.unlink("org/Loop")
    os.unlink(folder / "again")
    os.symlink("b.txt", folder / "a.txt")
    os.symlink("a.txt", folder / "b.txt")
    _refused(folder, "cannot stat", repo_id="org/Loop")


@pytest.mark.parametrize("bad", ["../escape", "org/../../x", "org/a--b", "org", "org/name/extra", "/abs/x", "org/-x"])
def test_refuses_ids_that_escape(src, bad):
    _refused(src, "not a usable repo id", repo_id=bad)


def test_refuses_broken_shard(tmp_path, tiny_models):
    folder = copy_model(tiny_models["nemotron_h-8bit"], tmp_path / "lib" / "org" / "Broken")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    _refused(folder, shard.name, repo_id="org/Broken")


def test_refuses_gguf(tmp_path):
    folder = tmp_path / "lib" / "org" / "Some-GGUF"
    folder.mkdir(parents=True)
    (folder / "model.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))
    _refused(folder, "GGUF", repo_id="org/Some-GGUF")


def test_refuses_cache_inside_source(src):
    _refused(src, "inside the model folder", hf_cache=src / "cache")


def test_refuses_foreign_content_in_our_entry(src):
    do_link(src, RID, exo=False)
    (repo_dir() / "blobs" / ("b" * 64)).write_bytes(b"real bytes from a download")
    _refused(src, "holds files it did not make", exo=False, true_hashes=True)


# --- atomicity, repair, locking -----------------------------------------------------------------


def _staging() -> Path:
    return paths.hf_cache() / ".locks" / linker.STAGING


def test_failure_mid_apply_leaves_nothing_and_rerun_repairs(src, monkeypatch):
    real = os.symlink
    count = {"n": 0}

    def flaky(a, b, *args, **kw):
        count["n"] += 1
        if count["n"] == 5:
            raise OSError(28, "No space left on device", str(b))
        return real(a, b, *args, **kw)

    monkeypatch.setattr(linker.os, "symlink", flaky)
    with pytest.raises(OSError):
        do_link(src, RID)
    assert not repo_dir().exists()
    from huggingface_hub import scan_cache_dir
    assert not scan_cache_dir(paths.hf_cache()).warnings
    monkeypatch.setattr(linker.os, "symlink", real)
    res = do_link(src, RID)
    assert res.actions[0].op == "create" and not any(_staging().iterdir())
    assert linker.doctor().ok


def test_killed_between_renames_is_repaired(src, monkeypatch):
    first = do_link(src, RID, exo=False)
    shard = sorted(src.glob("model*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # new pseudo etag
    real = os.rename
    calls = []

    def dying(a, b):
        calls.append((a, b))
        real(a, b)
        if len(calls) == 1:
            raise KeyboardInterrupt  # stands for a kill right after the old entry was moved aside

    monkeypatch.setattr(linker.os, "rename", dying)
    with pytest.raises(KeyboardInterrupt):
        do_link(src, RID, exo=False)
    monkeypatch.setattr(linker.os, "rename", real)
    assert not repo_dir().exists() and any(_staging().iterdir())
    assert any(f.kind == "leftover" for f in linker.doctor().findings)
    res = do_link(src, RID, exo=False)
    assert res.commit != first.commit and res.actions[0].op == "create"
    assert not any(_staging().iterdir()) and linker.doctor().ok


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def test_sigkilled_process_leaves_nothing_half_made(src):
    """A real process killed with SIGKILL while it builds the entry (its symlink calls slowed down)."""
    code = f"""
        import os, time
        real = os.symlink
        def slow(*a, **k):
            time.sleep(0.2)
            return real(*a, **k)
        os.symlink = slow
        from tests.linkhelp import do_link
        do_link({str(src)!r}, {RID!r})
    """
    proc = subprocess.Popen(_script(code), cwd=ROOT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if _staging().is_dir() and any(p.is_symlink() for p in _staging().rglob("*")):
                break
            time.sleep(0.02)
        else:
            pytest.fail("the linking process never started building")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not repo_dir().exists()
    from huggingface_hub import scan_cache_dir
    assert not scan_cache_dir(paths.hf_cache()).warnings
    res = do_link(src, RID)
    assert res.actions[0].op == "create" and linker.doctor().ok and not any(_staging().iterdir())


def test_concurrent_runs_are_serialised(src):
    proc = None
    with linker._lock():
        proc = subprocess.Popen(_script(f"""
            from tests.linkhelp import do_link
            do_link({str(src)!r}, {RID!r})
        """), cwd=ROOT, env=os.environ.copy())
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert not repo_dir().exists(), "a second run wrote while the lock was held"
            time.sleep(0.05)
    assert proc.wait(timeout=120) == 0
    assert repo_dir().is_dir() and linker.doctor().ok


# --- unlink, where_linked, CLI --------------------------------------------------------------------


def test_unlink_removes_only_ours(src):
    res = do_link(src, RID)
    assert linker.where_linked(RID, src) == [str(res.snapshot), str(res.exo_link)]
    assert linker.where_linked(RID, "/somewhere/else") == []
    before = content_hashes(src)
    out = linker.unlink(RID)
    assert set(out.removed) == {str(res.hf_repo), str(res.exo_link)} and res.card is None  # no card file any more
    assert not os.path.lexists(res.hf_repo) and not os.path.lexists(res.exo_link)
    assert content_hashes(src) == before and linker.where_linked(RID) == []


def test_cli_link_json_and_errors(src):
    runner = CliRunner()
    app = cli_app()
    r = runner.invoke(app, ["link", "Tiny-NemotronH-MLX-8bit", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["errors"] == [] and data["results"][0]["repo_id"] == RID
    assert data["results"][0]["env_line"].startswith("EXO_MODELS_READ_ONLY_DIRS=")
    r = runner.invoke(app, ["link", "no-such-model"])
    assert r.exit_code == 1 and "no LM Studio model matches" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["link", "--all", "--dry-run"])
    assert r.exit_code == 0 and "Tiny-Llama-MLX-4bit" in r.output
    r = runner.invoke(app, ["unlink", "tiny-nemotronh-mlx-8bit", "--json"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)["removed"]) == 2
    r = runner.invoke(app, ["unlink", "tiny-nemotronh-mlx-8bit"])
    assert r.exit_code == 1 and "nothing made by arthur-cluster" in r.output


def test_cli_subprocess_link_hash(src):
    exe = Path(sys.executable).with_name("arthur-cluster")
    r = subprocess.run([str(exe), "link", RID, "--hash", "--no-exo"], capture_output=True, text=True,
                       env=os.environ.copy(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "true etags" in r.stdout and "create" in r.stdout
    marker = json.loads((repo_dir() / paths.LINK_MARKER).read_text())
    assert marker["etag_mode"] == "true"
