"""exo's own API code on loopback (../shared/tools/exo-real: exo's FastAPI app, State, placement, card cache
and card-reconcile loop, with faked runners and tokens), started from the tests.

Every exo test runs against both exo versions users run (the `exo_kit` parameter): exo's main branch
(../shared/tools/exo-real) and its last release, v1.0.71 (../shared/tools/exo-real-v1.0.71). The tools are
found beside the repository (the repo's parent holds `shared/`, in CI as here). Their `setup` needs Python
3.13: where there is none the exo tests skip with that reason, except under CI=true, where they fail.
A harness starts in about 2 s; tests that need no special flags share one per module (`shared_exo`).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
# shared/ beside the clone (CI), or beside a folder of worktrees
SHARED = next((p / "shared" for p in REPO.parents if (p / "shared" / "tools").is_dir()), REPO.parent / "shared")


@dataclass(frozen=True)
class Kit:
    """One exo version's harness: its tool folder and exo's vendored source."""

    name: str
    tool: Path
    vendor_src: Path
    cards_in_state: bool  # main keeps custom cards in State (and deletes foreign card files); v1.0.71 keeps files


KITS = {
    "main": Kit("main", SHARED / "tools" / "exo-real", SHARED / "vendor" / "exo" / "src", True),
    "v1.0.71": Kit("v1.0.71", SHARED / "tools" / "exo-real-v1.0.71", SHARED / "vendor" / "exo-v1.0.71" / "src",
                   False),
}
TOOL = KITS["main"].tool
VENDOR_SRC = KITS["main"].vendor_src

LLAMA_ID = "mlx-community/Llama-3.2-1B-Instruct-4bit"  # exo ships a card for it
EXO_NEMOTRON_ID = "mlx-community/NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8Bit"  # exo's own Nemotron card
NEMOTRON_ID = "lmstudio-community/NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit"  # LM Studio's: no card in exo
GIB = 1 << 30


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@functools.lru_cache(maxsize=None)
def _setup(kit: str = "main") -> tuple[str | None, str]:
    """(the harness venv's python, or None; why not)."""
    tool = KITS[kit].tool
    setup = tool / "setup"
    if not setup.is_file():
        return None, f"no exo-real harness at {tool} (the repository's parent must hold shared/)"
    p = subprocess.run([str(setup)], capture_output=True, text=True, timeout=1800)
    if p.returncode == 0 and p.stdout.strip():
        return p.stdout.strip().splitlines()[-1], ""
    if p.returncode == 3:
        return None, "real-exo harness needs Python 3.13: " + p.stderr.strip()
    return None, f"exo-real setup failed (exit {p.returncode}): {p.stderr.strip()[-400:]}"


def exo_python(kit: str = "main") -> str:
    py, why = _setup(kit)
    if py is None:
        if in_ci() or "setup failed" in why:
            pytest.fail(why)  # CI must run these tests, never skip them
        pytest.skip(why)
    return py


@dataclass
class Harness:
    url: str
    proc: subprocess.Popen
    home: Path
    log: Path
    links: Path | None
    kit: Kit

    def get(self, path: str):
        return requests.get(self.url + path, timeout=30).json()  # a loaded CI machine answers slowly

    def instances(self) -> dict:
        return self.get("/state/instances")

    def custom_cards(self) -> dict:
        """The custom cards exo keeps: in State on main, as card files in EXO_HOME on v1.0.71 (no State field)."""
        if self.kit.cards_in_state:
            return self.get("/state/customModelCards")
        folder = self.home / "custom_model_cards"
        files = sorted(folder.glob("*.toml")) if folder.is_dir() else []
        return {p.stem.replace("--", "/", 1): p.read_text() for p in files}

    def model_ids(self) -> set[str]:
        return {m["id"] for m in self.get("/v1/models")["data"]}

    def downloaded(self) -> set[str]:
        return {m["id"] for m in self.get("/v1/models?status=downloaded")["data"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # exits within about 0.3 s, unless a request it serves waits on a hung host
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_harness(root: Path, *flags: str, links: Path | None = None, env: dict | None = None,
                  kit: str = "main") -> Harness:
    """exo-real on a free port. `links`: its EXO_MODELS_READ_ONLY_DIRS (the linker's exo dir); stderr to a file."""
    py = exo_python(kit)
    tool = KITS[kit].tool
    root.mkdir(parents=True, exist_ok=True)
    home, log = root / "exo-home", root / "harness.log"
    full_env = {**os.environ, "EXO_HOME": str(home), **(env or {})}
    full_env["EXO_MODELS_READ_ONLY_DIRS"] = str(links) if links else ""
    if links:
        links.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        proc = subprocess.Popen([py, str(tool / "harness.py"), "--port", "0", *flags], stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.DEVNULL, text=True, env=full_env, cwd=root)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        proc.wait(timeout=10)
        raise RuntimeError(f"exo-real harness did not start: {log.read_text()[-2000:]}")
    h = Harness(url=url, proc=proc, home=home, log=log, links=links, kit=KITS[kit])
    # exo fills its card cache at start while already answering: until then /v1/models lists part of it
    wait_for(lambda: {LLAMA_ID, EXO_NEMOTRON_ID} <= h.model_ids(), timeout=30)
    # ...and scans its read-only dirs for the weights of cards it knows (then every 60 s): wait for that scan
    cards = h.model_ids()
    present = {p.name.replace("--", "/", 1) for p in links.iterdir() if not p.name.startswith(".")} if links else set()
    wait_for(lambda: present & cards <= h.downloaded(), timeout=30)
    return h


@pytest.fixture(scope="session", params=list(KITS))
def exo_kit(request) -> Kit:
    """Each exo version users run: every test that starts exo runs once on each."""
    return KITS[request.param]


@pytest.fixture
def exo_factory(tmp_path, exo_kit):
    """make(*flags, links=dir, env={...}) -> a started harness; all stopped after the test."""
    started: list[Harness] = []

    def make(*flags: str, links: Path | None = None, env: dict | None = None) -> Harness:
        h = start_harness(tmp_path / f"exo-{len(started)}", *flags, links=links, env=env, kit=exo_kit.name)
        started.append(h)
        return h

    yield make
    for h in started:
        h.stop()


@pytest.fixture(scope="module")
def shared_exo(tmp_path_factory, tiny_models, exo_kit) -> Harness:
    """One harness per module: 2 nodes with 48 GiB free, exo's card loop running; the tiny Llama linked under
    exo's built-in Llama id in its read-only dir (its weights are there, so exo can place and run it)."""
    from arthur_cluster import linker, modelfiles

    root = tmp_path_factory.mktemp("shared-exo")
    links = root / "links"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARTHUR_CLUSTER_HOME", str(root / "state"))
        info = modelfiles.inspect(tiny_models["llama-4bit"], repo_id=LLAMA_ID)
        linker.link(info, repo_id=LLAMA_ID, exo_dir=links, hf=False)
    h = start_harness(root, "--nodes", "2", "--ram-gib", "48", links=links, kit=exo_kit.name)
    yield h
    h.stop()


@pytest.fixture
def library(lmstudio_home, tiny_models):
    """LM Studio holding the miniatures under the real ids (as the user's library would); every source byte
    is checked after the test. Modules that need another library define their own `library`."""
    from tests.linkhelp import content_hashes

    models = lmstudio_home / "models"
    shutil.copytree(tiny_models["nemotron_h-8bit"], models / NEMOTRON_ID)
    shutil.copytree(tiny_models["llama-4bit"], models / LLAMA_ID)
    before = content_hashes(models)
    yield models
    assert content_hashes(models) == before, "a source file in the LM Studio folder changed"


def wait_for(predicate, timeout: float = 10.0, step: float = 0.05):
    """Poll until predicate() is truthy (its value), or fail after `timeout` seconds."""
    import time

    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
