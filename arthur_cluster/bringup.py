"""Bring a model up, or its fallback, and leave a record of what runs where.

`up` walks the path a user walks by hand: find the cluster (exo, else MLX on models.toml's [cluster] or this
machine), pick a model and route (fallback.pick), make the weights visible (link locally; other nodes get the
exact command, or it runs over ssh when models.toml names a host), register exo's custom card, place or load,
wait with progress (bounded), and ask a short question. Any failure is recorded with its reason and the next
candidate is tried. The Deployment record (paths.deployment_file()) is what `doc` and `down` read.

MLX across nodes (or on one node with serve=True) starts ranks that stay up (parallel/resident.py): rank 0 serves
OpenAI chat completions, the record's `resident` says where and which processes; `down` stops them, and
`doctor`/`up` say when a recorded one is gone or has failed. One node without serve stays in-process, as before.
"""

from __future__ import annotations

import json
import shlex
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, Field, ValidationError

from . import fallback, paths
from .catalog import Catalog
from .cluster import ClusterError, ClusterInfo, Discovery, discover
from .engines.base import ChatResult, Engine, EngineError, collect
from .errors import ArthurError
from .fallback import Choice, NoChoice, Rejection
from .hostfile import HostfileError, NodeError, node_program, run_on
from .types import DEFAULT_CONTEXT, Route
from .parallel import resident
from .parallel.resident import Resident, ResidentError

SMOKE_PROMPT = "What is 2+2?"
SMOKE_MAX_TOKENS = 50
DEFAULT_TIMEOUT = 600.0  # seconds for one placement to become ready (a 31 GB load from disk fits in it)
REMOTE_TIMEOUT = 30.0  # seconds for one command on a node over ssh (a missing program or model shows in it)


class BringUpError(ArthurError, RuntimeError):
    """Nothing came up; the message lists every candidate tried and why it failed."""

    def __init__(self, message: str, rejections: list[Rejection] | None = None):
        super().__init__(message)
        self.rejections = rejections or []


class DeploymentError(ArthurError, RuntimeError):
    """The deployment record is missing, unreadable, or names something that is gone."""


class AttemptFailed(ArthurError, RuntimeError):
    """One (model, route) could not be brought up. scope: "model" excludes the model, "route" only the route."""

    def __init__(self, reason: str, scope: Literal["model", "route"] = "route"):
        super().__init__(reason)
        self.scope = scope


class Smoke(BaseModel):
    question: str
    answer: str
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    finish_reason: str | None = None


class Deployment(BaseModel):
    model: str  # the catalogue's id
    served_id: str  # the id the engine answers to (exo: its card's model_id)
    engine: Literal["exo", "mlx"]
    route: Route
    nodes: list[str] = Field(default_factory=list)
    endpoint: str | None = None  # exo's API, or the resident MLX ranks' (rank 0's /v1); None for MLX in-process
    instance_id: str | None = None
    model_path: Path | None = None
    hosts: list[dict] = Field(default_factory=list)  # MLX across nodes, in rank order: ssh name, ips, program, folder
    resident: Resident | None = None  # MLX ranks that stay up: where rank 0 listens, their pids, logs
    context: int = DEFAULT_CONTEXT
    fallback_reason: str | None = None
    rejections: list[Rejection] = Field(default_factory=list)
    smoke: Smoke
    notes: list[str] = Field(default_factory=list)
    created_at: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.smoke.generation_tps


class DownResult(BaseModel):
    had_deployment: bool
    model: str | None = None
    engine: str | None = None
    instance_id: str | None = None
    actions: list[str] = Field(default_factory=list)


@dataclass
class Hooks:
    """Where `up` reports: one line per step, and progress of long waits (label, done, total)."""

    say: Callable[[str], None] = field(default=lambda text: None)
    progress: Callable[[str, int, int], None] = field(default=lambda label, done, total: None)


# --- the record -------------------------------------------------------------------------------------------


def write_record(dep: Deployment, path: Path | None = None) -> Path:
    path = path or paths.deployment_file()
    paths.private_dir(path.parent)  # the record holds the ranks' shutdown token
    paths.write_atomic(path, dep.model_dump_json(indent=2) + "\n", mode=0o600)
    return path


def read_record(path: Path | None = None) -> Deployment | None:
    path = path or paths.deployment_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DeploymentError(f"{path}: cannot read the deployment record ({exc.strerror})") from None
    try:
        return Deployment.model_validate_json(text)
    except ValidationError as exc:
        raise DeploymentError(f"{path}: not a deployment record ({exc.errors()[0]['msg']}); delete it and run "
                              "`arthur-cluster up` again") from None


# --- engines ---------------------------------------------------------------------------------------------------


