"""Kill -9 inside `unlink`, debris of interrupted unlinks, and what the linker may never delete."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir
from typer.testing import CliRunner

from arthur_cluster import linker, paths
from tests.conftest import copy_model
from tests.linkhelp import cli_app, content_hashes, do_link, tree

RID = "org/Many"
MANY = 300  # small generated files besides the model's own, for the kill loop


def _model_with_extras(tmp_path: Path, tiny_models, count: int) -> Path:
    """A real MLX model folder with extra small files in nested folders (random contents)."""
    folder = copy_model(tiny_models["llama-4bit"], tmp_path / "lib" / "org" / "Many")
    rng = random.Random(20261129 + count)
    for i in range(count):
        sub = folder / "extra" / f"d{i % 9}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:03d}.txt").write_bytes(rng.randbytes(rng.randrange(1, 300)))
    return folder


@pytest.fixture
def many(tmp_path, tiny_models) -> Path:
    return _model_with_extras(tmp_path, tiny_models, MANY)


@pytest.fixture
def some(tmp_path, tiny_models) -> Path:
    return _model_with_extras(tmp_path, tiny_models, 24)


def repo_dir() -> Path:
    return paths.hf_cache() / paths.hf_repo_folder(RID)


def staging() -> Path:
    return paths.hf_cache() / ".locks" / linker.STAGING


def _unlink_killed_at(n: int | None) -> int:
    """Run `unlink` in a forked process that SIGKILLs itself right before its n-th filesystem change
    (rename, unlink or rmdir); n=None runs to the end. Returns how many changes it made."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a real process, killed for real
        os.close(read)
        count = 0

        def counted(fn):
            def wrapper(*a, **k):
                nonlocal count
                if count == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                count += 1
                os.write(write, b".")
                return fn(*a, **k)
            return wrapper

        try:
            for name in ("rename", "unlink", "rmdir"):
                setattr(os, name, counted(getattr(os, name)))
            linker.unlink(RID)
        finally:
            os._exit(0)
    os.close(write)
    done = b""
    while chunk := os.read(read, 65536):
        done += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert killed == (n is not None and len(done) == n), (n, len(done), status)
    return len(done)


def _hub_sees_whole_or_nothing(full_size: int) -> None:
    info = scan_cache_dir(paths.hf_cache())
    assert not info.warnings, info.warnings
    repos = {r.repo_id: r for r in info.repos}
    if repo_dir().exists():
        assert repos[RID].size_on_disk == full_size and (repo_dir() / paths.LINK_MARKER).is_file()
    else:
        assert RID not in repos


def test_kill_9_at_twenty_points_of_unlink_always_recoverable(many):
    before = content_hashes(many)
    do_link(many, RID, exo=False)
    (full,) = [r.size_on_disk for r in scan_cache_dir(paths.hf_cache()).repos]
    total = _unlink_killed_at(None)  # one whole run: how many changes an unlink makes
    assert total > 2 * MANY and not repo_dir().exists()
    rng = random.Random(10)
    points = sorted({0, 1, 2, total - 2, total - 1} | set(rng.sample(range(3, total - 2), 15)))
    runner, app = CliRunner(), cli_app()
    for i, n in enumerate(points):
        do_link(many, RID, exo=False)
        _unlink_killed_at(n)
        assert content_hashes(many) == before, n
        _hub_sees_whole_or_nothing(full)
        rep = linker.doctor()
        if repo_dir().exists() and i % 3 == 0:
            assert rep.ok, (n, rep.findings)  # still whole: the hub's own delete removes it, links only
            info = scan_cache_dir(paths.hf_cache())
            info.delete_revisions(*[rev.commit_hash for r in info.repos for rev in r.revisions]).execute()
            r = runner.invoke(app, ["doctor"])
        elif repo_dir().exists():
            assert rep.ok, (n, rep.findings)  # still whole, still ours: plain unlink finishes it
            r = runner.invoke(app, ["unlink", RID, "--json"])
        else:
            assert not rep.ok and any(f.kind == "leftover" for f in rep.findings), n
            r = runner.invoke(app, ["unlink", "--stale", "--json"] if i % 2 else ["link", str(many), "--no-exo"])
        assert r.exit_code == 0, (n, r.output)
        if os.path.lexists(repo_dir()):  # recovered by relinking
            assert linker.unlink(RID).removed == [str(repo_dir())]
        assert not os.path.lexists(repo_dir()) and not any(staging().iterdir()), n
        assert linker.doctor().ok and content_hashes(many) == before
        _hub_sees_whole_or_nothing(full)


