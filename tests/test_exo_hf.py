"""Hugging Face refusing, hanging, or answering with files of other sizes, as exo sees it (exo-real --online
with HF_ENDPOINT at a stand-in on loopback): `up` ends within 60 s each time, no source byte changes, and
whatever exo's downloader replaces in a linked entry is a link, never a source file."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from arthur_cluster import bringup, linker, modelfiles, paths
from arthur_cluster.catalog import Catalog
from tests.exo_faults import LoopbackServer
from tests.fixtures_exo import KITS, LLAMA_ID, NEMOTRON_ID, exo_python
from tests.linkhelp import content_hashes


class HubStandIn(LoopbackServer):
    """Serves /<repo>/resolve/main/<file> for HEAD and GET, as the Hub does (content-length, sha256 etag)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self, with_body: bool) -> None:
                stand_in.requests.append(f"{self.command} {self.path}")
                name = self.path.split("/resolve/main/", 1)[-1]
                data = stand_in.files.get(name)
                if data is None:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-length", str(len(data)))
                self.send_header("etag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.end_headers()
                if with_body:
                    self.wfile.write(data)

            def do_HEAD(self) -> None:
                self._answer(False)

            def do_GET(self) -> None:
                self._answer(True)

        self._serve(Handler)


class HangingHub:
    """Accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.done = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.done:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def stop(self) -> None:
        self.done = True
        self.sock.close()
        for c in self.held:
            c.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def other_sizes(source: Path) -> dict[str, bytes]:
    """The Hub's copy of the metadata files, valid but of other sizes than the local ones."""
    config = json.loads((source / "config.json").read_text())
    index = json.loads((source / "model.safetensors.index.json").read_text())
    return {"config.json": json.dumps({**config, "_hub_copy": True}).encode(),
            "model.safetensors.index.json": json.dumps(index, indent=1).encode()}


@pytest.mark.parametrize("hub", ["refusing", "hanging", "other-sizes"])
def test_up_ends_within_60_s_whatever_the_hub_does_and_no_source_byte_changes(exo_factory, library, hub):
    source = library / NEMOTRON_ID
    stand_in = {"refusing": None, "hanging": HangingHub, "other-sizes": HubStandIn}[hub]
    server = HubStandIn(other_sizes(source)) if hub == "other-sizes" else stand_in() if stand_in else None
    endpoint = server.url if server else closed_port_url()
    try:
        h = exo_factory("--nodes", "2", "--online", links=paths.exo_links_dir(), env={"HF_ENDPOINT": endpoint})
        start = time.monotonic()
        dep = bringup.up(Catalog(target=NEMOTRON_ID, fallbacks=[LLAMA_ID]), engine="exo", exo_url=h.url,
                         timeout=60)
        assert time.monotonic() - start < 60
    finally:
        if server:
            server.stop()
    entry = paths.exo_links_dir() / paths.exo_model_dirname(NEMOTRON_ID)
    if hub == "hanging":  # exo waits 30 s per file on a Hub that hangs: `up` stops waiting and falls back
        assert dep.model == LLAMA_ID and "did not build a card" in dep.fallback_reason
        assert "Hugging Face" in dep.fallback_reason
        return
    assert dep.model == NEMOTRON_ID and dep.engine == "exo" and dep.fallback_reason is None
    if hub == "other-sizes":
        # exo replaced the entry's config.json and index with the Hub's: the links went, the sources stayed
        assert any(r.startswith("GET ") and r.endswith("/config.json") for r in server.requests)
        for name, data in other_sizes(source).items():
            assert not (entry / name).is_symlink() and (entry / name).read_bytes() == data
        again = bringup.up(Catalog(target=NEMOTRON_ID, fallbacks=[]), engine="exo", exo_url=h.url, timeout=60)
        assert again.instance_id == dep.instance_id  # the entry still links and serves: a rerun reuses it
        out = linker.unlink(NEMOTRON_ID)
        assert str(entry) in out.kept and "config.json" in out.warnings[0]  # not ours: never deleted
    else:
        assert all(p.is_symlink() for p in entry.iterdir())


DOWNLOAD = """
import asyncio, sys
from pathlib import Path
from exo.download.download_utils import download_file_with_retry
from exo.shared.types.common import ModelId
repo, name, target = sys.argv[1:]
print(asyncio.run(download_file_with_retry(ModelId(repo), "main", name, Path(target))))
"""


def test_exos_own_downloader_on_a_linked_entry_replaces_links_never_source_files(lmstudio_home, tmp_path, exo_kit):
    source = lmstudio_home / "models" / "lmstudio-community" / "Tiny-NemotronH-MLX-8bit"
    repo = "lmstudio-community/Tiny-NemotronH-MLX-8bit"
    before = content_hashes(source)
    res = linker.link(modelfiles.inspect(source, repo_id=repo), hf=False)
    shards = sorted(p.name for p in source.glob("model*.safetensors"))
    hub_files = {shards[0]: os.urandom(4096), "config.json": b'{"model_type": "nemotron_h"}'}
    hub = HubStandIn(hub_files)
    try:
        for name in hub_files:  # what exo's worker does for every file of a shard it downloads
            p = subprocess.run([exo_python(exo_kit.name), "-c", DOWNLOAD, repo, name, str(res.exo_link)],
                               capture_output=True,
                               text=True, timeout=120,
                               env={"HF_ENDPOINT": hub.url, "EXO_HOME": str(tmp_path / "exo"),
                                    "HOME": str(tmp_path), "PYTHONPATH": str(exo_kit.vendor_src)})
            assert p.returncode == 0, p.stderr[-2000:]
    finally:
        hub.stop()
    for name, data in hub_files.items():
        assert not (res.exo_link / name).is_symlink() and (res.exo_link / name).read_bytes() == data
    assert os.readlink(res.exo_link / shards[1]) == str(source / shards[1])  # the others are still links
    assert content_hashes(source) == before


def test_the_files_of_a_built_in_card_come_up_under_its_id_without_the_hub(exo_factory, lmstudio_home):
    """LM Studio's Nemotron 8-bit is the model of exo's built-in mlx-community card (52 layers, hidden 2688,
    8-bit, 33,559,880,448 bytes; models.toml names it as exo_id): `up` serves it under that id, so exo needs
    no card from the Hub, even one that hangs."""
    from arthur_cluster.catalog import ModelEntry
    from tests import realshape
    from tests.conftest import NEMOTRON_CONFIG
    from tests.fixtures_exo import EXO_NEMOTRON_ID

    source = realshape.build(lmstudio_home / "models" / NEMOTRON_ID, NEMOTRON_CONFIG)
    before = fingerprint(source)
    cat = Catalog(target=NEMOTRON_ID, fallbacks=[], models={NEMOTRON_ID: ModelEntry(exo_id=EXO_NEMOTRON_ID)})
    hub = HangingHub()
    try:
        h = exo_factory("--nodes", "2", "--online", links=paths.exo_links_dir(), env={"HF_ENDPOINT": hub.url})
        start = time.monotonic()
        dep = bringup.up(cat, engine="exo", exo_url=h.url, timeout=60)
        assert time.monotonic() - start < 30
    finally:
        hub.stop()
    assert dep.model == NEMOTRON_ID and dep.served_id == EXO_NEMOTRON_ID and dep.fallback_reason is None
    assert dep.engine == "exo" and dep.route.nodes == 2 and any("built-in card" in n for n in dep.notes)
    assert h.custom_cards() == {} and hub.held == []  # exo's own card; nobody asked the Hub
    entry = paths.exo_links_dir() / paths.exo_model_dirname(EXO_NEMOTRON_ID)
    downloads = h.get("/state/downloads")
    assert all(str(entry) in str(downloads[n]) for n in dep.nodes)  # the nodes load the linked folder
    assert fingerprint(source) == before


def fingerprint(folder: Path) -> dict[str, tuple]:
    """Every file's size, mtime and sha256 of its first and last MiB (the shards are 33 GB of sparse holes)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        with open(p, "rb") as f:
            head = f.read(1 << 20)
            f.seek(max(0, st.st_size - (1 << 20)))
            tail = f.read()
        out[p.name] = (st.st_size, st.st_mtime_ns, hashlib.sha256(head + tail).hexdigest())
    return out