def mlx_hosts(cluster: ClusterInfo, route: Route) -> list[dict]:
    """The hosts of a route's ranks, in rank order, from models.toml's [cluster] nodes; [] when every node is
    this machine (its ranks then run here over loopback, without ssh)."""
    # This machine first: rank 0 reads the request and streams the tokens back.
    nodes = sorted(fallback.route_nodes(cluster, route), key=lambda n: not n.local)
    if all(n.local for n in nodes):
        return []
    if route.backend == "ring":
        no_ip = [n.name for n in nodes if not n.ips]
        if no_ip:
            raise AttemptFailed(f"the ring backend needs each node's IP address: add ips to {', '.join(no_ip)} "
                                "in models.toml [[cluster.nodes]]")
    try:
        return [{"ssh": n.ssh or n.name, "name": n.name, "ips": list(n.ips),
                 "rdma": [d or None for d in n.rdma_devices], "local": n.local,
                 "program": [] if n.local else node_program(n.program, n.name)} for n in nodes]
    except HostfileError as exc:
        raise AttemptFailed(str(exc)) from None


def open_mlx(path: Path, model_id: str, timeout: float = 3600.0) -> Engine:
    """The MLX engine of a one-node route in this process (several nodes run as resident ranks: start_resident).
    Raises EngineError (the engine's own message) when it cannot start."""
    from .engines.mlx import MlxEngine

    return MlxEngine(path, model_id=model_id, timeout=timeout)


def engine_for(dep: Deployment) -> Engine:
    """An engine speaking to what a deployment record describes (what `doc` runs its jobs on)."""
    if dep.engine == "exo":
        from .engines.exo import ExoEngine
        from .exo_client import ExoClient

        return ExoEngine(ExoClient(dep.endpoint), dep.served_id)
    if dep.resident is not None:
        from .engines.mlx import MlxEngine

        if (why := resident.problem(dep.resident)) is not None:
            raise DeploymentError(f"{paths.deployment_file()}: {why}")
        return MlxEngine(dep.served_id, endpoint=dep.resident.url)
    if dep.model_path is None:
        raise DeploymentError(f"{paths.deployment_file()}: an MLX deployment without model_path; run `up` again")
    if dep.route.nodes > 1:
        raise DeploymentError(f"{paths.deployment_file()}: an MLX deployment across nodes without resident ranks "
                              "(an older record); run `up` again")
    return open_mlx(dep.model_path, dep.served_id)


def start_resident(path: Path, model_id: str, route: Route, hosts: list[dict] | None = None, *,
                   bind: str | None = None, timeout: float = DEFAULT_TIMEOUT, hooks: Hooks | None = None,
                   n: int | None = None, prefill_step: int = 2048, cache_block: int | None = None,
                   cache_window: int | None = None) -> Resident:
    """Ranks that stay up for a route: one per host of `hosts` (over ssh where not this machine), else `n`
    (default: the route's node count) ranks on this machine over loopback. Raises AttemptFailed with the ranks'
    own reason."""
    from .hostfile import hosts_from

    hooks = hooks or Hooks()
    count = len(hosts) if hosts else (n or route.nodes)  # no hosts: every rank on this machine
    mode = route.sharding if count > 1 else "single"
    try:
        extra = [*(["--block", str(cache_block)] if cache_block else []),
                 *(["--window", str(cache_window)] if cache_window else [])]
        return resident.start(path, model_id, mode=mode, n=count, hosts=hosts_from(hosts) if hosts else None,
                              backend=route.backend or "ring", bind=bind, timeout=timeout, say=hooks.say,
                              prefill_step=prefill_step, extra=extra)
    except (ResidentError, ArthurError, OSError) as exc:
        raise AttemptFailed(f"the resident ranks did not come up: {exc}") from None


