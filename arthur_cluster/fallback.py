"""The picker: which model, on which route, and why every other one was turned down.

Candidates come from models.toml: the target first, then the fallbacks in order. For each one, on each
cluster (exo first when reachable, then MLX on the [cluster] section or this machine), routes are tried in
ROUTE_ORDER. A route passes when the model is available where the engine loads it, its memory plan fits
every node at the job's context, and the checks do not block it. The first that passes is the Choice;
everything before it is a Rejection with its reason. Same inputs, same answer: no clocks, no randomness,
every list in a fixed order.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Literal

from pydantic import BaseModel, Field

from . import memory, modelfiles, paths, sources
from .catalog import Catalog, ModelEntry
from .cluster import ClusterInfo, ClusterNode
from .errors import ArthurError
from .modelfiles import ModelInfo
from .types import DEFAULT_CONTEXT, Backend, Engine, Route, Sharding, Status  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from .probe import RouteSpec

# Preference, best first. Tensor parallelism over RDMA (JACCL) splits every layer with microsecond links: the
# fastest, but crash-prone on today's macOS, so it is taken only when the checks prove it ("ok"), never on
# "unknown". Pipeline over the TCP ring needs nothing special and only hands one hidden state per token between
# stages. One node is the last resort: it must hold the whole model.
ROUTE_ORDER: tuple[tuple[Sharding, Backend | None], ...] = (("tensor", "jaccl"), ("pipeline", "ring"), ("single", None))
# Taken only when asked for (`--route`): tensor over the TCP ring crosses the link twice per layer and token, so
# it loses to the pipeline unless the user knows better; pipeline over RDMA gains little over the ring.
ASKED_ONLY: tuple[tuple[Sharding, Backend | None], ...] = (("tensor", "ring"), ("pipeline", "jaccl"))


class Verdict(BaseModel):
    status: Status
    reasons: list[str] = Field(default_factory=list)

    def __str__(self) -> str:
        return self.status + (": " + "; ".join(self.reasons) if self.reasons else "")


class Availability(BaseModel):
    """Where the engine gets the weights, and under which id it serves them."""

    source: str  # lmstudio | hf-cache | exo | path | exo-download | hf-download
    served_id: str  # the id the engine is asked for (exo: its card's model_id)
    path: Path | None = None  # a local folder, when there is one
    needs_link: bool = False  # exo: the folder must be linked into exo's read-only dir (and get a custom card)
    note: str = ""


class Rejection(BaseModel):
    model: str
    route: Route | None = None  # None: the model as a whole
    stage: Literal["catalog", "available", "memory", "checks", "bringup"]
    reason: str

    def __str__(self) -> str:
        where = f" ({self.route.label})" if self.route else ""
        return f"{self.model}{where}: {self.reason}"


class Choice(BaseModel):
    model: str
    route: Route
    available: Availability
    verdict: Verdict
    plan: memory.MemoryPlan | None = None
    nodes: list[str] = Field(default_factory=list)  # the nodes the plan charges (exo may pick others)
    cluster: ClusterInfo
    context: int
    why: str
    rejections: list[Rejection] = Field(default_factory=list)

    def fallback_reason(self, target: str) -> str | None:
        return fallback_reason(target, self.model, self.rejections)


def fallback_reason(target: str, chosen: str, rejections: list[Rejection]) -> str | None:
    """Why the target is not what runs, or why its preferred routes failed; None when neither happened.

    The decisive reasons come first: what stopped the model as a whole (not available, context, a failed
    bring-up). Routes merely passed over are listed only when nothing decisive exists.
    """
    mine = [r for r in rejections if r.model == target]
    if chosen == target:
        failed = [str(r) for r in mine if r.stage == "bringup"]
        return ("preferred routes failed: " + "; ".join(failed)) if failed else None
    decisive = [r for r in mine if r.route is None or r.stage in ("bringup", "available", "catalog")]
    return f"{target} could not run: " + ("; ".join(str(r) for r in decisive or mine) or "it was not tried")


class NoChoice(ArthurError, RuntimeError):
    """No candidate passes; `rejections` holds every reason in the order tried."""

    def __init__(self, rejections: list[Rejection], on_disk: list[str] | None = None):
        self.rejections = rejections
        self.on_disk = on_disk or []
        lines = "\n  ".join(str(r) for r in rejections) or "no candidates"
        hint = ""
        if self.on_disk:  # the cause is the catalogue, not the downloads: say what could run instead
            shown = ", ".join(self.on_disk[:5]) + (f" (+{len(self.on_disk) - 5} more)" if len(self.on_disk) > 5 else "")
            hint = (f"\non disk but not in the catalogue: {shown}; name one (`arthur-cluster up "
                    f"{self.on_disk[0]}`) or add it to models.toml's fallbacks")
        super().__init__(f"no model of the catalogue can run here:\n  {lines}{hint}")


ProbeFn = Callable[[str, "ModelInfo | None", Route, ClusterInfo, int], Verdict]


# --- availability -----------------------------------------------------------------------------------------


def _local_folder(ids: list[str], found: list[sources.Found]) -> tuple[sources.Found, ModelInfo] | str | None:
    """The first usable MLX folder for any of the ids (discovery order), or the reason the ones seen fail."""
    problems = []
    for rid in ids:
        for f in (x for x in found if x.repo_id == rid):
            info = modelfiles.inspect(f.path, repo_id=rid, source=f.source)
            if info.ok and info.format == "mlx":
                return f, info
            why = "; ".join(str(p) for p in info.errors) or f"{info.format.upper()} weights, not MLX"
            problems.append(f"{f.path}: {why}")
    return "; ".join(problems) if problems else None


def availability(model: str, entry: ModelEntry, cluster: ClusterInfo, found: list[sources.Found],
                 allow_download: bool) -> tuple[Availability, ModelInfo | None] | str:
    """Where `cluster`'s engine gets `model`, or the reason it cannot."""
    ids = [model] + ([entry.exo_id] if entry.exo_id and entry.exo_id != model else [])
    local = _local_folder(ids, found)
    if isinstance(local, tuple):
        f, info = local
        if cluster.engine == "exo":
            # exo finds only <org>--<name> folders in its own dirs; anything else is linked (zero-copy) first.
            return Availability(source=f.source, served_id=f.repo_id, path=f.path,
                                needs_link=f.source != "exo"), info
        return Availability(source=f.source, served_id=f.repo_id, path=f.path), info
    broken = f" (found but unusable: {local})" if isinstance(local, str) else ""
    if cluster.engine == "exo":
        for rid in ids:
            if rid in cluster.exo_downloaded:
                return Availability(source="exo", served_id=rid, note=f"exo reports {rid} downloaded"), None
        for rid in ids:
            if rid in cluster.exo_models and allow_download:
                return Availability(source="exo-download", served_id=rid,
                                    note=f"exo downloads {rid} on every node it places on"), None
        known = [rid for rid in ids if rid in cluster.exo_models]
        hint = (f"exo has a card for {known[0]}: pass --allow-download to let exo fetch it" if known
                else "put it in LM Studio or the Hugging Face cache, or give exo a card and the weights")
        return f"not on this machine's disk and not downloaded by exo{broken}; {hint}"
    if allow_download and not paths.hf_offline():
        return Availability(source="hf-download", served_id=model, note="fetched from Hugging Face"), None
    why = "HF_HUB_OFFLINE is set" if paths.hf_offline() else "pass --allow-download to fetch it from Hugging Face"
    return (f"not on disk (LM Studio {paths.lmstudio_models()}, HF cache {paths.hf_cache()}, exo dirs){broken}; "
            f"{why}")


