"""`doctor` finds broken links, drift, foreign and dangerous entries; `unlink --stale` cleans ours."""

from __future__ import annotations

import json
import os
import shutil

from typer.testing import CliRunner

from arthur_cluster import linker, paths
from tests.linkhelp import cli_app, content_hashes, do_link

NEMO = "lmstudio-community/Tiny-NemotronH-MLX-8bit"
LLAMA = "mlx-community/Tiny-Llama-MLX-4bit"


def kinds(report) -> set[str]:
    return {f.kind for f in report.findings if f.severity != "note"}


def test_clean_after_link_and_cli_exit_codes(lmstudio_home):
    do_link(lmstudio_home / "models" / NEMO, NEMO)
    runner = CliRunner()
    r = runner.invoke(cli_app(), ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["ok"] is True and data["checked"]["hf_linked"] == 1 and data["checked"]["exo_linked"] == 1
    os.utime(lmstudio_home / "models" / NEMO / "config.json", ns=(1, 1))
    r = runner.invoke(cli_app(), ["doctor"])
    assert r.exit_code == 1 and "drift" in r.output


def test_source_moved_is_broken_and_unlink_stale_cleans(lmstudio_home, tmp_path):
    models = lmstudio_home / "models"
    nemo, llama = do_link(models / NEMO, NEMO), do_link(models / LLAMA, LLAMA)
    moved = tmp_path / "moved"
    shutil.move(str(models / NEMO), moved)
    before = content_hashes(moved)
    rep = linker.doctor()
    broken = {f.repo_id for f in rep.findings if f.kind == "broken"}
    assert broken == {NEMO} and not rep.ok
    r = CliRunner().invoke(cli_app(), ["unlink", "--stale", "--json"])
    assert r.exit_code == 0, r.output
    removed = set(json.loads(r.stdout)["removed"])
    assert {str(nemo.hf_repo), str(nemo.exo_link)} == removed
    assert llama.hf_repo.is_dir() and linker.doctor().ok
    assert content_hashes(moved) == before


def test_source_file_deleted_is_broken(lmstudio_home, tmp_path):
    src = tmp_path / "lib" / "org" / "Gone"
    shutil.copytree(lmstudio_home / "models" / LLAMA, src)
    do_link(src, "org/Gone")
    os.unlink(src / "model.safetensors")
    rep = linker.doctor()
    assert {(f.kind, f.path) for f in rep.findings if f.kind == "broken"} >= {
        ("broken", str(src / "model.safetensors"))}


def test_drift(lmstudio_home):
    src = lmstudio_home / "models" / NEMO
    do_link(src, NEMO)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    rep = linker.doctor()
    assert kinds(rep) == {"drift"} and all(f.path == str(shard) for f in rep.findings if f.kind == "drift")
    do_link(src, NEMO)
    assert linker.doctor().ok


def test_foreign_exo_entry(lmstudio_home):
    links = paths.exo_links_dir()
    links.mkdir(parents=True)
    os.symlink(lmstudio_home / "models" / LLAMA, links / "someone--else")
    rep = linker.doctor()
    assert kinds(rep) == {"foreign"}
    linker.unlink(all=True)
    assert (links / "someone--else").is_symlink()  # not ours: never removed


def _hand_made(layout: str, src, cache) -> None:
    repo = cache / "models--hand--made"
    commit = "e" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    if layout == "D":
        os.symlink(src, repo / "snapshots" / commit)
        return
    snap = repo / "snapshots" / commit
    snap.mkdir()
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(p for p in src.iterdir() if p.is_file())):
        if layout == "A":
            os.symlink(f, snap / f.name)
        else:
            os.symlink(f, repo / "blobs" / f"{i:040d}")
            os.symlink(f"../../blobs/{i:040d}", snap / f.name)


def test_hand_made_layouts(lmstudio_home):
    src = lmstudio_home / "models" / LLAMA
    cache = paths.hf_cache()
    for layout, dangerous in (("A", True), ("D", True), ("B", False)):
        _hand_made(layout, src, cache)
        rep = linker.doctor()
        assert ("dangerous" in kinds(rep)) is dangerous, layout
        assert rep.ok is not dangerous
        shutil.rmtree(cache / "models--hand--made")


def test_link_in_writable_exo_dir_is_dangerous(lmstudio_home):
    writable = paths.exo_default_models_dir()
    writable.mkdir(parents=True)
    os.symlink(lmstudio_home / "models" / LLAMA, writable / "mlx-community--Tiny-Llama-MLX-4bit")
    rep = linker.doctor()
    assert [f.kind for f in rep.findings if f.severity == "error"] == ["dangerous"]


def test_damaged_entry_found_and_repaired(lmstudio_home):
    src = lmstudio_home / "models" / NEMO
    res = do_link(src, NEMO)
    (res.hf_repo / "refs" / "main").write_text(res.commit + "\n")  # the classic hand-written mistake
    assert "damaged" in kinds(linker.doctor())
    again = do_link(src, NEMO)
    assert again.actions[0].op == "replace" and linker.doctor().ok
    assert (res.hf_repo / "refs" / "main").read_bytes() == res.commit.encode()