def smoke_test(engine: Engine, prompt: str = SMOKE_PROMPT, max_tokens: int = SMOKE_MAX_TOKENS) -> Smoke:
    """Ask one short question; a model that produces no token has not answered."""
    result: ChatResult = collect(engine.stream([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                               temperature=0.0))
    s = result.stats
    if not result.text and not s.generation_tokens:
        raise EngineError(f"{engine.model_id} answered nothing to {prompt!r} (finish reason {s.finish_reason})")
    return Smoke(question=prompt, answer=result.text, prompt_tokens=s.prompt_tokens,
                 generation_tokens=s.generation_tokens, prompt_tps=s.prompt_tps, generation_tps=s.generation_tps,
                 finish_reason=s.finish_reason)


# --- weights on every node ------------------------------------------------------------------------------------


def _link_locally(choice: Choice, hooks: Hooks, repo_id: str | None = None) -> list[str]:
    """Link the local folder for exo (and the HF cache), under `repo_id` when given; returns notes."""
    from . import linker, modelfiles

    repo_id = repo_id or choice.available.served_id
    info = modelfiles.inspect(choice.available.path, repo_id=repo_id, source=choice.available.source)
    try:
        res = linker.link(info, repo_id=repo_id)
    except (linker.LinkError, modelfiles.ModelFileError) as exc:
        # exo's routes only: MLX on this machine reads the folder itself
        raise AttemptFailed(f"cannot link {choice.available.path} for exo: {exc}") from None
    hooks.say(f"linked {res.repo_id} -> {res.exo_link}")
    notes = []
    if res.env_line:
        notes.append(f"exo on this machine must run with {res.env_line} to find the linked weights")
    return notes


def _remote_nodes(choice: Choice, cat: Catalog) -> list[tuple[str, str | None, str | None]]:
    """(node name, ssh host or None, its program setting) for each node of the route that is not this machine.
    MLX reaches every node over ssh (by its name when no ssh host is given); exo needs one named."""
    entries = {n.name: n for n in (cat.cluster.nodes if cat.cluster else [])}
    out = []
    for node in fallback.route_nodes(choice.cluster, choice.route):
        if node.local:
            continue
        entry = entries.get(node.name) or (entries.get(node.label) if node.label else None)
        host = node.ssh or (entry.ssh if entry else None)
        if choice.route.engine == "mlx":
            host = host or node.name
        out.append((node.display, host, node.program or (entry.program if entry else None)))
    return out


def check_node(name: str, host: str, program: list[str], setting: str | None) -> None:
    """The node answers over ssh and has arthur-cluster where models.toml (or this machine) says, within
    REMOTE_TIMEOUT; else AttemptFailed naming the node, the command, its own error and the fix."""
    try:
        run_on(name, host, [*program, "--version"], timeout=REMOTE_TIMEOUT)
    except NodeError as exc:
        if exc.missing:
            where = "its models.toml program" if setting else "the same path as on this machine"
            raise AttemptFailed(f"{exc}. arthur-cluster is not at {where} on node {name}: install it there and set "
                                f"program = \"/absolute/path/to/arthur-cluster\" for node {name} in models.toml "
                                "[[cluster.nodes]]") from None
        if not exc.ran:
            raise AttemptFailed(f"{exc}. Check that `ssh {host} true` works from this machine without a password "
                                "prompt (keys, BatchMode), or take the node out of models.toml [cluster]") from None
        raise AttemptFailed(str(exc)) from None


def _link_on(name: str, host: str, program: list[str], model: str, repo_id: str | None) -> str | None:
    """Run `link` on a node; the model's folder there (its HF snapshot, else its LM Studio folder)."""
    cmd = [*program, "link", model, *(["--repo-id", repo_id] if repo_id else []), "--json"]
    try:
        out = run_on(name, host, cmd, timeout=REMOTE_TIMEOUT)
    except NodeError as exc:
        raise AttemptFailed(f"{exc}. Put {model} in node {name}'s LM Studio folder (or its Hugging Face cache) "
                            "and run up again") from None
    try:
        first = (json.loads(out).get("results") or [{}])[0]
    except (ValueError, AttributeError):
        return None
    found = first.get("snapshot") or first.get("source") if isinstance(first, dict) else None
    return found if isinstance(found, str) else None


def weights_elsewhere(choice: Choice, cat: Catalog, hooks: Hooks, repo_id: str | None = None,
                      folders: dict[str, str] | None = None) -> list[str]:
    """Make the weights exist on the route's other nodes: check each node's arthur-cluster and run its link over
    ssh where a host is known, else say exactly what to run there. Every node loads from its own disk (exo and
    MLX alike); `folders` gets node name -> the model's folder on that node."""
    notes = []
    served = choice.available.served_id
    download = choice.available.source in ("exo-download", "hf-download")  # each node's engine fetches them
    if download and choice.route.engine == "exo":
        return notes  # exo's own nodes fetch and run it: nothing of ours runs there
    for name, host, setting in _remote_nodes(choice, cat):
        try:
            program = node_program(setting, name)
        except HostfileError as exc:
            raise AttemptFailed(str(exc)) from None
        if not host:
            if not download:
                cmd = shlex.join(["arthur-cluster", "link", served, *(["--repo-id", repo_id] if repo_id else [])])
                notes.append(f"on node {name}: the weights must be there too; run `{cmd}` on it (with the model "
                             f"in its LM Studio folder) and start its exo with the env line `link` prints")
            continue
        hooks.say(f"checking node {name} over ssh ({host}): {shlex.join(program)}")
        check_node(name, host, program, setting)
        if download:
            continue
        hooks.say(f"linking on {name} over ssh ({host})")
        folder = _link_on(name, host, program, served, repo_id)
        if folders is not None and folder:
            folders[name] = folder
        notes.append(f"on node {name}: linked over ssh ({host})" + (f": {folder}" if folder else ""))
    return notes


# --- exo --------------------------------------------------------------------------------------------------


def _register_card(client, served: str, hooks: Hooks, choice: Choice | None = None) -> None:
    """exo must know a card for the id: built-in, already known, or added now through POST /models/add (every
    exo version: main keeps it in its state on every node, v1.0.71 in a card file each node writes).

    exo builds that card from the model's folder in its model dirs (the linked entry, whose index carries
    metadata.total_size). Without that folder it asks Hugging Face, which offline fails (3 to 5 attempts);
    with it, it checks the files with Hugging Face when it can reach it: refused at once is quick, a Hugging
    Face that hangs costs exo 30 s per file, so the wait here is bounded (exo_client.ADD_TIMEOUT)."""
    from .exo_client import ADD_TIMEOUT, ExoError, ExoTimeout

    try:
        if served in {m.id for m in client.models()}:
            return
        hooks.say(f"registering {served} with exo (POST /models/add: exo builds its card from the linked folder)")
        client.add_model(served)
    except ExoTimeout:
        said = (f"nothing within {ADD_TIMEOUT:g} s: exo did not build a card for {served}; it is either checking "
                "the files with Hugging Face, which does not answer (start exo with HF_ENDPOINT pointing at a "
                "reachable mirror), or asking Hugging Face for files it does not find")
        raise AttemptFailed(weights_missing(client.url, served, _exo_nodes(choice), said)) from None
    except ExoError as exc:
        said = getattr(exc, "exo_message", "") or str(exc)
        raise AttemptFailed(weights_missing(client.url, served, _exo_nodes(choice), said)) from None


def _exo_nodes(choice: Choice | None, ids: list[str] | None = None) -> list[str]:
    """The nodes named as the user knows them (friendly name and id): `ids`, else the route's."""
    if choice is None:
        return list(ids or [])
    by_id = {n.name: n.display for n in choice.cluster.nodes}
    return [by_id.get(i, i) for i in ids] if ids else [n.display for n in fallback.route_nodes(choice.cluster,
                                                                                            choice.route)]


def weights_missing(url: str, served: str, nodes: list[str], said: str) -> str:
    """One message for weights exo cannot read: which nodes, which directory, the command that fixes it, and
    what exo said."""
    entry = paths.exo_links_dir() / paths.exo_model_dirname(served)
    where = f"node(s) {', '.join(nodes)}" if nodes else "its nodes"
    return (f"the weights of {served} are not in the exo model directories of {where} (exo at {url}): each node "
            f"needs them linked at {entry}, and its exo started with {_env_hint()}; run `arthur-cluster link "
            f"{served}` on each node, then restart its exo. exo said: {said}")


def _built_in_twin(client, choice: Choice, cat: Catalog, hooks: Hooks) -> str | None:
    """exo's built-in id for these very files (models.toml's exo_id), when exo's card describes them: the same
    family, layers, hidden size, quantization and tensor data size (exocard.differs_from_card; file sizes,
    headers included, do not count). Served under it, the model needs no card from Hugging Face, which
    /models/add would ask (and wait 30 s per file for, when it hangs)."""
    from . import exocard, modelfiles
    from .exo_client import ExoError

    exo_id = cat.entry(choice.model).exo_id or cat.entry(choice.available.served_id).exo_id
    if not exo_id or exo_id == choice.available.served_id or choice.available.path is None:
        return None
    try:
        card = next((m for m in client.models() if m.id == exo_id and not m.is_custom), None)
        info = modelfiles.inspect(choice.available.path, repo_id=exo_id, source=choice.available.source)
        if card is None or exocard.differs_from_card(
                info, n_layers=info.num_layers, hidden_size=info.hidden_size, quantization=card.quantization,
                storage_bytes=(card.storage_size_megabytes or 0) * exocard.MB, family=card.family):
            return None
        full = next((p.instance.card for p in client.previews(exo_id) if p.ok and p.instance.card), None)
    except (ExoError, modelfiles.ModelFileError):
        return None
    if full is None or exocard.differs_from_card(info, n_layers=full.n_layers, hidden_size=full.hidden_size,
                                                 quantization=card.quantization, storage_bytes=full.storage_bytes):
        return None
    hooks.say(f"{choice.available.served_id} holds the weights of exo's built-in card {exo_id}: serving it "
              "under that id (no card from Hugging Face needed)")
    return exo_id


def _env_hint() -> str:
    from . import linker

    return linker.env_line(paths.exo_links_dir())


def _place(client, choice: Choice, served: str, timeout: float, hooks: Hooks):
    """A ready instance of the model: the one already running, or a new one placed and waited for."""
    from .exo_client import DownloadFailed, ExoError

    label = f"loading {served}"
    progress = lambda done, total: hooks.progress(label, done, total)  # noqa: E731
    download = lambda done, total: hooks.progress(f"exo downloading {served}", done, total)  # noqa: E731
    try:
        state = client.state()
        running = state.instances_of(served)
        ready = [i for i in running if state.is_ready(i)]
        if ready:
            hooks.say(f"{served} is already running on exo (instance {ready[0].instance_id}); reusing it")
            return ready[0], False
        if running:  # a placement from an earlier run still loading
            hooks.say(f"waiting for the instance of {served} already loading")
            return client.wait_ready(served, timeout=timeout, on_progress=progress, on_download=download), False
        hooks.say(f"placing {served} on exo: {choice.route.label}")
        return client.place_route_and_wait(served, choice.route, timeout=timeout, on_progress=progress,
                                           on_download=download), True
    except DownloadFailed as exc:
        raise AttemptFailed(weights_missing(client.url, served, _exo_nodes(choice, [exc.node_id]),
                                            exc.error_message)) from None
    except ExoError as exc:
        raise AttemptFailed(str(exc)) from None


def _delete_quietly(client, instance_id: str) -> str | None:
    """Delete an instance; the error's text when exo would not (the failure being reported matters more)."""
    from .exo_client import ExoError

    try:
        client.delete_instance(instance_id)
    except ExoError as exc:
        return str(exc)
    return None


def _up_exo(choice: Choice, cat: Catalog, timeout: float, prompt: str, max_tokens: int, hooks: Hooks,
            no_card: dict[str, str] | None = None) -> Deployment:
    """no_card: served id -> why exo would not register it, from this `up`'s earlier routes (asked once)."""
    from .engines.exo import ExoEngine
    from .exo_client import ExoClient

    client = ExoClient(choice.cluster.endpoint, deadline=choice.cluster.deadline)
    notes: list[str] = []
    twin = _built_in_twin(client, choice, cat, hooks) if choice.available.needs_link else None
    served = twin or choice.available.served_id
    if choice.available.needs_link:
        notes = _link_locally(choice, hooks, repo_id=served)
    notes += weights_elsewhere(choice, cat, hooks, repo_id=twin)
    if twin:
        notes.append(f"served under exo's built-in card {twin}: the same weights as {choice.available.served_id}")
    elif no_card is not None and served in no_card:
        raise AttemptFailed(no_card[served])
    else:
        try:
            _register_card(client, served, hooks, choice)
        except AttemptFailed as exc:
            if no_card is not None:
                no_card[served] = str(exc)
            raise
    instance, placed = _place(client, choice, served, timeout, hooks)
    hooks.say(f"asking {served}: {prompt!r}")
    try:
        smoke = smoke_test(ExoEngine(client, served), prompt, max_tokens)
    except EngineError as exc:
        if placed:
            _delete_quietly(client, instance.instance_id)
        raise AttemptFailed(f"placed, but the test question failed: {exc}") from None
    return Deployment(model=choice.model, served_id=served, engine="exo", route=instance.route,
                      nodes=instance.node_ids, endpoint=client.url, instance_id=instance.instance_id,
                      model_path=choice.available.path, context=choice.context, smoke=smoke, notes=notes)


# --- MLX --------------------------------------------------------------------------------------------------------


def _download(model_id: str, hooks: Hooks) -> Path:
    from huggingface_hub import snapshot_download

    hooks.say(f"downloading {model_id} from Hugging Face")
    try:
        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.py", "*.model",
                                                                "*.tiktoken", "*.txt", "*.jinja"]))
    except Exception as exc:  # hub errors are many; the reason is in the text
        raise AttemptFailed(f"download of {model_id} failed: {exc}", scope="model") from None