# --- routes and checks -------------------------------------------------------------------------------------


def routes_for(cluster: ClusterInfo, spec: RouteSpec | None = None) -> list[Route]:
    """Every route of ROUTE_ORDER this cluster could take, in that order. With `spec` (`--route`): only the
    routes matching it, ROUTE_ORDER's first, then ASKED_ONLY's, on the node count it names (at most the
    cluster's)."""
    if spec is None:
        return _routes(cluster, ROUTE_ORDER, len(cluster.nodes))
    n = spec.nodes if spec.nodes and 2 <= spec.nodes <= len(cluster.nodes) else len(cluster.nodes)
    return [r for r in _routes(cluster, ROUTE_ORDER + ASKED_ONLY, n) if spec.matches(r)]


def _routes(cluster: ClusterInfo, order: tuple[tuple[Sharding, Backend | None], ...], n: int) -> list[Route]:
    out = []
    for sharding, backend in order:
        if sharding == "single":
            out.append(Route.single(cluster.engine))
        elif n >= 2:
            if cluster.engine == "mlx" and cluster.backend == "nccl":
                backend = "nccl"  # GPUs: NCCL stands where RDMA and TCP would
            out.append(Route(engine=cluster.engine, sharding=sharding, backend=backend, nodes=n))
    return list(dict.fromkeys(out))