# --- what an interrupted unlink of an earlier version left (the record deleted first) --------------


def _old_debris(kind: str, res: linker.LinkResult) -> None:
    repo = res.hf_repo
    os.unlink(repo / paths.LINK_MARKER)
    if kind == "blobs-only":
        shutil.rmtree(repo / "snapshots")
        shutil.rmtree(repo / "refs")
    elif kind == "half-blobs":
        shutil.rmtree(repo / "snapshots")
        for blob in sorted((repo / "blobs").iterdir())[::2]:
            os.unlink(blob)
    elif kind == "half-snapshot":
        for link in sorted((res.snapshot / "extra").rglob("*.txt"))[::3]:
            os.unlink(link)
    elif kind == "empty-folders":
        shutil.rmtree(repo / "snapshots")
        shutil.rmtree(repo / "refs")
        for blob in (repo / "blobs").iterdir():
            os.unlink(blob)


@pytest.mark.parametrize("kind, fix", [("no-record", "unlink --stale"), ("blobs-only", "unlink id"),
                                       ("half-blobs", "link"), ("half-snapshot", "unlink --stale"),
                                       ("empty-folders", "link"), ("no-record", "link")])
def test_markerless_debris_found_and_finished(some, kind, fix):
    many = some
    before = content_hashes(many)
    res = do_link(many, RID, exo=False, true_hashes=(kind == "half-blobs"))
    _old_debris(kind, res)
    rep = linker.doctor()
    assert [(f.kind, f.path) for f in rep.findings] == [("leftover", str(repo_dir()))] and not rep.ok
    assert RID in linker.linked_ids()
    args = {"unlink --stale": ["unlink", "--stale"], "unlink id": ["unlink", RID],
            "link": ["link", str(many), "--no-exo"]}[fix]
    r = CliRunner().invoke(cli_app(), args)
    assert r.exit_code == 0, r.output
    assert os.path.lexists(repo_dir()) == (fix == "link")
    assert linker.doctor().ok and content_hashes(many) == before
    assert not scan_cache_dir(paths.hf_cache()).warnings


def test_hand_made_entries_are_never_taken_for_debris(some):
    many = some
    """Markerless entries with a real file, or blob names that are not the files' etags, stay foreign."""
    res = do_link(many, RID, exo=False)
    os.unlink(res.hf_repo / paths.LINK_MARKER)
    (res.hf_repo / "blobs" / ("c" * 64)).write_bytes(b"a real downloaded blob")
    picture = tree(res.hf_repo)
    assert not linker.hf_debris(res.hf_repo) and RID not in linker.linked_ids()
    linker.unlink(all=True)
    linker.unlink(stale=True)
    assert tree(res.hf_repo) == picture
    os.unlink(res.hf_repo / "blobs" / ("c" * 64))
    blob = next(b for b in (res.hf_repo / "blobs").iterdir())
    os.rename(blob, blob.with_name("0" * len(blob.name)))  # a name that is not that file's etag
    picture = tree(res.hf_repo)
    assert not linker.hf_debris(res.hf_repo)
    linker.unlink(stale=True)
    assert tree(res.hf_repo) == picture