def _up_mlx(choice: Choice, cat: Catalog, timeout: float, prompt: str, max_tokens: int,
            hooks: Hooks, serve: bool = False, bind: str | None = None) -> Deployment:
    served = choice.available.served_id
    path = choice.available.path or _download(served, hooks)
    folders: dict[str, str] = {}
    # One node is this machine, in this process or its own ranks: no other node is asked anything.
    notes = weights_elsewhere(choice, cat, hooks, folders=folders) if choice.route.nodes > 1 else []
    hooks.say(f"loading {served} with MLX ({choice.route.label})")
    hosts = mlx_hosts(choice.cluster, choice.route) if choice.route.nodes > 1 else []
    for h in hosts:
        h["model"] = None if h["local"] else folders.get(h["name"])
    if choice.route.nodes > 1 or serve:
        return _up_resident(choice, path, hosts, notes, timeout, prompt, max_tokens, hooks, bind)
    try:
        engine = open_mlx(path, served, timeout=timeout)
    except EngineError as exc:  # one node: the model is what failed
        raise AttemptFailed(str(exc), scope="model") from None
    try:
        hooks.say(f"asking {served}: {prompt!r}")
        smoke = smoke_test(engine, prompt, max_tokens)
    except EngineError as exc:
        raise AttemptFailed(f"loaded, but the test question failed: {exc}") from None
    finally:
        engine.close()
    notes.append("MLX runs inside the process that uses it: `doc` loads the model again from model_path")
    # one node runs in this process: this machine, whichever node of models.toml the route was planned on
    here = [n.name for n in fallback.route_nodes(choice.cluster, choice.route) if n.local] or [socket.gethostname()]
    return Deployment(model=choice.model, served_id=served, engine="mlx", route=choice.route, nodes=here,
                      model_path=path, hosts=hosts, context=choice.context, smoke=smoke, notes=notes)


