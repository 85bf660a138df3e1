"""Will this model run on this cluster, and how: a verdict per route, with the evidence.

A route is engine {exo, mlx} x sharding {single, pipeline, tensor} x backend {ring, jaccl, nccl} x node count.
Three layers of evidence, cheapest first:

1. static  — config and safetensors headers only (no mlx_lm, no transformers import): architecture known to the
             installed mlx-lm (its ModelArgs read with `ast`), remote code, layer pattern and caches, tensor
             divisibility per N, pipeline stages per N, quantization sanity, a memory plan per node;
2. live    — exo's HTTP API when reachable: versions, the model's card, /instance/previews for every
             sharding x instance meta x node count, RDMA readiness, node memory; a route exo accepts while
             the static checks show it is wrong is reported loudly;
3. proof   — on this machine's MLX: a miniature of the architecture runs a forward pass and greedy tokens,
             and the miniature split over real ranks (mlx.core.distributed, ring) must give the single-process
             token ids; JACCL and NCCL are asked of MLX, never assumed.

Verdicts: blocked when any finding of the route is an error; unknown when something could not be checked
(exo unreachable, a backend not verifiable from here); ok otherwise.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, Field, computed_field

from . import memory, modelfiles, paths, remotecode, safeio
from .catalog import ClusterEntry, ModelEntry
from .errors import ArthurError
from .memory import MemoryPlan
from .modelfiles import ModelInfo
from .types import DEFAULT_CONTEXT, ENGINES, SHARDINGS, Finding, NodeMemory, Route, Severity
from .parallel.registry import mlx_lm_dir, model_remapping  # the static half: imports no mlx

PROBE_VERSION = 1
DEFAULT_NODE_COUNTS = (2, 3, 4)
MAX_PROOF_RANKS = 8  # ranks of the local proof are real processes on this machine
PREVIEW_TIMEOUT = 20.0  # exo computes every placement for /instance/previews: slower than /state
MAX_PROBE_NODES = 64  # --nodes N probes every count 2..N: about 10 routes and 2 plans each

Verdict = Literal["ok", "blocked", "unknown"]
Progress = Callable[[str], None]


class ProbeError(ArthurError, ValueError):
    """The probe cannot start (model not found, bad route); the message says what to do."""


class RouteCheck(BaseModel):
    """The probe's verdict on one route, with its evidence."""

    route: Route
    verdict: Verdict = "unknown"
    findings: list[Finding] = Field(default_factory=list)
    open_questions: list[str] = Field(default_factory=list)  # what keeps an unblocked route from "ok"
    proven: bool = False  # greedy ids of the miniature matched over real ranks for this sharding
    peak_bytes: int | None = None  # the busiest node's planned memory
    fits: bool | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def engine(self) -> str:
        return self.route.engine

    @computed_field  # type: ignore[prop-decorator]
    @property
    def sharding(self) -> str:
        return self.route.sharding

    @computed_field  # type: ignore[prop-decorator]
    @property
    def backend(self) -> str:
        """As `--route` names it: ring | jaccl | nccl, and on one node ring (exo) or local (MLX)."""
        return self.route.key.split("/")[2]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def nodes(self) -> int:
        return self.route.nodes

    @property
    def key(self) -> str:
        return self.route.key

    def block(self, check: str, what: str, why: str = "", fix: str = "") -> None:
        self.findings.append(Finding(check=check, severity="error", what=what, why=why, fix=fix))

    def note(self, check: str, what: str, severity: Severity = "info", why: str = "", fix: str = "") -> None:
        self.findings.append(Finding(check=check, severity=severity, what=what, why=why, fix=fix))

    def decide(self) -> None:
        if any(f.severity == "error" for f in self.findings):
            self.verdict = "blocked"
        elif self.open_questions:
            self.verdict = "unknown"
        else:
            self.verdict = "ok"


class RouteSpec(BaseModel):
    """A route asked for; None parts match anything."""

    engine: str | None = None
    sharding: str | None = None
    backend: str | None = None
    nodes: int | None = None

    @classmethod
    def parse(cls, text: str) -> "RouteSpec":
        parts = [p.strip().lower() for p in text.strip().strip("/").split("/")]
        if not 1 <= len(parts) <= 4 or not parts[0]:
            raise ProbeError(f"route {text!r}: expected ENGINE/SHARDING/BACKEND/N, e.g. exo/pipeline/ring/2")
        spec: dict = {}
        for name, value, allowed in zip(("engine", "sharding", "backend"), parts[:3],
                                        (ENGINES, SHARDINGS, ("ring", "jaccl", "nccl", "local"))):
            if value in ("", "*", "any"):
                continue
            if value not in allowed:
                raise ProbeError(f"route {text!r}: {name} {value!r} is not one of {', '.join(allowed)}")
            spec[name] = value
        if len(parts) == 4 and parts[3] not in ("", "*", "any"):
            if not (parts[3].isascii() and parts[3].isdigit()) or int(parts[3]) < 1:  # '²' is a digit to str
                raise ProbeError(f"route {text!r}: the node count must be a positive number")
            if len(parts[3]) > 6 or int(parts[3]) > memory.MAX_NODES:
                raise ProbeError(f"route {text[:60]!r}: {parts[3][:20]} nodes is past the cap of "
                                 f"{memory.MAX_NODES:,} nodes; give the cluster's real node count")
            spec["nodes"] = int(parts[3])
        return cls(**spec)

    def matches(self, r: "RouteCheck | Route") -> bool:
        """Whether a probed route (or a plain Route, as the picker holds them) is one this spec asks for."""
        engine, sharding, backend, nodes = r.key.split("/")  # one text for both: backend "local" on one MLX node
        have = {"engine": engine, "sharding": sharding, "backend": backend, "nodes": int(nodes)}
        return all(v is None or v == have[k] for k, v in self.model_dump().items())

    def __str__(self) -> str:
        return "/".join("*" if v is None else str(v) for v in self.model_dump().values())


