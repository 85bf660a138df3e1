"""Hostile model folders and files: FIFOs, folder links out, deep JSON/TOML, bad names, absurd numbers."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arthur_cluster import catalog, etags, linker, modelfiles, paths, safeio, sources
from tests.conftest import copy_model
from tests.linkhelp import cli_app, content_hashes, do_link, tree

RID = "org/Hostile"


class Hang(BaseException):
    """Raised by no_hang: a BaseException, so no `except OSError` (TimeoutError is one) can swallow it."""


@contextmanager
def no_hang(seconds: int = 20):
    """Fail (instead of blocking the suite) if the body has not finished in time."""
    def boom(*_):
        raise Hang(f"still running after {seconds} s: a hang")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def model(tmp_path, tiny_models) -> Path:
    return copy_model(tiny_models["llama-4bit"], tmp_path / "lib" / "org" / "Hostile")


def errors_of(folder: Path, **kw) -> list[str]:
    with no_hang():
        info = modelfiles.inspect(folder, **kw)
    return [str(p) for p in info.errors]


# --- links out of the model folder ---------------------------------------------------------------


def test_links_out_of_the_folder_are_not_followed(model, tmp_path):
    private = tmp_path / "private"
    for i in range(300):
        (private / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        (private / f"d{i % 5}" / f"note{i}.txt").write_text(f"private {i}")
    (tmp_path / "secret.txt").write_text("a private file")
    os.symlink(private, model / "notes")
    os.symlink("/usr", model / "usr")
    os.symlink(tmp_path / "secret.txt", model / "secret.txt")
    os.symlink("config.json", model / "alias.json")  # a link inside the folder is one of its files
    shard = model / "model.safetensors"  # weights kept elsewhere, linked in: still the model's
    os.rename(shard, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", shard)
    with no_hang():
        info = modelfiles.inspect(model)
    names = {f.name for f in info.files}
    assert {"alias.json", "secret.txt", "model.safetensors"} <= names and not {"notes", "usr"} & names
    assert not any(n.startswith(("notes/", "usr/")) for n in names) and len(names) < 20
    assert {f.name for f in info.files if f.outside} == {"secret.txt", "model.safetensors"}
    res = do_link(model, RID, exo=False)
    linked = {p.relative_to(res.snapshot).as_posix() for p in res.snapshot.rglob("*")}
    assert {"alias.json", "model.safetensors"} <= linked and not {"notes", "usr", "secret.txt"} & linked
    assert (res.snapshot / "model.safetensors").read_bytes() == (tmp_path / "elsewhere.safetensors").read_bytes()
    assert not any("private" in os.readlink(b) or "secret" in os.readlink(b) for b in (res.hf_repo / "blobs").iterdir())
    assert sum(any(n in w for w in res.warnings) for n in ("notes", "usr", "secret.txt")) == 3
    # The linker's own output is a link layout: its file links out of the snapshot are the model.
    snap = modelfiles.inspect(res.snapshot, repo_id=RID, source="path")
    assert snap.ok and {f.name for f in snap.files} == names - {"secret.txt"}


def test_walk_caps_name_the_cap(model, monkeypatch):
    deep = model / "a"
    for _ in range(modelfiles.MAX_DEPTH + 1):
        deep = deep / "a"
    deep.mkdir(parents=True)
    assert any(f"deeper than {modelfiles.MAX_DEPTH} folders" in e for e in errors_of(model))
    monkeypatch.setattr(modelfiles, "MAX_FILES", 5)
    assert any("more than 5 files (the cap" in e for e in errors_of(model))


def test_a_folder_that_is_no_model_is_not_walked():
    with no_hang(10):
        info = modelfiles.inspect(Path("/"))
    assert [p.message for p in info.errors] == [info.errors[0].message] and "not a model folder" in \
        info.errors[0].message and info.files == []


# --- FIFOs and other non-files --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", modelfiles.INDEX_NAME,
                                  "tokenizer_config.json", "tokenizer.json"])
def test_fifo_in_place_of_a_file_never_blocks(model, name):
    (model / name).unlink()
    os.mkfifo(model / name)
    errs = errors_of(model)
    assert any(e.startswith(name) and "regular file" in e for e in errs), errs
    before = tree(Path(os.environ["HOME"]))
    with no_hang(), pytest.raises(modelfiles.ModelFileError, match=name):
        do_link(model, RID)
    assert tree(Path(os.environ["HOME"])) == before


def test_fifo_model_in_a_real_cli_process(lmstudio_home):
    folder = lmstudio_home / "models" / "mlx-community" / "Tiny-Llama-MLX-4bit"
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    exe = Path(sys.executable).with_name("arthur-cluster")
    for args in (["models", "--json"], ["link", "mlx-community/Tiny-Llama-MLX-4bit"],
                 ["probe", str(folder), "--static-only"]):
        r = subprocess.run([str(exe), *args], capture_output=True, text=True, env=os.environ.copy(), timeout=120)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        if args[0] != "models":
            assert r.returncode != 0 and "model.safetensors" in r.stdout + r.stderr, (args, r.stdout, r.stderr)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_probe_of_a_folder_with_a_fifo_never_blocks(model, name):
    """The probe reads config.json for its own checks too (not only through the inspection)."""
    from arthur_cluster import probe

    (model / name).unlink()
    os.mkfifo(model / name)
    with no_hang():
        report = probe.run(str(model), static_only=True, use_cache=False)
    assert report.routes and all(r.verdict == "blocked" for r in report.routes)
    assert any(name in f.line() for f in report.findings), [f.line() for f in report.findings]


def test_reads_refuse_fifos_and_oversized_files(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with no_hang(), pytest.raises(safeio.UnsafeFileError, match="not a regular file"):
        safeio.read_regular(tmp_path / "pipe")
    (tmp_path / "big").write_bytes(b"x" * 2000)
    with pytest.raises(safeio.UnsafeFileError, match="1000-byte cap"):
        safeio.read_regular(tmp_path / "big", 1000)
    with no_hang(), pytest.raises(modelfiles.ModelFileError, match="not a regular file"):
        modelfiles.read_header(tmp_path / "pipe")
    with no_hang(), pytest.raises(OSError):
        etags.sha256_file(tmp_path / "pipe")


# --- deep nesting ---------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
DEEPISH = "[" * 500 + "]" * 500  # parses, but deeper than any real file


def _deep_header(path: Path, body: str) -> None:
    raw = ('{"a": ' + body + "}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


@pytest.mark.parametrize("body", [DEEP, DEEPISH], ids=["recursion", "over-cap"])
@pytest.mark.parametrize("where", ["header", "index", "config.json"])
def test_deep_json_in_model_files(model, where, body):
    if where == "header":
        _deep_header(model / "model.safetensors", body)
        want = "model.safetensors"
    elif where == "index":
        (model / modelfiles.INDEX_NAME).write_text('{"weight_map": ' + body + "}")
        want = modelfiles.INDEX_NAME
    else:
        (model / "config.json").write_text('{"x": ' + body + "}")
        want = "config.json"
    errs = errors_of(model)
    assert any(e.startswith(want) and "nested deeper" in e for e in errs), errs


def test_deep_tokenizer_config_is_no_chat_template(model):
    (model / "tokenizer_config.json").write_text('{"chat_template": ' + DEEP + "}")
    with no_hang():
        assert modelfiles.inspect(model).chat_template is False


@pytest.mark.parametrize("text", ["target = " + "[" * 5000 + "]" * 5000,
                                  "target = 'a/b'\nx = " + "{a=" * 3000 + "1" + "}" * 3000,
                                  "target = 'a/b'\nx = " + "[" * 40 + "]" * 40])
def test_deep_toml_catalogue(tmp_path, text):
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(catalog.CatalogError, match=str(path)):
        catalog.load(path)


def test_deep_json_in_our_own_files(model, tmp_path):
    cache_file = etags.cache_file()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text('{"etags": ' + DEEP + "}")
    assert etags.EtagCache().entries == {}
    res = do_link(model, RID, exo=False)
    (res.hf_repo / paths.LINK_MARKER).write_text(DEEP)
    rep = linker.doctor()
    assert [(f.kind, f.path) for f in rep.findings] == [("damaged", str(res.hf_repo / paths.LINK_MARKER))]
    lms = tmp_path / "lms"
    lms.mkdir()
    (lms / "settings.json").write_text('{"downloadsFolder": ' + DEEP + "}")
    assert paths.lmstudio_models(lms) == lms / "models"


# --- names ----------------------------------------------------------------------------------------


def test_non_utf8_file_name_is_skipped_and_leaves_nothing(model):
    bad = os.fsencode(model) + b"/notes-\xff\xfe.txt"
    with open(bad, "wb") as f:
        f.write(b"x")
    before = content_hashes(model)
    res = do_link(model, RID, exo=False)
    assert any("not valid UTF-8" in w for w in res.warnings)
    staging = paths.hf_cache() / ".locks" / linker.STAGING
    assert not any(staging.iterdir()) and linker.doctor().ok
    assert json.loads((res.hf_repo / paths.LINK_MARKER).read_text())["source"] == str(model)
    assert content_hashes(model) == before


def test_non_utf8_source_folder_is_refused_and_leaves_nothing(tmp_path, tiny_models):
    parent = os.fsencode(tmp_path) + b"/lib-\xff/org/Hostile"
    os.makedirs(parent)
    folder = Path(os.fsdecode(parent))
    copy_model(tiny_models["llama-4bit"], folder / "m")
    home = Path(os.environ["HOME"])
    before = tree(home)
    with pytest.raises(linker.LinkError, match="not valid UTF-8"):
        do_link(folder / "m", RID)
    assert tree(home) == before


def test_non_utf8_lmstudio_folder_is_listed_and_refused_cleanly(lmstudio_home):
    bad = os.fsencode(lmstudio_home / "models") + b"/pub-\xff/Model"
    os.makedirs(bad)
    with open(bad + b"/config.json", "w") as f:
        f.write("{}")
    found = sources.lmstudio(lmstudio_home / "models")
    (odd,) = [f for f in found if f.repo_id.startswith("pub-")]
    assert odd.repo_id == "pub-\\xff/Model"
    json.dumps(odd.repo_id).encode("utf-8")  # printable
    with pytest.raises(linker.LinkError, match="not a usable repo id"):
        linker.check_repo_id(odd.repo_id)


def test_ten_thousand_character_names(lmstudio_home):
    name = "x" * 10_000
    with pytest.raises(sources.SourceError, match="cap is 4096"):
        sources.resolve(name, [])
    do_link(lmstudio_home / "models" / "mlx-community" / "Tiny-Llama-MLX-4bit", "mlx-community/Tiny-Llama-MLX-4bit")
    r = CliRunner().invoke(cli_app(), ["unlink", name])
    assert r.exit_code == 1 and "past the cap of 1,024" in r.output and r.exception.__class__ is SystemExit
    with pytest.raises(linker.LinkError, match="not a usable repo id"):
        linker.check_repo_id("org/" + name)


def test_non_utf8_or_fifo_lmstudio_pointer(tmp_path):
    pointer = Path(os.environ["HOME"]) / ".lmstudio-home-pointer"
    pointer.write_bytes(b"/Users/\xff\xfe/lms\n")
    with pytest.raises(paths.LocationError, match=str(pointer)):
        paths.lmstudio_home()
    pointer.unlink()
    os.mkfifo(pointer)
    with no_hang(), pytest.raises(paths.LocationError, match="regular file"):
        paths.lmstudio_home()


# --- absurd numbers -------------------------------------------------------------------------------


def _quantized_model(folder: Path, scales_shape: list[int], group: int = 64) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization": {"group_size": group, "bits": 4}}))
    header = {"l.weight": {"dtype": "U32", "shape": [4, 8], "data_offsets": [0, 128]},
              "l.scales": {"dtype": "F16", "shape": scales_shape, "data_offsets": [128, 128 + 2 * scales_shape[0]
                                                                                    * scales_shape[1]]}}
    end = header["l.scales"]["data_offsets"][1]
    header["l.biases"] = dict(header["l.scales"], data_offsets=[end, end + end - 128])
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(end + end - 128))


@pytest.mark.parametrize("scales, group", [([4, 0], 64), ([4, 1], -64), ([4, 1], 100_000)])
def test_unusable_quantization_scales(tmp_path, scales, group):
    _quantized_model(tmp_path / "m", scales, group)
    errs = errors_of(tmp_path / "m")
    assert any(e.startswith("model.safetensors") and "no usable bit width" in e for e in errs), errs


@pytest.mark.parametrize("key, value", [("num_hidden_layers", 10**13), ("hidden_size", 10**30),
                                        ("max_position_embeddings", -5), ("layer_types", ["attention"] * 200_001)])
def test_absurd_config_numbers_name_the_cap(model, key, value):
    cfg = json.loads((model / "config.json").read_text())
    cfg[key] = value
    (model / "config.json").write_text(json.dumps(cfg))
    errs = errors_of(model)
    assert any(e.startswith("config.json") and key in e and "cap" in e for e in errs), errs


def test_huge_tensor_shape_is_a_bad_shape(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    raw = json.dumps({"a.weight": {"dtype": "F32", "shape": [0, 10**30], "data_offsets": [0, 0]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert any("bad shape" in e for e in errors_of(folder))


def test_fifo_catalogue_settings_and_etag_cache(tmp_path):
    os.mkfifo(tmp_path / "models.toml")
    with no_hang(), pytest.raises(catalog.CatalogError, match="regular file"):
        catalog.load(tmp_path / "models.toml")
    lms = tmp_path / "lms"
    lms.mkdir()
    os.mkfifo(lms / "settings.json")
    with no_hang():
        assert paths.lmstudio_models(lms) == lms / "models"
    etags.cache_file().parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(etags.cache_file())
    with no_hang():
        assert etags.EtagCache().entries == {}