def _recorded_residents() -> list[Resident]:
    """Every deployment's ranks this machine knows of: both records, and lock files no record describes."""
    try:
        dep = read_record()
    except DeploymentError:
        dep = None
    found = [r for r in (dep.resident if dep else None, resident.read_state()) if r is not None]
    found += resident.unrecorded({r.deployment for r in found})
    return list({r.deployment or r.url: r for r in found}.values())


def _up_resident(choice: Choice, path: Path, hosts: list[dict], notes: list[str], timeout: float, prompt: str,
                 max_tokens: int, hooks: Hooks, bind: str | None) -> Deployment:
    """Multi-node MLX (or --serve): ranks that stay up, rank 0 serving chat completions."""
    from .engines.mlx import MlxEngine

    served = choice.available.served_id
    for old in _recorded_residents():  # two copies of the weights would not fit: the old ranks go first
        hooks.say(f"stopping the resident ranks already up ({old.model} at {old.url})")
        notes.append(f"stopped the previous resident ranks of {old.model} at {old.url}")
        resident.stop(old)
    left = resident.unrecorded(set(), wait=0)
    if left:  # never a second copy beside ranks that are still up
        raise BringUpError("resident ranks still run and could not be stopped: "
                           + "; ".join(resident.describe(r) for r in left)
                           + ". Stop them (`arthur-cluster down`), then run `up` again")
    res = start_resident(path, served, choice.route, hosts or None, bind=bind, timeout=timeout, hooks=hooks)
    try:
        hooks.say(f"asking {served} at {res.url}: {prompt!r}")
        smoke = smoke_test(MlxEngine(served, endpoint=res.url), prompt, max_tokens)
    except (EngineError, ArthurError) as exc:
        resident.stop(res)
        raise AttemptFailed(f"the ranks came up, but the test question failed: {exc}") from None
    except BaseException:
        resident.stop(res)
        raise
    notes.append(f"MLX ranks stay up: rank 0 serves OpenAI chat completions at {res.endpoint} (pids {res.pids}, "
                 f"logs {res.logdir}); `arthur-cluster down` stops them")
    return Deployment(model=choice.model, served_id=served, engine="mlx", route=choice.route, nodes=choice.nodes,
                      endpoint=res.endpoint, model_path=path, hosts=hosts, resident=res, context=choice.context,
                      smoke=smoke, notes=notes)


