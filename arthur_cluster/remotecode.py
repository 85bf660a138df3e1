"""Remote code in a model folder: what config.json asks to run (auto_map, model_file) and what it imports.

Read with `ast` only: nothing in the folder is imported or executed.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from pydantic import BaseModel, Field

# Packages that exist only for CUDA (or x86) builds: on Apple-silicon Macs (arm64) they do not install.
ARM64_BLOCKERS = {
    "mamba_ssm": "Mamba's CUDA kernels; there is no arm64/Metal build",
    "causal_conv1d": "a CUDA kernel package; there is no arm64/Metal build",
    "flash_attn": "CUDA-only attention kernels",
    "triton": "GPU compiler without macOS support",
    "xformers": "CUDA kernels",
    "deepspeed": "CUDA training runtime",
    "apex": "NVIDIA's CUDA extensions",
}


class RemoteCode(BaseModel):
    declared: bool = False  # config.json has auto_map or model_file
    auto_map: dict[str, str] = Field(default_factory=dict)
    model_file: str | None = None
    files: list[str] = Field(default_factory=list)  # .py files in the folder
    missing: list[str] = Field(default_factory=list)  # modules the config names that are not in the folder
    imports: dict[str, list[str]] = Field(default_factory=dict)  # file -> top-level modules it imports
    unparsable: list[str] = Field(default_factory=list)
    arm64_blockers: dict[str, str] = Field(default_factory=dict)  # module -> why

    @property
    def third_party(self) -> list[str]:
        """Top-level modules imported by the files, minus the standard library and the folder's own files."""
        local = {Path(f).stem for f in self.files}
        std = set(sys.stdlib_module_names)
        mods = {m for ms in self.imports.values() for m in ms}
        return sorted(m for m in mods if m not in std and m not in local and m != "__future__")


def _imports(source: str) -> list[str]:
    tree = ast.parse(source)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module.split(".")[0])
    return sorted(set(found))


def _referenced_modules(auto_map: dict[str, str], model_file: str | None) -> list[str]:
    """auto_map values are "module.Class" or "repo--module.Class"; model_file is a file name."""
    mods = []
    for ref in auto_map.values():
        ref = ref.split("--", 1)[-1]
        if "." in ref:
            mods.append(ref.rsplit(".", 1)[0].replace(".", "/") + ".py")
    if model_file:
        mods.append(model_file if model_file.endswith(".py") else model_file + ".py")
    return sorted(set(mods))


def scan(folder: Path | str, config: dict) -> RemoteCode:
    folder = Path(folder)
    raw_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    auto_map = {}
    for k, v in raw_map.items():  # a value may be a [slow, fast] tokenizer pair
        if isinstance(v, str):
            auto_map[k] = v
        elif isinstance(v, list) and v and isinstance(v[0], str):
            auto_map[k] = v[0]
    model_file = config.get("model_file") if isinstance(config.get("model_file"), str) else None
    out = RemoteCode(declared=bool(auto_map or model_file), auto_map=auto_map, model_file=model_file)
    try:
        out.files = sorted(p.name for p in folder.glob("*.py") if p.is_file())
    except OSError:
        out.files = []
    names = set(out.files)
    out.missing = [m for m in _referenced_modules(auto_map, model_file) if Path(m).name not in names]
    for name in out.files:
        try:
            out.imports[name] = _imports((folder / name).read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError, OSError):
            out.unparsable.append(name)
    for mod in out.third_party:
        if mod in ARM64_BLOCKERS:
            out.arm64_blockers[mod] = ARM64_BLOCKERS[mod]
    return out