def test_remove_own_never_deletes_a_file_it_did_not_make(tmp_path):
    top = tmp_path / "entry"
    (top / "snapshots" / "c").mkdir(parents=True)
    (top / "refs").mkdir()
    (top / "refs" / "main").write_text("c" * 40)
    os.symlink("/nowhere", top / "snapshots" / "c" / "a.txt")
    (top / "snapshots" / "c" / "real.bin").write_bytes(b"user bytes")
    (top / "refs" / "other").write_text("x")
    (top / paths.LINK_MARKER).write_text("{}")
    kept = linker.remove_own(top)
    assert sorted(kept) == sorted([str(top / "snapshots" / "c" / "real.bin"), str(top / "refs" / "other")])
    assert (top / "snapshots" / "c" / "real.bin").read_bytes() == b"user bytes"
    assert (top / paths.LINK_MARKER).is_file()  # the record stays with what is left
    assert not os.path.lexists(top / "snapshots" / "c" / "a.txt") and not (top / "refs" / "main").exists()


def test_unlink_keeps_a_file_put_into_the_entry(some):
    many = some
    res = do_link(many, RID, exo=False)
    (res.snapshot / "mine.txt").write_text("not a link")
    out = linker.unlink(RID)
    assert out.kept == [str(res.hf_repo)] and (res.snapshot / "mine.txt").read_text() == "not a link"
    assert (res.hf_repo / paths.LINK_MARKER).is_file()


# --- targets: never inside a source, checked before anything is made ---------------------------


@pytest.mark.parametrize("target", ["hf_cache", "exo_dir", "cards_dir", "state"])
def test_every_target_inside_a_source_is_refused(some, monkeypatch, target):
    inside = some / "sub" / "target"
    kw = {}
    if target == "state":  # the exo links dir, by default inside the state folder, given elsewhere
        monkeypatch.setenv(paths.ENV_STATE_DIR, str(inside))
        kw["exo_dir"] = Path(os.environ["HOME"]) / "exo-links"
    else:
        kw[target] = inside
    home = Path(os.environ["HOME"])
    before = tree(home), tree(some), content_hashes(some)
    with pytest.raises(linker.LinkError, match="inside the model folder"):
        do_link(some, RID, exo_index=True, **kw)
    assert (tree(home), tree(some), content_hashes(some)) == before


def test_cards_dir_inside_source_via_cli_writes_nothing(some):
    before = tree(some)
    r = CliRunner().invoke(cli_app(), ["link", str(some), "--exo-index", "--cards-dir", str(some / "cards")])
    assert r.exit_code == 1 and "inside the model folder" in r.output
    assert tree(some) == before


@pytest.mark.parametrize("blocked", ["exo_dir", "hf_cache", "state"])
def test_unusable_target_refused_before_anything_is_made(some, tmp_path, monkeypatch, blocked):
    """A target under a regular file (as unusable as a read-only folder, even for root)."""
    wall = tmp_path / "a-file"
    wall.write_text("in the way")
    kw = {}
    if blocked == "state":
        monkeypatch.setenv(paths.ENV_STATE_DIR, str(wall / "state"))
    else:
        kw[blocked] = wall / "dir"
    home = Path(os.environ["HOME"])
    before = tree(home)
    with pytest.raises(linker.LinkError, match="nothing was changed"):
        do_link(some, RID, exo_index=True, **kw)
    assert tree(home) == before


def test_exo_failing_after_the_cache_entry_says_so(some):
    """exo's records folder blocked by a file: the message must say the cache entry was made, and it is whole."""
    exo_dir = paths.exo_links_dir()
    exo_dir.mkdir(parents=True)
    (exo_dir / linker.EXO_RECORDS).write_text("in the way")
    with pytest.raises(linker.LinkError, match="cache entry .* was made, but the exo link failed") as e:
        do_link(some, RID, exo_index=True)
    assert "nothing was left half-made" not in str(e.value)
    record = json.loads((repo_dir() / paths.LINK_MARKER).read_text())
    assert linker.check_hf_entry(repo_dir(), record) == []


