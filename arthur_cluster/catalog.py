"""models.toml: the target model, ordered fallbacks, per-model facts and an optional cluster."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import paths, safeio
from .errors import ArthurError

REPO_ROOT_CATALOG = Path(__file__).resolve().parent.parent / "models.toml"


class CatalogError(ArthurError, ValueError):
    """models.toml is missing or invalid; the message names the file and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    architecture: str | None = None
    context_length: int | None = Field(default=None, gt=0)
    storage_bytes: int | None = Field(default=None, ge=0)
    kv_bytes_per_token: int | None = Field(default=None, ge=0)
    state_bytes: int | None = Field(default=None, ge=0)
    exo_id: str | None = None


class NodeEntry(_Strict):
    name: str
    ssh: str | None = None
    ips: list[str] = Field(default_factory=list)
    memory_bytes: int | None = Field(default=None, gt=0)
    rdma: list[str] = Field(default_factory=list)
    # how arthur-cluster is run on the node over ssh: an absolute path or a command line (a non-interactive ssh
    # session has the login's PATH, not a virtual environment's); default: this machine's own absolute path
    program: str | None = Field(default=None, min_length=1, max_length=1024)


class ClusterEntry(_Strict):
    backend: Literal["ring", "jaccl", "nccl"] = "ring"
    nodes: list[NodeEntry] = Field(default_factory=list)


class DemoEntry(_Strict):
    target: str
    fallbacks: list[str] = Field(default_factory=list)


class Catalog(_Strict):
    target: str
    fallbacks: list[str] = Field(default_factory=list)
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    demo: DemoEntry | None = None
    cluster: ClusterEntry | None = None
    source: Path | None = None

    @model_validator(mode="after")
    def _ids_are_repo_ids(self) -> "Catalog":
        for rid in [self.target, *self.fallbacks, *self.models]:
            if rid.count("/") != 1 or not all(rid.split("/")):
                raise ValueError(f"{rid!r} is not a full repo id of the form org/name")
        return self

    def candidates(self) -> list[str]:
        """The target first, then fallbacks in order, without repeats."""
        out: list[str] = []
        for rid in [self.target, *self.fallbacks]:
            if rid not in out:
                out.append(rid)
        return out

    def entry(self, repo_id: str) -> ModelEntry:
        return self.models.get(repo_id, ModelEntry())

    def for_demo(self) -> "Catalog":
        if self.demo is None:
            raise CatalogError(f"{self.source}: no [demo] section; add one with target and fallbacks")
        return self.model_copy(update={"target": self.demo.target, "fallbacks": list(self.demo.fallbacks)})


def find() -> Path:
    """$ARTHUR_CLUSTER_MODELS, else ./models.toml, else the one beside the package."""
    if os.environ.get(paths.ENV_CATALOG):
        return Path(os.environ[paths.ENV_CATALOG]).expanduser()
    local = Path.cwd() / "models.toml"
    if local.is_file():
        return local
    return REPO_ROOT_CATALOG


def load(path: Path | str | None = None) -> Catalog:
    path = Path(path) if path else find()
    try:
        raw = tomllib.loads(safeio.read_regular(path, 1024 * 1024).decode("utf-8"))
        if safeio.too_deep(raw, 16):
            raise CatalogError(f"{path}: nested deeper than 16 levels (the cap); a catalogue is a few flat tables")
    except RecursionError:
        raise CatalogError(f"{path}: nested too deeply to read (the cap is 16 levels); a catalogue is a few flat "
                           "tables") from None
    except FileNotFoundError:
        raise CatalogError(
            f"{path}: catalogue not found; pass --catalog FILE or set {paths.ENV_CATALOG}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CatalogError(f"{path}: cannot read the catalogue ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"{path}: not valid TOML ({e}); fix the syntax at that line") from None
    try:
        return Catalog.model_validate({**raw, "source": path})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()
        )
        raise CatalogError(f"{path}: invalid catalogue: {problems}") from None