def route_nodes(cluster: ClusterInfo, route: Route) -> list[ClusterNode]:
    """The nodes a route fills: models.toml's own order (rank order for mlx.launch), else the largest memory
    budgets first, as exo's placement does."""
    nodes = cluster.nodes if cluster.source == "catalog" else cluster.largest_first()
    return nodes[: route.nodes]


def plan_route(model: str, info: ModelInfo | None, entry: ModelEntry, cluster: ClusterInfo, route: Route,
               context: int) -> memory.MemoryPlan:
    nodes = [n.memory() for n in route_nodes(cluster, route)]
    source = info if info is not None else entry
    return memory.fit(source, context=context, nodes=nodes, split=route.split, name=model, apple=cluster.apple)


def probe_checks(cat: Catalog, *, prove: bool = False) -> ProbeFn:
    """The probe's per-route verdicts (static and live exo checks; the local proof only with prove=True),
    one probe run per model and cluster.

    exo's "no card" is not held against a model whose card bring-up registers (a folder linked at bring-up):
    before that, no exo can know it.
    """
    from . import probe

    reports: dict[tuple, object] = {}

    def run(model: str, info: ModelInfo | None, cluster: ClusterInfo, context: int) -> object:
        key = (model, cluster.endpoint or cluster.source, context)
        if key not in reports:
            try:
                reports[key] = probe.run(model if info is None else info.path, exo=cluster if cluster.engine == "exo"
                                         else None,
                                         nodes=len(cluster.nodes) if len(cluster.nodes) > 1 else None,
                                         cluster=cat.cluster if cluster.source == "catalog" else None,
                                         context=context, static_only=not prove, entry=cat.entry(model))
            except probe.ProbeError as exc:
                reports[key] = exc
        return reports[key]

    def verdict(model: str, info: ModelInfo | None, route: Route, cluster: ClusterInfo, context: int) -> Verdict:
        if route.backend == "jaccl" and not cluster.rdma_ready:
            off = [n.display for n in cluster.nodes if not n.rdma] or [n.display for n in cluster.nodes]
            return Verdict(status="blocked", reasons=[f"RDMA is not enabled on {', '.join(off)} (exo: `rdma_ctl "
                                                      "enable` from macOS Recovery; MLX: backend jaccl with rdma "
                                                      "devices in models.toml)"])
        report = run(model, info, cluster, context)
        if isinstance(report, Exception):
            return Verdict(status="unknown", reasons=[f"probe failed: {report}"])
        found = report.check(route)
        if found is None:
            return Verdict(status="unknown", reasons=["the probe has no verdict for this route"])
        errors = [f for f in found.findings if f.severity == "error"]
        exo_id = cat.entry(model).exo_id  # exo's built-in card for these weights, when models.toml names it
        uncarded = route.engine == "exo" and info is not None and model not in cluster.exo_models \
            and exo_id not in cluster.exo_models
        if uncarded:
            errors = [f for f in errors if f.check != "exo.card"]
        # Memory is judged by the pick itself, at the job's context (the probe plans at its own default).
        errors = [f for f in errors if f.check != "memory"]
        reasons = [f.what for f in errors] + list(found.open_questions)
        if uncarded:
            reasons.append("exo gets the card at bring-up; placement decides")
        status: Status = "blocked" if errors else ("unknown" if reasons else "ok")
        return Verdict(status=status, reasons=reasons)

    return verdict


# --- the pick -------------------------------------------------------------------------------------------------


_fit_text = memory.fit_text  # one wording of the verdict for probe, pick, up and doc


def _excluded(model: str, route: Route | None, prior: list[Rejection]) -> Rejection | None:
    for r in prior:
        if r.stage == "bringup" and r.model == model and (r.route is None or r.route == route):
            return r
    return None


def candidates(cat: Catalog, model: str | None = None, fallbacks: list[str] | None = None) -> list[str]:
    """The models to try: `model` (or the target), then the fallbacks (given, else the catalogue's)."""
    first = model or cat.target
    rest = cat.fallbacks if fallbacks is None else fallbacks
    return list(dict.fromkeys([first, *rest]))