class ProbeReport(BaseModel):
    model: str
    path: Path | None = None
    model_type: str | None = None
    layer_pattern: str | None = None
    layer_counts: dict[str, int] = Field(default_factory=dict)
    caches: dict[str, int] = Field(default_factory=dict)  # {"kv": attention layers, "mamba": Mamba layers}
    context: int = DEFAULT_CONTEXT
    node_counts: list[int] = Field(default_factory=list)
    nodes: list[NodeMemory] = Field(default_factory=list)
    exo_url: str | None = None
    attention: Literal["materialized", "fused"] = "materialized"  # how the plans count attention scores
    routes: list[RouteCheck] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)  # about the model / cluster, not one route
    asked: str | None = None  # the route asked for (a spec; "*" parts match anything)
    route: RouteCheck | None = None  # the route that answers it: the first ok, else unknown, else blocked match
    verdict: Verdict = "unknown"
    memory: dict[str, MemoryPlan] = Field(default_factory=dict)  # "pipeline/2" -> plan
    proved: bool = False
    static_cached: bool = False
    timings: dict[str, float] = Field(default_factory=dict)  # seconds per phase

    def check(self, route: Route) -> RouteCheck | None:
        """The verdict on `route`, or None when the probe did not judge it."""
        return next((r for r in self.routes if r.route == route), None)

    def find(self, key: str) -> RouteCheck | None:
        """By `--route`'s ENGINE/SHARDING/BACKEND/N text."""
        return next((r for r in self.routes if r.key == key), None)

    def add(self, check: str, severity: Severity, what: str, why: str = "", fix: str = "") -> Finding:
        f = Finding(check=check, severity=severity, what=what, why=why, fix=fix)
        self.findings.append(f)
        return f


# --- mlx-lm, read without importing it ----------------------------------------------------------------


def mlx_lm_version() -> str | None:
    try:
        return importlib.metadata.version("mlx-lm")
    except importlib.metadata.PackageNotFoundError:
        return None


class ArchSupport(BaseModel):
    model_type: str
    module: str | None = None  # mlx_lm/models/<module>.py
    required: list[str] = Field(default_factory=list)  # ModelArgs fields without a default
    fields: list[str] = Field(default_factory=list)
    error: str | None = None


@functools.lru_cache(maxsize=32)
def architecture(model_type: str) -> ArchSupport:
    """Whether the installed mlx-lm has a module for `model_type`, and what its ModelArgs require."""
    root = mlx_lm_dir()
    out = ArchSupport(model_type=model_type)
    if root is None:
        out.error = "mlx-lm is not installed"
        return out
    module = model_remapping().get(model_type, model_type).replace("-", "_")
    src = root / "models" / f"{module}.py"
    if not re.fullmatch(r"[A-Za-z0-9_]+", module) or not src.is_file():
        out.error = f"mlx-lm {mlx_lm_version()} has no models/{module}.py"
        return out
    out.module = module
    try:
        tree = ast.parse(src.read_text(encoding="utf-8"))
    except (OSError, SyntaxError) as e:
        out.error = f"cannot read {src}: {e}"
        return out
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "ModelArgs":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    name = item.target.id
                    if name.startswith("_") or "ClassVar" in ast.unparse(item.annotation):
                        continue
                    out.fields.append(name)
                    if item.value is None:
                        out.required.append(name)
    if not out.fields:
        out.error = f"mlx_lm/models/{module}.py has no ModelArgs dataclass this probe can read"
    return out


# --- static checks -----------------------------------------------------------------------------------


class StaticFacts(BaseModel):
    """Everything the static checks learn about the model itself (cached by model identity)."""

    info: ModelInfo
    findings: list[Finding] = Field(default_factory=list)
    arch_ok: bool = True  # the installed mlx-lm can build it
    remote_blocks: bool = False  # remote code that is not trusted or cannot run on the nodes
    broken: bool = False  # the files cannot be loaded at all
    unquantized_experts: bool = False


