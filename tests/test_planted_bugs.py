"""Bugs that once went through the suite unnoticed when planted: each test here fails with its bug back in
(bench/mutations.py plants them)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from typer.testing import CliRunner

from arthur_cluster import docjob, etags, linker, memory, modelname
from tests.conftest import NEMOTRON_CONFIG, copy_model
from tests.linkhelp import do_link


# --- doc --thinking off reaches the prompt -----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_models["llama-4bit"])


def _prompt_text(tokenizer, thinking):
    p = docjob.Prompter(tokenizer, thinking).build("The document.", "Question: why?")
    return tokenizer.decode(p.prefix + p.suffix)


def test_thinking_off_reaches_the_rendered_prompt(tokenizer):
    off, default, on = (_prompt_text(tokenizer, t) for t in (False, None, True))
    assert "<think></think>" in off  # the template's enable_thinking=False
    assert "<think></think>" not in default and "<think></think>" not in on


def test_doc_thinking_off_is_in_the_plan(tmp_path, tiny_models):
    """What the user asked (--thinking off) is what the job records and renders with."""
    from arthur_cluster.cli import app

    f = tmp_path / "d.md"
    f.write_text("A short document about nodes.")
    for flag, want in (("off", False), ("on", True)):
        r = CliRunner().invoke(app, ["doc", str(f), "--ask", "Why?", "--plan", "--json", "--thinking", flag,
                                     "--model", str(tiny_models["llama-4bit"])])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["thinking"] is want


# --- the linker's target-inside-source check follows symlinks ------------------------------------------


def test_a_target_reached_through_a_symlink_into_the_source_is_refused(tmp_path, tiny_models):
    src = copy_model(tiny_models["llama-4bit"], tmp_path / "lib" / "org" / "M")
    (tmp_path / "elsewhere").mkdir()
    hop = tmp_path / "elsewhere" / "hop"
    os.symlink(src, hop)  # the cache path looks outside the model folder, but lies inside it
    before = sorted(p.name for p in src.rglob("*"))
    with pytest.raises(linker.LinkError, match="inside the model folder"):
        do_link(src, "org/M", hf_cache=hop / "cache", exo=False)
    assert sorted(p.name for p in src.rglob("*")) == before  # nothing written into the source


# --- the etag cache keys on mtime --------------------------------------------------------------------


def test_a_same_size_rewrite_gets_a_new_true_etag(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 4096)
    cache = etags.EtagCache(tmp_path / "etags.json")
    st = f.stat()
    first, _ = etags.etag_for(f, f.name, st.st_size, st.st_mtime_ns, true_hash=True, cache=cache)
    f.write_bytes(b"b" * 4096)  # same size, new content
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # and a new mtime, as any rewrite gives
    st2 = f.stat()
    second, _ = etags.etag_for(f, f.name, st2.st_size, st2.st_mtime_ns, true_hash=True, cache=cache)
    assert first != second and second == hashlib.sha256(b"b" * 4096).hexdigest()


# --- an ambiguous short name is an error listing the matches ------------------------------------------


def test_an_ambiguous_short_name_is_refused_naming_both(lmstudio_home, tiny_models):
    models = lmstudio_home / "models"
    copy_model(tiny_models["llama-4bit"], models / "org-a" / "Same-Name")
    copy_model(tiny_models["llama-4bit"], models / "org-b" / "Same-Name")
    with pytest.raises(modelname.ModelNameError, match="org-a/Same-Name.*org-b/Same-Name"):
        modelname.find("Same-Name")
    from arthur_cluster.cli import app

    r = CliRunner().invoke(app, ["probe", "Same-Name", "--static-only"])
    assert r.exit_code == 1 and "org-a/Same-Name" in r.output and "org-b/Same-Name" in r.output, r.output
    assert modelname.find("org-b/Same-Name").repo_id == "org-b/Same-Name"  # the full id still works


# --- a node's planned total holds every part, the Mamba state included ----------------------------------


@pytest.mark.parametrize("split,n", [("single", 1), ("tensor", 2), ("pipeline", 2)])
def test_each_nodes_total_is_the_sum_of_its_parts(split, n):
    cfg = json.loads(NEMOTRON_CONFIG.read_text())
    plan = memory.plan(cfg, context=8192, nodes=n, split=split)
    assert any(node.mamba_state > 0 for node in plan.nodes)
    for node in plan.nodes:
        parts = node.weights + node.kv_cache + node.mamba_state + node.activation + node.overhead
        assert node.total == parts, node
    assert plan.total == sum(node.total for node in plan.nodes)
