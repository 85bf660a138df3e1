"""The exo side of the linker: a real folder of per-file links (never a directory symlink into the user's
folder), an index exo can build a card from without Hugging Face, no card file, and unlink that removes only
what the linker made, with its record last."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from arthur_cluster import exocard, linker, paths, sources
from arthur_cluster.modelfiles import INDEX_NAME
from tests.conftest import copy_model
from tests.linkhelp import content_hashes, do_link, tree

NEMO = "lmstudio-community/Tiny-NemotronH-MLX-8bit"
ENTRY = "lmstudio-community--Tiny-NemotronH-MLX-8bit"


def entry_of(repo_id: str = NEMO) -> Path:
    return paths.exo_links_dir() / paths.exo_model_dirname(repo_id)


def test_entry_is_a_folder_of_file_links_and_what_exo_replaces_is_a_link(lmstudio_home):
    src = lmstudio_home / "models" / NEMO
    before = content_hashes(src)
    res = do_link(src, NEMO, hf=False)
    entry = entry_of()
    assert res.exo_link == entry and entry.is_dir() and not entry.is_symlink()
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*")) == names
    for name in names:  # the source index has total_size, so every file, the index too, is a link
        assert os.readlink(entry / name) == str(src / name)
    assert linker.exo_complete(entry) and res.card is None
    assert not paths.exo_custom_cards_dir().exists()  # exo deletes card files it did not put in its state
    assert [(f.repo_id, f.linked) for f in sources.exo([paths.exo_links_dir()])] == [(NEMO, True)]
    # What exo's downloader does on a size mismatch (remove, then write its own file in place) hits the link.
    os.remove(entry / "config.json")
    (entry / "config.json").write_text("{}")
    assert content_hashes(src) == before
    rep = linker.doctor()
    assert any(f.kind == "foreign" and "config.json" in f.path for f in rep.findings)


@pytest.mark.parametrize("index", ["none", "no-total"])
def test_an_index_with_total_size_is_generated_beside_the_links(tmp_path, tiny_models, index):
    src = copy_model(tiny_models["nemotron_h-8bit"], tmp_path / "lib" / NEMO)
    source_index = json.loads((src / INDEX_NAME).read_text())
    if index == "none":
        (src / INDEX_NAME).unlink()
    else:
        (src / INDEX_NAME).write_text(json.dumps({"weight_map": source_index["weight_map"]}))
    before = content_hashes(src)
    res = do_link(src, NEMO, hf=False)
    made = res.exo_link / INDEX_NAME
    assert made.is_file() and not made.is_symlink()
    generated = json.loads(made.read_text())
    assert generated["metadata"]["total_size"] == source_index["metadata"]["total_size"]
    assert generated["weight_map"] == source_index["weight_map"]
    assert linker.exo_complete(res.exo_link) and content_hashes(src) == before
    assert linker.doctor().ok
    out = linker.unlink(NEMO)
    assert out.removed == [str(res.exo_link)] and not os.path.lexists(res.exo_link)


def old_style_entry(src: Path) -> tuple[Path, Path]:
    """What earlier versions made: a directory symlink into the source and a custom card file."""
    entry = entry_of()
    entry.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, entry)
    card = paths.exo_custom_cards_dir() / exocard.card_filename(NEMO)
    card.parent.mkdir(parents=True)
    card.write_text(exocard.CARD_HEADER + "\nmodel_id = \"x\"\n")
    record = {"tool": "arthur-cluster", "version": 1, "kind": "exo", "repo_id": NEMO, "source": str(src),
              "mode": "symlink", "files": [], "card": str(card), "card_sha256": None}
    rec = paths.exo_links_dir() / linker.EXO_RECORDS / f"{ENTRY}.json"
    rec.parent.mkdir(parents=True)
    rec.write_text(json.dumps(record))
    return entry, card


def test_an_old_directory_symlink_entry_is_reported_and_converted(lmstudio_home):
    src = lmstudio_home / "models" / NEMO
    before = content_hashes(src)
    entry, card = old_style_entry(src)
    rep = linker.doctor()
    assert any(f.kind == "dangerous" and f.path == str(entry) and "directory-symlink" in f.message
               for f in rep.findings) and not rep.ok
    res = do_link(src, NEMO, hf=False)
    assert res.actions[0].op == "replace" and "converts" in res.actions[0].detail
    assert entry.is_dir() and not entry.is_symlink() and linker.exo_complete(entry)
    assert not card.exists() and linker.doctor().ok and content_hashes(src) == before


def test_unlink_removes_an_old_symlink_entry_and_its_card(lmstudio_home):
    src = lmstudio_home / "models" / NEMO
    before = content_hashes(src)
    entry, card = old_style_entry(src)
    out = linker.unlink(NEMO)
    assert set(out.removed) == {str(entry), str(card)} and not os.path.lexists(entry) and not card.exists()
    assert content_hashes(src) == before and linker.linked_ids() == []


@pytest.mark.parametrize("put", ["folder", "file", "file-inside", "other-link"])
def test_unlink_never_deletes_what_the_user_put_in_place(lmstudio_home, tmp_path, put):
    src = lmstudio_home / "models" / NEMO
    res = do_link(src, NEMO, hf=False)
    entry = res.exo_link
    if put == "folder":  # the user's own copy, with its real index, where the link folder was
        os.rename(entry, tmp_path / "gone")
        copy_model(src, entry)
    elif put == "file":
        os.rename(entry, tmp_path / "gone")
        entry.write_text("mine")
    elif put == "file-inside":
        os.remove(entry / INDEX_NAME)
        (entry / INDEX_NAME).write_text("{\"mine\": true}")
    else:
        os.rename(entry, tmp_path / "gone")
        os.symlink(tmp_path, entry)
    before = tree(entry) if not entry.is_symlink() else os.readlink(entry)
    out = linker.unlink(NEMO)
    assert out.removed == [] and out.kept == [str(entry)] and "left in place" in out.warnings[0] \
        or "nothing removed" in out.warnings[0]
    assert (tree(entry) if not entry.is_symlink() else os.readlink(entry)) == before
    assert linker.linked_ids() == [NEMO]  # the record stays: the tools still know the entry


def test_unlink_killed_at_every_step_can_be_finished(lmstudio_home, monkeypatch):
    """A crash after any number of deletions (kill -9 between two of them) leaves the record, so a second
    unlink finishes and nothing of the source is touched."""
    src = lmstudio_home / "models" / NEMO
    before = content_hashes(src)
    real_unlink, real_rmdir = os.unlink, os.rmdir
    step = 0
    while True:
        (src / "notes.txt").exists()  # noqa: B018 (the source is never written)
        do_link(src, NEMO, hf=False)
        calls = 0

        def crash(fn):
            def wrapped(path, *a, **k):
                nonlocal calls
                calls += 1
                if calls > step:
                    raise KeyboardInterrupt("killed")
                return fn(path, *a, **k)
            return wrapped

        monkeypatch.setattr(os, "unlink", crash(real_unlink))
        monkeypatch.setattr(os, "rmdir", crash(real_rmdir))
        try:
            linker.unlink(NEMO)
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(os, "unlink", real_unlink)
        monkeypatch.setattr(os, "rmdir", real_rmdir)
        if finished:
            break
        assert linker.linked_ids() == [NEMO], f"killed after {step} deletions: the record went first"
        assert all(f.kind != "foreign" for f in linker.doctor().findings)
        out = linker.unlink(NEMO)
        assert not out.kept and linker.linked_ids() == [] and not os.path.lexists(entry_of())
        step += 1
    assert step > 5 and content_hashes(src) == before