def identity(info: ModelInfo, trust_remote_code: bool) -> str:
    """A key that changes when any file, the config, mlx-lm or this probe changes."""
    h = hashlib.sha256()
    h.update(json.dumps([str(Path(info.path).resolve()), PROBE_VERSION, mlx_lm_version(), trust_remote_code,
                         [(f.name, f.size, f.mtime_ns) for f in info.files]]).encode())
    h.update(json.dumps(info.config, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _cache_file(key: str) -> Path:
    return paths.state_dir() / "probe-cache" / f"{key}.json"


def static_facts(folder: Path, *, repo_id: str | None = None, source: str = "path",
                 trust_remote_code: bool = False, use_cache: bool = True) -> tuple[StaticFacts, bool]:
    """Inspect and check a folder; (facts, from_cache)."""
    files, _ = modelfiles.list_files(folder) if folder.is_dir() else ([], [])
    cfg_text = _read_text(folder / "config.json")
    probe_key = ModelInfo(path=folder, files=files, config={"_raw": cfg_text or ""})
    key = identity(probe_key, trust_remote_code)
    cache = _cache_file(key)
    if use_cache and cache.is_file():
        try:
            facts = StaticFacts.model_validate_json(cache.read_text(encoding="utf-8"))
            facts.info.repo_id, facts.info.source = repo_id or facts.info.repo_id, source
            return facts, True
        except (OSError, ValueError):
            pass
    info = modelfiles.inspect(folder, repo_id=repo_id, source=source)
    facts = check_model(info, trust_remote_code=trust_remote_code)
    if use_cache and folder.is_dir():
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(facts.model_dump_json(), encoding="utf-8")
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only state dir only costs the cache
    return facts, False


def _read_text(path: Path) -> str | None:
    try:  # regular files only, bounded: a FIFO named config.json must not hang the probe
        return safeio.read_regular(path).decode("utf-8", errors="replace")
    except OSError:
        return None


def check_model(info: ModelInfo, *, trust_remote_code: bool = False) -> StaticFacts:
    facts = StaticFacts(info=info)
    _check_files(facts)
    if info.config:
        _check_architecture(facts)
        _check_remote_code(facts, trust_remote_code)
        _check_layers(facts)
        _check_quantization(facts)
    return facts


def _add(facts: StaticFacts, check: str, severity: Severity, what: str, why: str = "", fix: str = "") -> None:
    facts.findings.append(Finding(check=check, severity=severity, what=what, why=why, fix=fix))


def _check_files(facts: StaticFacts) -> None:
    info = facts.info
    for p in info.problems:
        _add(facts, "files", p.severity, f"{p.file or '(folder)'}: {p.message}", fix=p.fix)
    if info.format == "gguf":
        _add(facts, "files", "error", "a GGUF model: MLX and exo run MLX safetensors folders",
             fix="use an MLX conversion of this model (LM Studio lists both formats)")
    facts.broken = not info.ok or info.format != "mlx"


def _check_architecture(facts: StaticFacts) -> None:
    info = facts.info
    mtype = info.model_type
    if not mtype:
        facts.arch_ok = False
        return
    arch = architecture(mtype)
    ver = mlx_lm_version()
    if arch.error:
        facts.arch_ok = False
        _add(facts, "architecture", "error", f"{mtype}: not supported by the installed mlx-lm ({arch.error})",
             why="mlx-lm builds the model from mlx_lm/models/<model_type>.py",
             fix="upgrade mlx-lm (pip install -U mlx-lm) or pick a fallback model")
        return
    cfg = modelfiles.text_config(info.config)
    missing = [f for f in arch.required if f not in cfg]
    if missing:
        facts.arch_ok = False
        _add(facts, "architecture", "error",
             f"config.json lacks {', '.join(missing)}, required by mlx_lm/models/{arch.module}.py ModelArgs",
             why=f"mlx-lm {ver} cannot construct the model without them",
             fix="re-download config.json from the MLX conversion, or upgrade mlx-lm if it renamed the field")
    else:
        _add(facts, "architecture", "info",
             f"{mtype}: mlx-lm {ver} has models/{arch.module}.py; config has all {len(arch.required)} required "
             "ModelArgs fields")


def _check_remote_code(facts: StaticFacts, trusted: bool) -> None:
    info = facts.info
    rc = remotecode.scan(info.path, info.config)
    if not rc.declared and not rc.files:
        return
    if not rc.declared:
        _add(facts, "remote_code", "info", f"{len(rc.files)} .py file(s) in the folder, not referenced by config.json")
        return
    imports = ", ".join(rc.third_party) or "only the standard library"
    refs = ", ".join(sorted(set(rc.auto_map.values()) | ({rc.model_file} if rc.model_file else set())))
    native = facts.arch_ok and not rc.model_file
    if rc.arm64_blockers:
        facts.remote_blocks = not native
        mods = "; ".join(f"{m}: {why}" for m, why in rc.arm64_blockers.items())
        _add(facts, "remote_code", "warning" if native else "error",
             f"remote code imports {', '.join(rc.arm64_blockers)}, which cannot install on Apple silicon (arm64)",
             why=mods, fix="use mlx-lm's own implementation of this architecture (no trust_remote_code)"
             if native else "pick an MLX conversion that mlx-lm supports natively, or a fallback model")
    if rc.missing:
        _add(facts, "remote_code", "warning" if native else "error",
             f"config.json names code not in the folder: {', '.join(rc.missing)}",
             fix="copy the .py files from the original repo")
        facts.remote_blocks = facts.remote_blocks or not native
    if native:
        _add(facts, "remote_code", "info", f"remote code declared ({refs}; imports {imports}); mlx-lm builds "
             f"{info.model_type} natively and does not run it")
    elif not trusted:
        facts.remote_blocks = True
        _add(facts, "remote_code", "error", f"the model needs its own code to run ({refs}; imports {imports})",
             why="running code from a model folder executes whatever it contains",
             fix="read the files, then pass --trust-remote-code")
    else:
        _add(facts, "remote_code", "warning", f"remote code trusted ({refs}; imports {imports})")


def _check_layers(facts: StaticFacts) -> None:
    info = facts.info
    if not info.layer_pattern:
        return
    counts = ", ".join(f"{v} {k}" for k, v in info.layer_counts.items())
    _add(facts, "layers", "info", f"{info.num_layers} layers: {counts}" +
         (f" (pattern {info.layer_pattern})" if len(set(info.layer_pattern)) > 1 else ""))
    kv = sum(c in "*" for c in info.layer_pattern)
    mamba = info.layer_pattern.count("M")
    parts = []
    if kv:
        parts.append(f"KV cache in {kv} attention layer(s)")
    if mamba:
        parts.append(f"Mamba state (ArraysCache: conv + SSM) in {mamba} layer(s), constant in the context")
    rest = (info.num_layers or 0) - kv - mamba
    if rest > 0 and (kv or mamba):
        parts.append(f"no cache in {rest} MoE/MLP layer(s)")
    if parts:
        _add(facts, "caches", "info", "; ".join(parts))


def _check_quantization(facts: StaticFacts) -> None:
    """Quantized widths against the group size, and MoE experts left in a float dtype."""
    info = facts.info
    q = info.quantization
    group = q.group_size if q else None
    bad, unquantized, experts_float = [], [], []
    for shard in info.shards if info.ok else []:
        try:
            header, _, _ = modelfiles.read_header(info.path / shard)
        except modelfiles.ModelFileError:
            continue
        for name, t in header.items():
            shape, dtype = t.get("shape") or [], t.get("dtype")
            if not name.endswith(".weight") or not shape:
                continue
            base = name[:-7]
            if dtype == "U32" and base + ".scales" in header:
                scales = header[base + ".scales"]["shape"]
                g = modelfiles._group_size(info, base) or group
                bits = modelfiles._bits_for(info, base) or (q.bits if q else None)
                width = shape[-1] * 32 // bits if bits else None
                if g and width and (width % g or not scales or scales[-1] * g != width):
                    bad.append(f"{base} (input width {width}, group {g})")
            elif dtype in ("BF16", "F16") and len(shape) == 3 and ("switch_mlp" in name or "experts" in name):
                experts_float.append(base)
            elif q and dtype in ("BF16", "F16", "F32") and len(shape) == 2 and group and shape[-1] % group \
                    and "norm" not in name and "conv1d" not in name:
                unquantized.append(f"{base} ({shape[-1]})")
    if bad:
        _add(facts, "quantization", "error", f"{len(bad)} quantized tensor(s) whose input width is not whole groups: "
             + ", ".join(bad[:3]), why="quantized matmuls need the group size to divide the input width",
             fix="re-convert with a group size that divides every width (mlx_lm.convert --q-group-size 32)")
        facts.broken = True
    if unquantized:
        _add(facts, "quantization", "info", f"{len(unquantized)} linear layer(s) left unquantized because their "
             f"width is not a multiple of group {group}: " + ", ".join(unquantized[:3]))
    if experts_float:
        facts.unquantized_experts = True
        _add(facts, "quantization", "warning", f"MoE experts stored unquantized ({len(experts_float)} stacks, e.g. "
             f"{experts_float[0]})", why="on CPU (exo nodes on Linux, MLX on CPU) gather_mm supports float32 only: "
             "bf16/fp16 experts fail with '[GatherMM::eval] Currently only supports float32'",
             fix="on CPU nodes load in float32 (model.set_dtype(mx.float32)) or quantize the experts; "
             "Metal and CUDA are unaffected")
    elif q is None and info.model_type and "E" in (info.layer_pattern or "") and \
            str(info.torch_dtype or "bfloat16") in ("bfloat16", "float16"):
        facts.unquantized_experts = True
        _add(facts, "quantization", "warning", f"unquantized {info.torch_dtype} MoE experts",
             why="on CPU gather_mm supports float32 only", fix="use float32 or a quantized conversion on CPU nodes")


# --- the cluster --------------------------------------------------------------------------------------


def cluster_nodes(cluster: ClusterEntry | None) -> list[NodeMemory]:
    return [NodeMemory(name=n.name, memory_bytes=n.memory_bytes) for n in (cluster.nodes if cluster else [])]


def node_counts(nodes: int | None, known: list[NodeMemory], asked: RouteSpec | None) -> list[int]:
    top = nodes or (len(known) if known else None)
    counts = list(range(2, top + 1)) if top else list(DEFAULT_NODE_COUNTS)
    if asked and asked.nodes and asked.nodes > 1 and asked.nodes not in counts:
        counts.append(asked.nodes)
    return sorted(counts)


@functools.lru_cache(maxsize=4)
def local_backends() -> dict[str, bool]:
    """Which distributed backends this machine's MLX has (mlx.core only: cheap)."""
    try:
        import mlx.core as mx
    except ImportError:
        return {"ring": False, "jaccl": False, "nccl": False}
    return {b: bool(mx.distributed.is_available(b)) for b in ("ring", "jaccl", "nccl")}


def make_routes(counts: list[int]) -> list[RouteCheck]:
    routes = [RouteCheck(route=Route.single("exo")), RouteCheck(route=Route.single("mlx"))]
    mlx_backends = ["ring", "jaccl"] + (["nccl"] if local_backends().get("nccl") else [])
    for n in counts:
        for engine in ENGINES:
            for sharding in ("pipeline", "tensor"):
                for backend in (("ring", "jaccl") if engine == "exo" else mlx_backends):
                    routes.append(RouteCheck(route=Route(engine=engine, sharding=sharding, backend=backend, nodes=n)))
    return routes


# --- per-route static evaluation ---------------------------------------------------------------------------


def _registry():
    try:
        from .parallel import registry
    except ImportError:
        return None
    return registry


def _tensor_blockers(reg, cfg: dict, n: int) -> list[str]:
    if reg is None:
        return []
    try:
        return reg.tensor_blockers(cfg, n)
    except (KeyError, TypeError, ValueError) as e:
        return [f"the config cannot be checked ({type(e).__name__}: {e})"]


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def plan_memory(report: ProbeReport, facts: StaticFacts | None, entry: ModelEntry | None, counts: list[int],
                nodes: list[NodeMemory], attention: str) -> None:
    """One plan per split and node count (memory.fit, as pick and doc plan), on the first n known nodes; with
    no cluster known, the single route is this machine and the others are nodes of unknown memory."""
    from .cluster import local_node

    source = facts.info if facts and facts.info.config else entry
    if source is None:
        return
    for split, n in [("single", 1)] + [(s, n) for n in counts for s in ("pipeline", "tensor")]:
        mem = nodes[:n] if len(nodes) >= n else ([local_node()] if n == 1 and not nodes else n)
        try:
            report.memory[f"{split}/{n}"] = memory.fit(source, context=report.context, nodes=mem, split=split,
                                                       apple=attention == "fused", name=report.model)
        except (memory.PlanError, KeyError, TypeError, ValueError) as e:
            report.memory[f"{split}/{n}"] = MemoryPlan(model=report.model, split=split, context=report.context,
                                                       prefill_step=memory.DEFAULT_PREFILL_STEP, kv_bits=16,
                                                       source="config", notes=[f"cannot plan: {e}"])


def evaluate_static(report: ProbeReport, facts: StaticFacts | None, entry: ModelEntry | None,
                    known_nodes: list[NodeMemory]) -> None:
    cfg = facts.info.config if facts else {}
    mtype = report.model_type
    reg = _registry()
    support = reg.supported(mtype) if reg and mtype else {"pipeline": False, "tensor": False}
    layers = len(report.layer_pattern or "") or None
    for r in report.routes:
        if facts and facts.broken:
            r.block("files", "the model files cannot be loaded", fix="see the findings above")
        if facts and not facts.arch_ok and r.engine == "mlx":
            r.block("architecture", f"the installed mlx-lm cannot build {mtype}")
        elif facts and not facts.arch_ok:
            r.open_questions.append("exo's mlx-lm may differ from this machine's: check exo's previews")
        if facts and facts.remote_blocks:
            r.block("remote_code", "remote code is required and not usable", fix="see the remote_code finding")
        if facts is None:
            r.open_questions.append("model not on disk: only the catalogue's figures were checked")
        if known_nodes and r.nodes > len(known_nodes):
            r.block("nodes", f"{r.nodes} nodes asked, the cluster has {len(known_nodes)}")
        if r.sharding == "tensor" and cfg:
            why = _tensor_blockers(reg, cfg, r.nodes)
            for w in why:
                r.block("tensor.divisibility", f"tensor split over {r.nodes} nodes: {w}",
                        why="every rank must hold a whole share of the heads/groups/widths, else results are wrong",
                        fix="use pipeline sharding, or a node count that divides them")
        if r.sharding == "pipeline" and layers and r.nodes > layers:
            r.block("pipeline", f"{r.nodes} pipeline stages need at least {r.nodes} layers; the model has {layers}")
        if r.engine == "mlx" and r.sharding != "single" and mtype and not support.get(r.sharding):
            r.block("sharding", f"no {r.sharding} split for {mtype} in mlx-lm {mlx_lm_version()} or this project",
                    why="mlx-lm's sharded_load refuses a model without shard()/pipeline()",
                    fix="use another sharding, exo, or a model mlx-lm can split")
        _route_memory(report, r)
        _route_backend(report, r)


def _route_memory(report: ProbeReport, r: RouteCheck) -> None:
    plan = report.memory.get(f"{r.sharding}/{r.nodes}")
    if plan is None or not plan.nodes:
        return
    peak = plan.peak_node
    r.peak_bytes, r.fits = peak.total, plan.fits
    if plan.fits is False:
        short = [n for n in plan.nodes if n.fits is False]
        worst = min(short, key=lambda n: n.headroom or 0)
        hb = memory.human_bytes
        r.block("memory", f"does not fit at context {report.context}: {memory.fit_text(plan)}",
                why=f"{worst.node}: weights {hb(worst.weights)}, KV {hb(worst.kv_cache)}, Mamba state "
                    f"{hb(worst.mamba_state)}, activations {hb(worst.activation)}",
                fix="more nodes, a smaller context (--context), a smaller quantization, or a fallback model")
    if r.sharding == "pipeline":
        stages = ", ".join(f"{n.node} layers {n.layers[0]}-{n.layers[1] - 1}: {memory.human_bytes(n.total)}"
                           for n in plan.nodes if n.layers)
        r.note("pipeline", f"stages: {stages}")


def _route_backend(report: ProbeReport, r: RouteCheck) -> None:
    if r.backend == "jaccl" and r.engine == "mlx":
        r.open_questions.append("JACCL needs RDMA over Thunderbolt 5 on every node: not verifiable from here")
    if r.backend == "nccl":
        r.open_questions.append("NCCL runs on CUDA nodes only")
        if r.sharding == "pipeline":  # measured on two H200s with MLX 0.32.4 CUDA: all_sum works, recv does not
            r.block("backend", "pipeline stages pass activations with send/recv, which MLX's NCCL backend lacks",
                    "MLX (CUDA) answers 'Recv has no CUDA implementation'",
                    "use tensor sharding over nccl, or the ring backend for pipeline")
    if r.engine == "exo" and not report.exo_url:
        r.open_questions.append("exo not checked (no --exo URL): its acceptance of this route is unknown")


# --- live exo ----------------------------------------------------------------------------------------------


def exo_connect(report: ProbeReport, url: str, progress: Progress):
    """The cluster a reachable exo reports (cluster.discover, as pick and up see it), else None with a finding."""
    from .cluster import ClusterError, discover

    progress(f"asking exo at {url}")
    try:
        return discover(engine="exo", exo_url=url).clusters[0]
    except ClusterError as e:
        report.add("exo", "warning", f"exo not usable: {e}",
                   fix="start exo, or check --exo / EXO_API (exo's API is on port 52415)")
        return None


def exo_nodes(exo) -> list[NodeMemory]:
    """exo's nodes as the plans see them, the largest free memory first (as exo's placement fills them)."""
    return [n.memory() for n in sorted(exo.nodes, key=lambda n: (-(n.available_bytes or 0), n.name))]


def live_exo(report: ProbeReport, exo, candidates: list[str], static_blocked: dict[Route, list[Finding]],
             progress: Progress) -> None:
    """Nodes, card, previews and RDMA from exo (a discovered cluster); route verdicts are updated in place."""
    from . import exo_client
    from .cluster import exo_client as client_for

    client = client_for(exo.endpoint, exo.deadline, read_timeout=PREVIEW_TIMEOUT)
    report.exo_url = exo.endpoint
    nodes = exo.nodes
    # exo's API reports no version: nodes of another version never join, so they are simply not listed here.
    report.add("exo.nodes", "info", f"{len(nodes)} exo node(s): " + ", ".join(n.name for n in nodes))
    report.add("exo.memory", "info", "node memory: " + ", ".join(
        f"{n.display} {_gib(n.available_bytes)} free of {_gib(n.memory_bytes)}" for n in nodes))
    for r in report.routes:
        if r.engine == "exo" and r.nodes > len(nodes):
            r.block("nodes", f"exo sees {len(nodes)} node(s), the route needs {r.nodes}")
    # The card: exo must know the exact id (custom cards come from the linker).
    try:
        cards = {m.id: m for m in client.models()}
    except exo_client.ExoError as e:
        report.add("exo.card", "warning", f"exo's model list failed: {e}")
        cards = {}
    model_id = next((c for c in candidates if c in cards), None)
    if model_id is None:
        report.add("exo.card", "error", f"exo has no card for {' or '.join(candidates) or report.model}",
                   fix="run `arthur-cluster link MODEL`, then `arthur-cluster up`: it registers the model with exo "
                       "(POST /models/add), which keeps the card on every node")
        for r in report.routes:
            if r.engine == "exo":
                r.block("exo.card", "exo has no card for this model")
        return
    card = cards[model_id]
    report.add("exo.card", "info", f"exo card {model_id} ({'custom' if card.is_custom else 'built-in'}, "
               f"supports_tensor={card.supports_tensor})")
    progress(f"asking exo for placement previews of {model_id}")
    try:
        previews = client.previews(model_id)
    except exo_client.ExoError as e:
        report.add("exo.preview", "warning", f"exo's previews failed: {e}")
        for r in report.routes:
            if r.engine == "exo":
                r.open_questions.append("exo's previews failed")
        return
    _apply_previews(report, previews, static_blocked)
    _rdma(report, nodes)


def _apply_previews(report: ProbeReport, previews: list, static_blocked: dict[Route, list[Finding]]) -> None:
    by_route = {}
    for p in previews:
        if p.route is not None:
            by_route.setdefault(p.route, p)
    for r in report.routes:
        if r.engine != "exo":
            continue
        p = by_route.get(r.route)
        # exo sends one error row per (sharding, meta), for no node count in particular
        refused = next((x for x in previews if x.refuses(r.route)), None)
        if p is None and refused is not None:
            r.block("exo.preview", f"exo refuses: {refused.error or 'no placement'}")
            continue
        if p is None:
            r.open_questions.append("exo gave no preview for this route (not enough nodes, or an older exo)")
            continue
        wrong = static_blocked.get(r.route) or []
        if wrong:
            msg = (f"EXO ACCEPTS {r.sharding.upper()} ON {r.nodes} NODES, AND IT IS WRONG: "
                   + "; ".join(f.what for f in wrong[:2]))
            r.block("exo.accepts_wrong", msg, why="exo's placement does not check these quantities; the instance "
                    "would load and produce wrong output or crash", fix="do not place this route; use another")
            report.add("exo.accepts_wrong", "error", f"{r.key}: {msg}")
        else:
            r.note("exo.preview", "exo accepts this placement" + (
                f" (exo's memory estimate {_gib(max(p.memory_delta_by_node.values()))}/node is storage split "
                "evenly, without KV cache)" if p.memory_delta_by_node else ""))


def _rdma(report: ProbeReport, nodes: list) -> None:
    """JACCL needs RDMA on Apple silicon: rdma_ctl not off and RDMA links, on Macs (exo's backends when it
    publishes them, else the chip)."""
    not_ready = [n.display for n in nodes if not n.rdma]
    if not_ready:
        report.add("exo.rdma", "info", f"JACCL not possible on {', '.join(not_ready)}: no RDMA links, rdma_ctl not "
                   "enabled, or not Apple silicon", fix="run `rdma_ctl enable` from macOS Recovery on every node, "
                   "cable Thunderbolt 5 all-to-all, same macOS on every node")
    for r in report.routes:
        if r.backend == "jaccl" and r.engine == "exo" and len(nodes) - len(not_ready) < r.nodes:
            r.block("exo.rdma", f"fewer than {r.nodes} nodes have RDMA (rdma_ctl enabled, RDMA links) on Apple "
                    "silicon")


# --- local proof -----------------------------------------------------------------------------------------

_SMOKE = r"""
import json, sys, time
t = time.time()
from pathlib import Path
from arthur_cluster import miniature
import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler
arch, out, like, quant = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
miniature.make(out, arch, like=like, quant=quant)
model, tok = load(str(out))
prompt = mx.array([1, 7, 42, 99, 3, 250, 17, 5])
ids = []
for (token, _), _ in zip(generate_step(prompt, model, max_tokens=4, sampler=make_sampler(temp=0.0)), range(4)):
    ids.append(int(token))
logits = model(prompt[None])
ok = bool(mx.all(mx.isfinite(logits)).item())
print(json.dumps({"ids": ids, "finite": ok, "seconds": time.time() - t}))
"""


def jaccl_local() -> Finding:
    """Ask this machine's MLX whether JACCL exists, and try to start it (in a subprocess: it may abort)."""
    code = ("import json, mlx.core as mx\nr = {'available': bool(mx.distributed.is_available('jaccl'))}\n"
            "try:\n    mx.distributed.init(backend='jaccl', strict=True)\n    r['init'] = 'ok'\n"
            "except Exception as e:\n    r['init'] = f'{type(e).__name__}: {e}'\nprint(json.dumps(r))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "MLX_RANK": "", "MLX_JACCL_COORDINATOR": "", "MLX_IBV_DEVICES": ""})
        res = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return Finding(check="proof.jaccl", severity="info", what=f"JACCL: could not ask MLX ({e})")
    where = f"{platform.system()} {platform.machine()}"
    if res.get("available") and res.get("init") == "ok":
        return Finding(check="proof.jaccl", severity="info", what=f"JACCL available on this machine ({where})")
    return Finding(check="proof.jaccl", severity="info",
                   what=f"JACCL unavailable on this machine ({where}): mx.distributed.is_available('jaccl') is "
                        f"{res.get('available')}; init(backend='jaccl', strict=True) -> {res.get('init')}",
                   why="JACCL is RDMA over Thunderbolt 5 on macOS 26.2+; MLX builds for Linux carry a stub",
                   fix="JACCL routes can only be proven on the Macs; ring proves the same sharding here")


def prove(report: ProbeReport, facts: StaticFacts, *, ranks: tuple[int, ...] = (2,), workdir: Path | None = None,
          progress: Progress = lambda _: None, timeout: float = 300.0) -> None:
    """Miniature smoke + distributed equivalence on real ranks; findings and route marks in place."""
    from . import miniature

    mtype = report.model_type
    report.findings.append(jaccl_local())
    if mtype not in miniature.ARCHITECTURES:
        report.add("proof.miniature", "warning", f"no miniature for {mtype}: nothing can be proven locally",
                   fix=f"miniatures exist for {', '.join(miniature.ARCHITECTURES)}")
        _proof_open(report, "no local proof for this architecture")
        return
    with tempfile.TemporaryDirectory(prefix="probe-mini-", dir=workdir) as tmp:
        _prove_in(report, Path(tmp) / mtype, facts.info.config, ranks, progress, timeout)


def _prove_in(report: ProbeReport, folder: Path, cfg: dict, ranks: tuple[int, ...], progress: Progress,
              timeout: float) -> None:
    from . import miniature

    mtype = report.model_type
    quant = miniature.quantization_like(cfg)
    progress(f"building a miniature {mtype} and generating")
    t = time.time()
    smoke = _run_smoke(mtype, folder, cfg, quant, timeout)
    report.timings["miniature"] = round(time.time() - t, 3)
    if "error" in smoke:
        report.add("proof.miniature", "error", f"miniature {mtype} failed on this machine's MLX: {smoke['error']}",
                   fix="see the error; the same code runs on the nodes")
        for r in report.routes:
            if r.engine == "mlx":
                r.block("proof.miniature", "the architecture does not run on this machine's mlx-lm")
        return
    report.add("proof.miniature", "info", f"miniature {mtype} ({'quantized ' + str(quant['bits']) + '-bit' if quant else 'float32'}, "
               f"pattern {_mini_pattern(folder)}): forward pass finite={smoke['finite']}, greedy ids {smoke['ids']}")
    _prove_sharding(report, folder, ranks, progress, timeout)


def _mini_pattern(folder: Path) -> str:
    try:
        cfg = safeio.read_json(folder / "config.json")
    except (OSError, ValueError):
        return "?"
    if not isinstance(cfg, dict):
        return "?"
    return modelfiles.layer_pattern(cfg) or "?"


def _run_smoke(mtype: str, folder: Path, cfg: dict, quant: dict | None, timeout: float) -> dict:
    like = {k: v for k, v in cfg.items() if k in ("hybrid_override_pattern", "quantization")}
    # Only non-empty parts: an empty entry would put the working directory on the child's import path.
    parts = [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in parts if p)}
    try:
        out = subprocess.run([sys.executable, "-c", _SMOKE, mtype, str(folder), json.dumps(like), json.dumps(quant)],
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {out.returncode}: {tail}"}
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"unreadable output: {out.stdout[-200:]}"}


def _proof_open(report: ProbeReport, why: str) -> None:
    for r in report.routes:
        if r.engine == "mlx" and r.sharding != "single" and r.verdict != "blocked":
            r.note("proof", why, severity="warning")


def _equivalence():
    try:
        from .parallel import equivalence
    except ImportError:
        return None
    return equivalence


def _prove_sharding(report: ProbeReport, folder: Path, ranks: tuple[int, ...], progress: Progress,
                    timeout: float) -> None:
    reg, eq = _registry(), _equivalence()
    mtype = report.model_type
    if reg is None or eq is None:
        report.add("proof.equivalence", "warning", "the sharding registry is not installed: no distributed proof")
        return
    support = reg.supported(mtype)
    for mode in ("pipeline", "tensor"):
        if not support.get(mode):
            report.add("proof.equivalence", "info", f"{mode}: unsupported for {mtype} (no split exists in mlx-lm "
                       f"{mlx_lm_version()} or this project): nothing to prove")
            continue
        for n in ranks:
            progress(f"proving {mode} on {n} ring ranks")
            t = time.time()
            try:
                res = eq.check(folder, mode, n, backend="ring", timeout=timeout)
            except Exception as e:  # noqa: BLE001 - a proof that crashes is a finding, not a probe crash
                res = None
                err = f"{type(e).__name__}: {e}"
            report.timings[f"equivalence.{mode}.{n}"] = round(time.time() - t, 3)
            _record_equivalence(report, mode, n, res, None if res is not None else err)


def _record_equivalence(report: ProbeReport, mode: str, n: int, res, err: str | None) -> None:
    if res is not None and getattr(res, "unsupported", None):
        report.add("proof.equivalence", "info", f"{mode} on {n} ranks: unsupported ({res.unsupported})")
        return
    if res is not None and res.ok:
        diff = getattr(res, "max_abs_logit_diff", None)
        report.add("proof.equivalence", "info", f"{mode} on {n} ring ranks: greedy ids equal the single process "
                   f"{list(res.single_ids)}" + (f", max |logit diff| {diff:.2e}" if diff is not None else ""))
        for r in report.routes:
            if r.engine == "mlx" and r.sharding == mode and r.backend == "ring" and r.nodes == n:
                r.proven = True
        return
    detail = err or getattr(res, "error", None) or (f"single {getattr(res, 'single_ids', '?')} != distributed "
                                                   f"{getattr(res, 'dist_ids', '?')}")
    report.add("proof.equivalence", "error", f"{mode} on {n} ring ranks does not reproduce the single process: {detail}",
               why="a split that changes the output is wrong at any node count", fix=f"do not use {mode} for this model")
    for r in report.routes:
        if r.engine == "mlx" and r.sharding == mode:
            r.block("proof.equivalence", f"{mode} split failed its equivalence proof on {n} ranks")


# --- the entry point --------------------------------------------------------------------------------------


def locate(model: str) -> tuple[str, Path | None]:
    """(repo id or name, folder or None): modelname.resolve, the resolver every command uses."""
    from . import modelname

    try:
        return modelname.resolve(model)
    except modelname.NotAFolder as e:
        raise ProbeError(str(e)) from None


def check_counts(nodes: int | None, ranks: tuple[int, ...]) -> None:
    """Refuse counts that mean nothing (a proof on fewer than 2 ranks proves no split) or that would hang."""
    if nodes is not None and not 1 <= nodes <= MAX_PROBE_NODES:
        raise ProbeError(f"--nodes {nodes}: give 1 to {MAX_PROBE_NODES} (the cap on node counts to probe; "
                         "--route ENGINE/SHARDING/BACKEND/N asks for one larger count)")
    bad = [n for n in ranks if not 2 <= n <= MAX_PROOF_RANKS]
    if bad:
        raise ProbeError(f"--ranks {bad[0]}: the equivalence proof splits a model over 2 to {MAX_PROOF_RANKS} "
                         "ranks on this machine (fewer than 2 splits nothing)")


def run(
    model: str | Path,
    *,
    exo_url: str | None = None,
    exo=None,
    nodes: int | None = None,
    cluster: ClusterEntry | None = None,
    context: int | None = None,
    route: RouteSpec | str | None = None,
    static_only: bool = False,
    prove_ranks: tuple[int, ...] = (2,),
    trust_remote_code: bool = False,
    entry: ModelEntry | None = None,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> ProbeReport:
    """Probe `model` (a folder or a repo id) for every route; see the module docstring.

    nodes: probe node counts 2..nodes (default 2, 3, 4, or the cluster's size); cluster: the models.toml
    cluster (node memory, RDMA devices); exo_url: ask a running exo (cluster.discover); exo: an exo cluster
    already discovered (cluster.ClusterInfo); entry: the catalogue's figures, used
    when the model is not on disk; static_only: skip the local proof (miniature + equivalence on real ranks).
    """
    progress = progress or (lambda _: None)
    t0 = time.time()
    check_counts(nodes, prove_ranks)
    spec = RouteSpec.parse(route) if isinstance(route, str) else route
    name, folder = locate(str(model))
    report = ProbeReport(model=name, path=folder, asked=str(spec) if spec else None)
    facts = None
    if folder is not None:
        progress(f"reading {folder}")
        facts, report.static_cached = static_facts(folder, repo_id=name, trust_remote_code=trust_remote_code,
                                                   use_cache=use_cache)
        report.findings += facts.findings
        info = facts.info
        report.model_type, report.layer_pattern, report.layer_counts = info.model_type, info.layer_pattern, \
            info.layer_counts
        pattern = info.layer_pattern or ""
        report.caches = {"kv": pattern.count("*") if "M" in pattern or "E" in pattern else len(pattern),
                         "mamba": pattern.count("M")}
    elif entry is not None:
        report.model_type = entry.architecture
        report.add("files", "warning", f"{name} is not on disk: planning from the catalogue's figures only",
                   fix="download or link it, then probe again for the full checks")
    else:
        raise ProbeError(f"{name}: no such folder, and no LM Studio / Hugging Face / exo model by that name; "
                         "run `arthur-cluster models` to list what exists")
    ctx_max = (facts.info.context_length if facts else None) or (entry.context_length if entry else None)
    report.context = context or min(DEFAULT_CONTEXT, ctx_max or DEFAULT_CONTEXT)
    if ctx_max and report.context > ctx_max:
        report.add("context", "warning", f"context {report.context} exceeds the model's {ctx_max} tokens")
    known = cluster_nodes(cluster)
    report.timings["static"] = round(time.time() - t0, 3)

    # exo first when asked: its nodes' memory feeds the plans, its previews judge the exo routes.
    conn = exo if exo is not None else exo_connect(report, exo_url, progress) if exo_url else None
    report.exo_url = conn.endpoint if conn is not None else exo_url
    apple = bool(cluster and cluster.nodes)
    if conn is not None and not known:
        known = exo_nodes(conn)
        apple = conn.apple
    counts = node_counts(nodes, known, spec)
    report.routes = make_routes(counts)
    report.nodes, report.node_counts = known, counts
    # Fused attention on Apple-silicon nodes (Metal's SDPA kernel); materialised scores elsewhere. With no
    # cluster known, the nodes are taken to be like this machine.
    report.attention = "fused" if apple or (not known and memory.machine_is_apple()) else "materialized"
    _static_pass(report, facts, entry, counts, known)
    if exo_url and conn is None:
        for r in report.routes:
            if r.engine == "exo":
                r.open_questions.append("exo unreachable")
    if conn is not None:
        t = time.time()
        blocked = {r.route: [f for f in r.findings if f.severity == "error"
                             and f.check.startswith(("tensor", "pipeline"))] for r in report.routes}
        candidates = list(dict.fromkeys([name] + ([entry.exo_id] if entry and entry.exo_id else [])))
        live_exo(report, conn, candidates, blocked, progress)
        report.timings["exo"] = round(time.time() - t, 3)

    if not static_only and facts is not None and not facts.broken:
        t = time.time()
        prove(report, facts, ranks=prove_ranks, progress=progress)
        report.proved = True
        report.timings["proof"] = round(time.time() - t, 3)
    for r in report.routes:
        r.decide()
    _answer(report, spec)
    report.timings["total"] = round(time.time() - t0, 3)
    return report


def _static_pass(report: ProbeReport, facts: StaticFacts | None, entry: ModelEntry | None, counts: list[int],
                 known: list[NodeMemory]) -> None:
    plan_memory(report, facts, entry, counts, known, report.attention)
    evaluate_static(report, facts, entry, known)
    reg = _registry()
    cfg = facts.info.config if facts else None
    for n in counts if reg and cfg else []:
        why = _tensor_blockers(reg, cfg, n)
        if why:
            report.add("tensor.divisibility", "warning", f"tensor split over {n} nodes is impossible: {'; '.join(why)}",
                       fix="pipeline sharding, or a node count that divides them")
        else:
            report.add("tensor.divisibility", "info", f"tensor split over {n} nodes: every sharded quantity divides")


def _answer(report: ProbeReport, spec: RouteSpec | None) -> None:
    matches = [r for r in report.routes if spec is None or spec.matches(r)]
    if not matches:
        report.verdict = "blocked"
        report.add("route", "error", f"no route matches {spec}", fix="see the routes the probe lists")
        return
    for verdict in ("ok", "unknown", "blocked"):
        hit = next((r for r in matches if r.verdict == verdict), None)
        if hit:
            report.route, report.verdict = hit, verdict
            return


def exit_code(report: ProbeReport) -> int:
    from .commands._out import EXIT_BLOCKED, EXIT_OK, EXIT_UNKNOWN

    return {"ok": EXIT_OK, "blocked": EXIT_BLOCKED}.get(report.verdict, EXIT_UNKNOWN)