# --- up / down --------------------------------------------------------------------------------------------------


def _refresh(found: Discovery, cat: Catalog, engine: str | None, exo_url: str | None,
             deadline: float | None = None) -> Discovery:
    """Ask exo again after a failure there: a node may have left, memory may have changed."""
    if not any(c.engine == "exo" for c in found.clusters):
        return found
    try:
        fresh = discover(cat, engine=engine, exo_url=exo_url, deadline=deadline)
    except ClusterError as exc:
        fresh = Discovery(clusters=[c for c in found.clusters if c.engine != "exo"],
                          notes=[*found.notes, f"exo dropped after a failure: {exc}"])
    fresh.notes = list(dict.fromkeys([*found.notes, *fresh.notes]))
    return fresh


def up(cat: Catalog, *, model: str | None = None, fallbacks: list[str] | None = None,
       engine: Literal["exo", "mlx"] | None = None, exo_url: str | None = None,
       context: int | None = None, timeout: float = DEFAULT_TIMEOUT, allow_download: bool = False,
       prompt: str = SMOKE_PROMPT, max_tokens: int = SMOKE_MAX_TOKENS, probe_fn: fallback.ProbeFn | None = None,
       hooks: Hooks | None = None, record: bool = True, serve: bool = False, bind: str | None = None,
       route: fallback.RouteSpec | None = None) -> Deployment:
    """Bring up the first candidate that answers; raise BringUpError with every reason when none does.

    timeout bounds the whole bring-up: exo's answers, placements, waits and each attempt get what is left of
    it, and no attempt starts once it has run out.

    engine None: exo when reachable, then MLX (models.toml [cluster], else this machine) — the embedded default.
    The demo calls `up(catalog.for_demo(), engine="mlx")` inside its demo home. MLX across nodes (or any MLX
    route with serve=True) starts ranks that stay up, rank 0's HTTP server on `bind` (default: loopback on this
    machine, rank 0's cluster address across hosts). route: `--route`'s spec; only matching routes are tried,
    the fallbacks included.
    """
    resident.check_bind(bind)  # before anything starts: a bad address is the user's to fix
    hooks = hooks or Hooks()
    end = time.monotonic() + timeout
    for line in stale_notes():
        hooks.say(line)
    target = model or cat.target
    found = discover(cat, engine=engine, exo_url=exo_url, deadline=end)  # ClusterError: engine="exo", exo fails
    for note in found.notes:
        hooks.say(note)
    for c in found.clusters:
        hooks.say(f"cluster: {c.describe()}")
        for p in c.problems:
            hooks.say(f"  note: {p}")
    prior: list[Rejection] = []
    no_card: dict[str, str] = {}  # exo's card refusals, so the model's other exo routes do not ask again
    while True:
        if not found.clusters:
            raise BringUpError("no cluster left to try:\n  " + "\n  ".join(found.notes + [str(r) for r in prior]),
                               prior)
        try:
            choice = fallback.pick(cat, cluster=found.clusters, context=context, allow_download=allow_download,
                                   probe_fn=probe_fn, model=model, fallbacks=fallbacks, prior=prior, route=route)
        except NoChoice as exc:
            notes = "".join(f"\n  {n}" for n in found.notes)
            raise BringUpError(f"{exc}{notes}", exc.rejections) from None
        # each pick judges every earlier route again: a rejection already told is not told (or kept) twice
        choice.rejections = _unique(choice.rejections)
        for r in choice.rejections:
            if r not in prior:
                hooks.say(f"passed over {r}")
        left = end - time.monotonic()
        if left <= 0:
            tried = "".join(f"\n  {r}" for r in [*found.notes, *choice.rejections])
            raise BringUpError(f"--timeout {timeout:g} s ran out before anything came up (next would have been "
                               f"{choice.model}, {choice.route.label}); raise --timeout, or fix what is listed:"
                               f"{tried}", list(choice.rejections))
        hooks.say(f"trying {choice.model} ({choice.route.label})")
        try:
            if choice.route.engine == "exo":
                dep = _up_exo(choice, cat, left, prompt, max_tokens, hooks, no_card)
            else:
                dep = _up_mlx(choice, cat, left, prompt, max_tokens, hooks, serve=serve, bind=bind)
        except AttemptFailed as exc:
            hooks.say(f"failed: {exc}; falling back")
            prior = list(choice.rejections) + [Rejection(model=choice.model, stage="bringup", reason=str(exc),
                                                         route=None if exc.scope == "model" else choice.route)]
            if choice.route.engine == "exo":
                found = _refresh(found, cat, engine, exo_url, end)
            continue
        dep.rejections = list(choice.rejections)
        dep.fallback_reason = fallback.fallback_reason(target, dep.model, choice.rejections)
        dep.notes = list(dict.fromkeys([*found.notes, *dep.notes]))
        dep.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if record:
            _retire_previous(dep, hooks)
            write_record(dep)
        return dep