def test_read_only_exo_dir_for_a_normal_user(tmp_path, tiny_models):
    """A read-only exo links directory: refused before the cache entry is made. Root ignores permissions,
    so under root the forked child drops to `nobody` first."""
    root = os.geteuid() == 0
    base = Path(os.path.realpath("/tmp")) / f"ro-{os.getpid()}-{random.randrange(10**9)}" if root else tmp_path / "ro"
    home = base / "home"
    try:
        src = copy_model(tiny_models["llama-4bit"], base / "lib" / "org" / "RO")
        (home / "exo").mkdir(parents=True)
        if root:
            for p in [base, *base.rglob("*")]:
                os.chown(p, 65534, 65534)
        os.chmod(home / "exo", 0o555)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if root:
                    os.setgid(65534)
                    os.setuid(65534)
                os.environ["HOME"] = str(home)
                os.environ.pop(paths.ENV_STATE_DIR, None)
                try:
                    do_link(src, "org/RO", exo_dir=home / "exo", exo_index=True)
                except linker.LinkError as err:
                    code = 0 if "not writable" in str(err) and "nothing was changed" in str(err) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert not (home / ".cache" / "huggingface" / "hub" / "models--org--RO").exists()
    finally:
        if (home / "exo").exists():
            os.chmod(home / "exo", 0o755)
        if root:
            shutil.rmtree(base, ignore_errors=True)


# --- doctor on unusable folders, unlink with an unusable state folder ------------------------------


def test_doctor_reports_hf_cache_that_is_a_file(lmstudio_home, tmp_path, monkeypatch):
    bogus = tmp_path / "not-a-folder"
    bogus.write_text("x")
    monkeypatch.setenv("HF_HUB_CACHE", str(bogus))
    rep = linker.doctor()
    assert not rep.ok and [(f.kind, f.path) for f in rep.findings] == [("unusable", str(bogus))]
    r = CliRunner().invoke(cli_app(), ["doctor"])
    assert r.exit_code == 1 and "not a folder" in r.output and "HF_HUB_CACHE" in r.output


def test_unlink_with_unusable_state_folder_is_one_clear_error(some, tmp_path, monkeypatch):
    do_link(some, RID, exo=False)
    wall = tmp_path / "wall"
    wall.write_text("x")
    monkeypatch.setenv(paths.ENV_STATE_DIR, str(wall / "state"))
    picture = tree(paths.hf_cache())
    with pytest.raises(linker.LinkError, match=f"{paths.ENV_STATE_DIR}.*|state folder"):
        linker.unlink(RID)
    assert tree(paths.hf_cache()) == picture


def test_failed_build_leaves_no_staging_debris(some, monkeypatch):
    """A write failing mid-build (disk full: a fault the real calls raise) removes its half-built entry."""
    real = os.symlink
    calls = {"n": 0}

    def disk_full(a, b, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(28, "No space left on device", str(b))
        return real(a, b, *args, **kw)

    monkeypatch.setattr(linker.os, "symlink", disk_full)
    with pytest.raises(OSError, match="No space left"):
        do_link(some, RID, exo=False)
    assert not os.path.lexists(repo_dir()) and not any(staging().iterdir())
    assert linker.doctor().ok


def test_debris_whose_source_is_gone_is_reported_not_removed(some, tmp_path):
    res = do_link(some, RID, exo=False)
    _old_debris("half-snapshot", res)
    shutil.move(str(some), tmp_path / "moved")
    picture = tree(res.hf_repo)
    rep = linker.doctor()
    assert [(f.kind, f.path) for f in rep.findings] == [("broken", str(res.hf_repo))] and not rep.ok
    linker.unlink(stale=True)
    assert tree(res.hf_repo) == picture  # cannot be proven ours: reported, left for the user