def pick(cat: Catalog, *, cluster: ClusterInfo | list[ClusterInfo], context: int | None = None,
         allow_download: bool = False, probe_fn: ProbeFn | None = None, model: str | None = None,
         fallbacks: list[str] | None = None, found: list[sources.Found] | None = None,
         prior: Iterable[Rejection] = (), route: RouteSpec | None = None) -> Choice:
    """The first (model, route) that passes; raises NoChoice with every rejection when none does.

    context: the tokens the job needs; None means a chat-sized DEFAULT_CONTEXT, capped at each model's own
    length. prior: rejections from earlier attempts (bring-up failures); a "bringup" one excludes its model
    (route None) or just its route, and all of them are carried into the result so the story stays complete.
    route: `--route`'s spec; only the routes matching it are tried (ASKED_ONLY's as well), on clusters of its
    engine.
    """
    clusters = cluster if isinstance(cluster, list) else [cluster]
    if route is not None and route.engine is not None:
        kept = [c for c in clusters if c.engine == route.engine]
        if not kept:
            found_here = ", ".join(c.engine for c in clusters) or "none"
            raise NoChoice([Rejection(model=candidates(cat, model, fallbacks)[0], stage="checks",
                                      reason=f"--route {route}: no {route.engine} cluster here (found: {found_here})")])
        clusters = kept
    rejections: list[Rejection] = list(prior)
    found = sources.discover() if found is None else found
    probe_fn = probe_fn or probe_checks(cat)
    for mid in candidates(cat, model, fallbacks):
        entry = cat.entry(mid)
        if _excluded(mid, None, rejections):
            continue
        for cl in clusters:
            where = availability(mid, entry, cl, found, allow_download)
            if isinstance(where, str):
                rejections.append(Rejection(model=mid, stage="available", reason=f"{cl.engine}: {where}"))
                continue
            avail, info = where
            longest = (info.context_length if info is not None else None) or entry.context_length
            if context is not None and longest and context > longest:
                rejections.append(Rejection(model=mid, stage="catalog",
                                            reason=f"context {context} exceeds the model's {longest} tokens"))
                break
            ctx = context or min(DEFAULT_CONTEXT, longest or DEFAULT_CONTEXT)
            choice = _try_routes(mid, entry, info, avail, cl, ctx, probe_fn, rejections, route)
            if choice is not None:
                return choice
    absent = all(r.stage == "available" for r in rejections)
    tried = set(candidates(cat, model, fallbacks))
    others = dict.fromkeys(f.repo_id for f in found if f.repo_id not in tried and _runnable(f)) if absent else {}
    raise NoChoice(rejections, list(others))


def _any_route() -> RouteSpec:
    from .probe import RouteSpec

    return RouteSpec()


def _runnable(f: sources.Found) -> bool:
    info = modelfiles.inspect(f.path, repo_id=f.repo_id, source=f.source)
    return info.ok and info.format == "mlx"


def _try_routes(mid: str, entry: ModelEntry, info: ModelInfo | None, avail: Availability, cl: ClusterInfo,
                context: int, probe_fn: ProbeFn, rejections: list[Rejection],
                spec: RouteSpec | None = None) -> Choice | None:
    routes = routes_for(cl, spec)
    if not routes:
        could = ", ".join(r.key for r in routes_for(cl, _any_route())) or "none"
        rejections.append(Rejection(model=mid, stage="checks", reason=f"{cl.engine}: no route of this cluster "
                                    f"({len(cl.nodes)} node(s)) matches --route {spec}; it could take: {could}"))
        return None
    for route in routes:
        if _excluded(mid, route, rejections):
            continue
        try:
            plan = plan_route(mid, info, entry, cl, route, context)
        except memory.PlanError as exc:
            plan, fit_note = None, f"memory not planned ({exc})"
        else:
            if plan.fits is False:
                rejections.append(Rejection(model=mid, route=route, stage="memory",
                                            reason=f"does not fit at context {context}: {_fit_text(plan)}"))
                continue
            fit_note = _fit_text(plan)
        verdict = probe_fn(mid, info, route, cl, context)
        if verdict.status == "blocked" or (verdict.status != "ok" and route.backend == "jaccl"):
            reason = str(verdict) if verdict.status == "blocked" else f"not proven ({verdict})"
            rejections.append(Rejection(model=mid, route=route, stage="checks", reason=reason))
            continue
        nodes = [n.name for n in route_nodes(cl, route)]
        where = f"{avail.source}" + (f" ({avail.path})" if avail.path else "") + (f"; {avail.note}" if avail.note else "")
        why = f"{mid} from {where}; {route.label}: checks {verdict}; {fit_note}"
        skipped = [r for r in rejections if r.model == mid]
        if skipped:
            why += f"; after {len(skipped)} rejection(s) of this model"
        return Choice(model=mid, route=route, available=avail, verdict=verdict, plan=plan, nodes=nodes,
                      cluster=cl, context=context, why=why, rejections=list(rejections))
    return None