def _unique(rejections: list[Rejection]) -> list[Rejection]:
    out: list[Rejection] = []
    for r in rejections:
        if r not in out:
            out.append(r)
    return out


def _retire_previous(dep: Deployment, hooks: Hooks) -> None:
    """A rerun that lands on another instance stops the one the old record named, so it holds no memory."""
    try:
        old = read_record()
    except DeploymentError:
        return  # unreadable: it is replaced below
    if old is not None and old.resident is not None and old.resident != dep.resident:
        resident.stop(old.resident)
        dep.notes.append(f"stopped the previous deployment's resident ranks of {old.served_id}")
        hooks.say(dep.notes[-1])
        return
    if old is None or old.engine != "exo" or not old.instance_id or old.instance_id == dep.instance_id:
        return
    from .exo_client import ExoClient

    error = _delete_quietly(ExoClient(old.endpoint), old.instance_id)
    if error is None:
        dep.notes.append(f"stopped the previous deployment's instance {old.instance_id} of {old.served_id}")
    else:
        dep.notes.append(f"could not stop the previous deployment's instance {old.instance_id} of {old.served_id} "
                         f"({error}); it may still hold memory: delete it from exo's dashboard")
    hooks.say(dep.notes[-1])


def _ranks_report() -> tuple[list[str], list[str]]:
    """(what is wrong, what runs fine): the recorded resident ranks, the records themselves, and ranks holding
    lock files that no record describes. One line each."""
    problems, fine = [], []
    try:
        dep = read_record()
    except DeploymentError as exc:
        dep = None
        problems.append(f"{exc}; `arthur-cluster down` still stops every rank found by its lock file")
    state, bad = resident.load_state()
    if bad:
        problems.append(f"{bad}; `arthur-cluster down` stops the ranks it described (found by their lock files) "
                        "and removes it")
    recorded = dep.resident if dep is not None else None
    known = set()
    for res in [r for r in (recorded, state) if r is not None]:
        if res.deployment in known and res.deployment:
            continue
        known.add(res.deployment)
        why = resident.problem(res)
        if why:
            problems.append(why)
        elif recorded is None or res.deployment != recorded.deployment:
            problems.append(f"{resident.describe(res)} run, but no deployment record names them (`up` was "
                            "interrupted, or is still running); `arthur-cluster down` stops them")
        else:
            fine.append(f"resident {resident.describe(res)} answer")
    for res in resident.unrecorded(known, wait=0):
        problems.append(f"{resident.describe(res)} run with no record of them (a start was interrupted, or its "
                        "record is lost); `arthur-cluster down` stops them")
    return problems, fine


