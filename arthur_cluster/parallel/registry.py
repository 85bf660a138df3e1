"""Which architectures can be split how, and which callables split them.

Two halves. The static half (`supported`; `tensor_blockers`, `pipeline_split`, `layer_costs` come from `split`)
reads config dicts only and imports neither mlx nor mlx_lm, so the probe can call it on a fast path. The runtime half
(`SHARDING`, `apply`) maps a model type to the callables that split a loaded model: this project's own for
nemotron_h (pipeline and tensor) and llama (pipeline), mlx-lm's own `shard()` / `model.pipeline()` where
mlx-lm has them (llama's tensor split is mlx-lm's).

Pipeline convention (the same as mlx-lm's): rank n-1 runs the first layers (it embeds the prompt), rank 0 the
last ones; the final hidden state is shared with every rank so that all of them compute the same token.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path
from typing import Any, Callable

# The static arithmetic lives in `split`, which the model files import too (imports run one way:
# registry -> model files -> split); its names are re-exported here for the probe and the engines.
from .split import ShardingError, layer_costs, pipeline_split, split_counts, tensor_blockers  # noqa: F401

Config = dict[str, Any]


# --- what is supported -------------------------------------------------------------------------------

OWN = {"nemotron_h": {"pipeline": True, "tensor": True}, "llama": {"pipeline": True, "tensor": False}}


@functools.lru_cache(maxsize=1)
def mlx_lm_dir() -> Path | None:
    spec = importlib.util.find_spec("mlx_lm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _mlx_lm_models_dir() -> Path | None:
    root = mlx_lm_dir()
    return root / "models" if root else None


@functools.lru_cache(maxsize=1)
def model_remapping() -> dict[str, str]:
    """mlx_lm.utils.MODEL_REMAPPING (e.g. mistral -> llama), read from its source."""
    root = mlx_lm_dir()
    try:
        tree = ast.parse((root / "utils.py").read_text(encoding="utf-8")) if root else None
    except (OSError, SyntaxError):
        return {}
    for node in tree.body if tree else []:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODEL_REMAPPING" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}


def module_of(model_type: str) -> str:
    """The mlx-lm module a model type loads with (its own name unless mlx-lm remaps it)."""
    return model_remapping().get(model_type, model_type).replace("-", "_")


def mlx_lm_support(model_type: str) -> dict[str, bool]:
    """What mlx-lm itself can do for a model type, read from its model source (not imported)."""
    folder = _mlx_lm_models_dir()
    src = folder / f"{model_type}.py" if folder and re.fullmatch(r"[A-Za-z0-9_]+", model_type) else None
    if src is None or not src.is_file():
        return {"pipeline": False, "tensor": False}
    text = src.read_text(errors="replace")
    return {"pipeline": "PipelineMixin" in text, "tensor": re.search(r"def shard\(", text) is not None}


def supported(model_type: str) -> dict[str, bool]:
    """Whether a pipeline and a tensor split exist for this model type (this project's or mlx-lm's)."""
    module = module_of(model_type)
    own = OWN.get(module, {})
    lib = mlx_lm_support(module)
    return {mode: bool(own.get(mode) or lib[mode]) for mode in ("pipeline", "tensor")}


# --- runtime: the callables --------------------------------------------------------------------------
# Each pipeline callable: (model, group, ranges | None) -> model to run; each tensor callable:
# (model, group, config) -> model to run. They run on a lazily loaded model, before its weights are evaluated.


def _nemotron_pipeline(model, group, ranges=None):
    from . import nemotron_h

    return nemotron_h.pipeline(model, group, ranges)


def _nemotron_tensor(model, group, config=None):
    from . import nemotron_h

    return nemotron_h.tensor(model, group, config)


def _llama_pipeline(model, group, ranges=None):
    from . import llama

    return llama.pipeline(model, group, ranges)


def _mlx_lm_pipeline(model, group, ranges=None):
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "pipeline"):
        raise ShardingError(f"{type(model).__module__} has no pipeline() in this mlx-lm")
    inner.pipeline(group, split_counts(ranges) if ranges else None)
    return model


def _mlx_lm_tensor(model, group, config=None):
    if not hasattr(model, "shard"):
        raise ShardingError(f"{type(model).__module__} has no shard() in this mlx-lm")
    if config is not None and (why := tensor_blockers(config, group.size())):
        raise ShardingError(f"cannot split {config.get('model_type')} {group.size()} ways: " + "; ".join(why))
    model.shard(group)
    return model


def _build() -> dict[str, dict[str, Callable | None]]:
    table: dict[str, dict[str, Callable | None]] = {}
    folder = _mlx_lm_models_dir()
    for src in sorted(folder.glob("*.py")) if folder and folder.is_dir() else []:
        lib = mlx_lm_support(src.stem)
        if lib["pipeline"] or lib["tensor"]:
            table[src.stem] = {"pipeline": _mlx_lm_pipeline if lib["pipeline"] else None,
                               "tensor": _mlx_lm_tensor if lib["tensor"] else None}
    table["nemotron_h"] = {"pipeline": _nemotron_pipeline, "tensor": _nemotron_tensor}
    table["llama"] = {"pipeline": _llama_pipeline, "tensor": _mlx_lm_tensor}
    return table


SHARDING: dict[str, dict[str, Callable | None]] = _build()


def apply(model, mode: str, group, config: Config, ranges: list[range] | None = None):
    """Split a lazily loaded model for this rank; returns the model to run."""
    mtype = config.get("model_type", "?")
    module = module_of(mtype)
    fn = SHARDING.get(module, {}).get(mode)
    if fn is None:
        have = [m for m, f in SHARDING.get(module, {}).items() if f]
        raise ShardingError(f"no {mode} split for model type {mtype!r}"
                            + (f"; available: {', '.join(have)}" if have else "; it cannot be split"))
    if mode == "pipeline":
        return fn(model, group, ranges or pipeline_split(config, group.size()))
    return fn(model, group, config)
