"""The project's own vocabulary, shared by probe, fallback, memory, docjob, bring-up and the exo client.

A route is how a model runs: engine x sharding x backend x node count. A node's memory is what the memory
plans charge against. A finding is one thing a check learned, with its severity. None of these know any
engine's wire format (exo's JSON is read and written only in exo_client.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Engine = Literal["exo", "mlx"]
Sharding = Literal["single", "pipeline", "tensor"]
Backend = Literal["ring", "jaccl", "nccl"]
Severity = Literal["error", "warning", "info"]
Status = Literal["ok", "blocked", "unknown"]

ENGINES: tuple[Engine, ...] = ("exo", "mlx")
SHARDINGS: tuple[Sharding, ...] = ("single", "pipeline", "tensor")
BACKENDS: tuple[Backend, ...] = ("ring", "jaccl", "nccl")

DEFAULT_CONTEXT = 8192  # a chat or a short document; `--context` sets a job's real need (probe, pick, up, doc)
DEFAULT_USABLE_FRACTION = 0.75  # macOS lets the GPU wire about 3/4 of RAM by default (iogpu.wired_limit_mb)


class Route(BaseModel):
    """One way to run a model. One node has no backend (backend None): nothing crosses a link."""

    model_config = ConfigDict(frozen=True)

    engine: Engine
    sharding: Sharding
    backend: Backend | None = None
    nodes: int = 1

    @classmethod
    def single(cls, engine: Engine) -> "Route":
        return cls(engine=engine, sharding="single", backend=None, nodes=1)

    @property
    def split(self) -> Sharding:
        """How the memory plan divides the model: one node holds all of it whatever the sharding says."""
        return "single" if self.nodes <= 1 else self.sharding

    @property
    def label(self) -> str:
        if self.sharding == "single":
            return f"{self.engine} single node"
        return f"{self.engine} {self.sharding}/{self.backend} on {self.nodes} nodes"

    @property
    def key(self) -> str:
        """ENGINE/SHARDING/BACKEND/N, as `probe --route` takes it (one node: exo runs a ring of one, MLX local)."""
        backend = self.backend or ("ring" if self.engine == "exo" else "local")
        return f"{self.engine}/{self.sharding}/{backend}/{self.nodes}"


class NodeMemory(BaseModel):
    """A node's memory. The budget is what is available when known (exo's free memory), else a fraction
    of the total (the GPU's default wired limit on macOS). apple: the node runs attention in Metal's fused
    kernel (None: not known)."""

    name: str
    memory_bytes: int | None = None
    available_bytes: int | None = None
    usable_fraction: float = DEFAULT_USABLE_FRACTION
    apple: bool | None = None

    @property
    def budget(self) -> int | None:
        if self.available_bytes is not None:
            return self.available_bytes
        if self.memory_bytes is not None:
            return int(self.memory_bytes * self.usable_fraction)
        return None


class Finding(BaseModel):
    check: str  # e.g. "architecture", "tensor.divisibility", "exo.preview", "proof.equivalence"
    severity: Severity
    what: str
    why: str = ""
    fix: str = ""

    def line(self) -> str:
        return self.what + (f" ({self.why})" if self.why else "") + (f" — fix: {self.fix}" if self.fix else "")