def stale_notes() -> list[str]:
    """What is wrong with the recorded resident ranks (gone, failed, unrecorded), one line each; [] when well."""
    return _ranks_report()[0]


def doctor(**where) -> "linker.DoctorReport":
    """`doctor`: the linker's checks (linker.doctor, `where` its folders) and the deployment's resident ranks.
    Bring-up uses the linker, never the other way round."""
    from . import linker

    rep = linker.doctor(**where)
    rep.findings += [linker.Finding(**f) for f in doctor_findings()]
    return rep


def doctor_findings() -> list[dict]:
    """`doctor`'s view of the deployment: resident ranks that are gone, failed or run without a record (errors),
    and the ones that answer (notes: every live rank is listed)."""
    problems, fine = _ranks_report()
    fix = "run `arthur-cluster down` (it stops what is left and removes the record), then `up`"
    return ([{"kind": "stale-record", "severity": "error", "path": str(paths.deployment_file()), "message": line,
              "fix": fix} for line in problems]
            + [{"kind": "note", "severity": "note", "path": str(paths.deployment_file()), "message": line}
               for line in fine])


def down(*, record_path: Path | None = None) -> DownResult:
    """Stop what the record says runs (exo: delete its instance), and every resident rank found by its lock file
    that no record describes; then remove the records. A corrupt record is moved aside, and said so."""
    from .exo_client import ExoClient, ExoError, ExoHTTPError

    path = record_path or paths.deployment_file()
    try:
        dep, bad = read_record(path), None
    except DeploymentError as exc:
        dep, bad = None, exc
    orphan, orphan_bad = resident.load_state()  # ranks whose `up` was killed before it wrote the record
    out = DownResult(had_deployment=dep is not None, model=dep.model if dep else None,
                     engine=dep.engine if dep else None, instance_id=dep.instance_id if dep else None)
    known: set[str] = set()
    if dep is None:
        out.actions.append(str(bad) if bad else f"no deployment recorded at {path}")
    elif dep.engine == "exo" and dep.instance_id:
        client = ExoClient(dep.endpoint)
        try:
            client.delete_instance(dep.instance_id)
            out.actions.append(f"deleted exo instance {dep.instance_id} of {dep.served_id} at {client.url}")
        except ExoHTTPError as exc:
            if exc.status != 404:
                raise DeploymentError(f"exo at {client.url} refused to delete instance {dep.instance_id}: "
                                      f"{exc.exo_message or exc}; the record stays at {path}") from None
            out.actions.append(f"exo instance {dep.instance_id} was already gone")
        except ExoError as exc:
            raise DeploymentError(f"{exc} The record stays at {path}: run `arthur-cluster down` again once exo "
                                  "answers, or delete the instance from exo's dashboard.") from None
    elif dep.resident is not None:
        out.actions += resident.stop(dep.resident)
        known.add(dep.resident.deployment)
    else:
        out.actions.append("MLX ran in-process: nothing left running")
    if orphan is not None and orphan.deployment not in known and (dep is None or dep.resident is None
                                                                   or orphan.url != dep.resident.url):
        out.actions += resident.stop(orphan)
        known.add(orphan.deployment)
        _found(out, orphan.model)
    if orphan_bad:
        resident.state_file().unlink(missing_ok=True)
        out.actions.append(f"{orphan_bad}: removed it (the ranks it described are found by their lock files)")
    for res in resident.unrecorded(known, clean=True):
        out.actions.append(f"found {resident.describe(res)} with no record of them")
        out.actions += resident.stop(res)
        _found(out, res.model)
    if bad is not None:
        aside = path.with_name(f"{path.name}.corrupt-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        try:
            path.rename(aside)
        except OSError as exc:
            raise DeploymentError(f"{path}: unreadable, and it cannot be moved aside ({exc.strerror}); delete it "
                                  "by hand") from None
        out.actions.append(f"moved the unreadable record to {aside}; if it named an exo instance, delete that "
                           "from exo's dashboard")
    elif dep is not None:
        path.unlink(missing_ok=True)
        out.actions.append(f"removed {path}")
    return out


def _found(out: DownResult, model: str) -> None:
    if not out.had_deployment:
        out.had_deployment, out.model, out.engine = True, model, "mlx"
