"""The demo library: an LM Studio home holding miniatures of the catalogue's demo models.

Real files in LM Studio's layout (publisher/repo), real MLX weights (random), a real tokenizer: everything
downstream (discovery, inspection, linking, probing, bring-up, document jobs) runs on it unchanged.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from . import catalog, miniature, paths

DATA = Path(__file__).resolve().parent / "data"
REAL_CONFIGS = {
    "nemotron_h": DATA / "nemotron-3-nano-30b-a3b-mlx-8bit.config.json",
    "llama": DATA / "llama-3.2-1b-instruct-4bit.config.json",
}


@dataclass(frozen=True)
class DemoHome:
    root: Path
    lmstudio_home: Path
    lmstudio_models: Path
    hf_cache: Path
    state: Path

    def environ(self) -> dict[str, str]:
        """Variables that point every arthur-cluster location (and the HF cache) into the demo home."""
        return {
            paths.ENV_LMSTUDIO_HOME: str(self.lmstudio_home),
            paths.ENV_LMSTUDIO_MODELS: str(self.lmstudio_models),
            "HF_HUB_CACHE": str(self.hf_cache),
            paths.ENV_STATE_DIR: str(self.state),
            "EXO_HOME": str(self.root / "exo"),
            "HF_HUB_OFFLINE": "1",
        }


def home_at(root: Path) -> DemoHome:
    lms = root / "lmstudio"
    return DemoHome(root, lms, lms / "models", root / "hf-cache", root / "arthur-cluster")


def architecture_of(repo_id: str) -> str:
    """Demo ids name their architecture: Tiny-NemotronH-... or Tiny-Llama-..."""
    name = repo_id.split("/", 1)[-1].lower()
    if "nemotron" in name:
        return "nemotron_h"
    if "llama" in name:
        return "llama"
    raise catalog.CatalogError(f"demo model {repo_id!r}: name it Tiny-NemotronH-* or Tiny-Llama-* in models.toml")


def bits_of(repo_id: str) -> int | None:
    name = repo_id.lower()
    for bits in (8, 6, 5, 4):
        if f"{bits}bit" in name:
            return bits
    return None


def build_library(home: DemoHome, cat: catalog.Catalog, *, on_model=None) -> list[Path]:
    """Write one miniature per demo model id (target and fallbacks) into the demo LM Studio folder."""
    demo = cat.for_demo()
    out = []
    for i, repo_id in enumerate(demo.candidates()):
        arch = architecture_of(repo_id)
        real = json.loads(REAL_CONFIGS[arch].read_text())
        quant = miniature.quantization_like(real)
        if quant and bits_of(repo_id):
            quant["bits"] = bits_of(repo_id)
        folder = home.lmstudio_models / repo_id
        if not (folder / "config.json").is_file():
            miniature.make(folder, arch, like=real, quant=quant, seed=i, shards=2 if arch == "nemotron_h" else 1)
        out.append(folder)
        if on_model:
            on_model(repo_id, folder)
    return out


def write_shell_setup(home: DemoHome, cat: catalog.Catalog) -> Path:
    """What a kept demo home needs to be used from a shell: a catalogue naming the demo models (so `pick`, `up`
    and `probe` find them) and env.sh, which points every location into the home. Returns env.sh."""
    demo = cat.for_demo()
    toml = home.root / "models.toml"

    def q(s: str) -> str:
        return json.dumps(s)  # a JSON string is a valid TOML basic string

    toml.write_text("# The demo library's catalogue (arthur-cluster demo --keep).\n"
                    f"target = {q(demo.target)}\nfallbacks = [{', '.join(q(f) for f in demo.fallbacks)}]\n\n"
                    f"[demo]\ntarget = {q(demo.target)}\nfallbacks = [{', '.join(q(f) for f in demo.fallbacks)}]\n",
                    encoding="utf-8")
    env = {**home.environ(), paths.ENV_CATALOG: str(toml)}
    script = home.root / "env.sh"
    script.write_text("# Use the kept demo home from this shell: . env.sh\n"
                      + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()), encoding="utf-8")
    return script


def activate(home: DemoHome) -> None:
    """Point this process at the demo home (the demo runs in its own process)."""
    os.environ.update(home.environ())


DEMO_QUESTION = "Which node holds the most memory, and how much?"

_NODES = [("studio", "M2 Ultra", 192), ("mini-1", "M4 Pro", 64), ("mini-2", "M4 Pro", 64), ("air", "M3", 24)]


def write_document(home: DemoHome, sections: int = 12) -> Path:
    """A small operations log for the document job: plain text whose answer the log itself states."""
    lines = ["# Cluster operations log", ""]
    for i in range(sections):
        name, chip, gb = _NODES[i % len(_NODES)]
        lines += [
            f"## Day {i + 1}: {name}",
            "",
            f"The node {name} ({chip}, {gb} GB of unified memory) joined the ring over Thunderbolt. "
            f"It held layers {i * 4} to {i * 4 + 3} of the pipeline while the document jobs ran, and its "
            f"prompt cache kept the shared prefix between questions. Throughput stayed steady; the operator "
            f"noted {i + 2} restarts of the smaller nodes after macOS updates.",
            "",
        ]
    path = home.root / "documents" / "operations-log.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
