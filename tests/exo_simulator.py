"""A simulator of exo's HTTP contract (shared/facts/exo.md) for tests: a real HTTP server on loopback.

It is not exo. It serves the same routes and JSON shapes (camelCase tagged state, snake_case wrappers),
keeps a multi-node cluster state (memory, RDMA flags, backends, versions), computes previews and placements
with exo's rules (including its unchecked NemotronH tensor split), places asynchronously (a failed placement
only shows in the log, never in an HTTP answer), and streams SSE like exo. Generation is real: each model id
maps to a local MLX folder (tiny models in tests) run with mlx-lm. Fault switches reproduce the failures the
adapter must survive.

Run as a process:  python -m tests.exo_simulator --port 0 --model ID=PATH [--nodes N] [--fault NAME[=VALUE]]
It prints its URL on the first line once it serves.
"""

from __future__ import annotations

import argparse
import itertools
import json
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, unquote, urlparse

GIB = 1 << 30
SIM_VERSION = "0.3.70"

# Built-in cards, as exo ships them (shared/facts/exo.md). Nemotron cards carry no num_key_value_heads.
_NEMOTRON_BYTES = {"4Bit": 17_800_000_000, "8Bit": 33_600_000_000}
BUILTIN_CARDS: list[dict[str, Any]] = [
    {"model_id": "mlx-community/Llama-3.2-1B-Instruct-4bit", "storage_size": 729_808_896, "n_layers": 16,
     "hidden_size": 2048, "num_key_value_heads": 8, "supports_tensor": True, "family": "llama",
     "quantization": "4bit", "base_model": "Llama 3.2 1B", "context_length": 131072},
    {"model_id": "mlx-community/Llama-3.2-3B-Instruct-4bit", "storage_size": 1_807_496_330, "n_layers": 28,
     "hidden_size": 3072, "num_key_value_heads": 8, "supports_tensor": True, "family": "llama",
     "quantization": "4bit", "base_model": "Llama 3.2 3B", "context_length": 131072},
    {"model_id": "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit", "storage_size": 4_517_000_000, "n_layers": 32,
     "hidden_size": 4096, "num_key_value_heads": 8, "supports_tensor": True, "family": "llama",
     "quantization": "4bit", "base_model": "Llama 3.1 8B", "context_length": 131072},
    *({"model_id": f"mlx-community/NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-{q}", "storage_size": size, "n_layers": 52,
       "hidden_size": 2688, "supports_tensor": True, "family": "nemotron", "quantization": q.lower(),
       "base_model": "Nemotron 3 Nano 30B A3B", "context_length": 262144, "reasoning_dialect": "nemotron"}
      for q, size in _NEMOTRON_BYTES.items()),
]
_CARD_DEFAULTS = {"tasks": ["TextGeneration"], "capabilities": ["text"], "backends": ["MlxMetal", "MlxCuda", "MlxCpu"],
                  "is_custom": False, "family": None, "quantization": None, "base_model": None,
                  "reasoning_dialect": None, "context_length": None}


def card(**kw: Any) -> dict[str, Any]:
    return {**_CARD_DEFAULTS, **kw}


def card_from_folder(model_id: str, folder: Path) -> dict[str, Any]:
    """A custom card built from a local MLX folder, the way exo builds one from a repo's config."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    out = card(model_id=model_id, storage_size=sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")),
               n_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"], supports_tensor=True,
               family=cfg.get("model_type"), is_custom=True, context_length=cfg.get("max_position_embeddings"))
    if "num_key_value_heads" in cfg:
        out["num_key_value_heads"] = cfg["num_key_value_heads"]
    return out


@dataclass
class SimNode:
    node_id: str
    ram_total: int = 64 * GIB
    ram_available: int = 48 * GIB
    rdma: bool = False
    backends: list[str] = field(default_factory=lambda: ["MlxCpu"])
    version: str = SIM_VERSION
    name: str = ""


@dataclass
class Faults:
    placement_delay: float = 0.0  # seconds before a placed instance appears in state
    load_step: float = 0.01  # seconds per loading step of a runner
    runner_failure: str | None = None  # the last runner of every new instance fails with this message
    never_ready: bool = False  # runners stop one layer short of ready, forever
    node_loss_after: int | None = None  # tokens generated before a node of the instance drops
    version_mismatch: str | None = None  # the last node reports this exo version
    html: bool = False  # every route answers an HTML page (a dashboard / another server on the port)
    broken_200: bool = False  # non-streaming generation fails after the 200 headers went out
    token_delay: float = 0.0  # seconds between tokens (with keepalive_interval: real keep-alives)
    keepalive_interval: float = 10.0  # exo's idle keep-alive period


# --- real generation --------------------------------------------------------------------------------

class _MlxThread:
    """Every MLX call of the process runs on this one thread: MLX streams belong to the thread that made
    them, and the server answers each request on a thread of its own."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def _loop(self) -> None:
        while True:
            fn, out = self.jobs.get()
            try:
                out.put(("ok", fn()))
            except BaseException as exc:  # handed back to the caller's thread
                out.put(("err", exc))

    def call(self, fn: Callable[[], Any]) -> Any:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="simulator-mlx", daemon=True)
                self.thread.start()
        out: queue.Queue = queue.Queue()
        self.jobs.put((fn, out))
        kind, value = out.get()
        if kind == "err":
            raise value
        return value


_MLX = _MlxThread()
_LOADED: dict[str, tuple[Any, Any]] = {}
_STREAM: list[Any] = []


def load_local(folder: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) for a local MLX folder, loaded once per process."""
    key = str(Path(folder).resolve())

    def load() -> tuple[Any, Any]:
        if key not in _LOADED:
            from mlx_lm import load as mlx_load

            _LOADED[key] = mlx_load(key)
        return _LOADED[key]

    return _MLX.call(load)


@dataclass
class Piece:
    text: str
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory_bytes: int
    finish_reason: str | None


@dataclass
class Prefill:
    done: int
    total: int


def generate_local(folder: str | Path, messages: list[dict], *, max_tokens: int, temperature: float,
                   enable_thinking: bool | None, cancel: threading.Event | None = None) -> Iterator[Piece | Prefill]:
    """The one place the simulator runs a model: real mlx-lm (later: the project's MlxEngine).
    Runs on the MLX thread and hands pieces over as they come; `cancel` stops it early."""
    model, tokenizer = load_local(folder)
    items: queue.Queue = queue.Queue()
    cancel = cancel or threading.Event()

    def run() -> None:
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        if not _STREAM:  # mlx-lm's own generation stream belongs to whichever thread imported it
            _STREAM.append(mx.new_stream(mx.cpu))
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, stream=_STREAM[0],
                                 sampler=make_sampler(temp=temperature), prefill_step_size=8,
                                 prompt_progress_callback=lambda d, t: items.put(Prefill(d, t))):
            items.put(Piece(r.text, r.prompt_tokens, r.generation_tokens, r.prompt_tps, r.generation_tps,
                            int(r.peak_memory * 1e9), r.finish_reason))
            if cancel.is_set():
                break

    def job() -> None:
        try:
            run()
        except BaseException as exc:  # re-raised in the caller's thread
            items.put(exc)
        finally:
            items.put(None)

    threading.Thread(target=_MLX.call, args=(job,), daemon=True).start()
    try:
        while (item := items.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()  # the consumer stopped early (node loss, client gone)


# --- placement with exo's rules ------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def card_state(c: dict[str, Any]) -> dict[str, Any]:
    """A card as it appears inside state (camelCase, Memory as {inBytes})."""
    return {_camel(k): ({"inBytes": v} if k == "storage_size" else v) for k, v in c.items()}


def place(c: dict[str, Any], nodes: list[SimNode], sharding: str, meta: str, min_nodes: int) -> dict | str:
    """An instance (tagged JSON) or the reason exo gives for none. Smallest qualifying group wins."""
    if sharding not in ("Pipeline", "Tensor") or meta not in ("MlxRing", "MlxJaccl"):
        return f"Unknown sharding/instance_meta {sharding}/{meta}"
    if sharding == "Tensor" and not c.get("supports_tensor"):
        return f"Model {c['model_id']} does not support tensor parallelism"
    pool = [n for n in nodes if set(n.backends) & set(c.get("backends") or n.backends)]
    if meta == "MlxJaccl":
        pool = [n for n in pool if n.rdma and "MlxMetal" in n.backends]
        if len(pool) < max(2, min_nodes):
            return "No RDMA-capable cycle: MlxJaccl needs rdma_ctl enabled on every node (MlxMetal backend)"
    reasons = []
    for k in range(max(1, min_nodes), len(pool) + 1):
        if sharding == "Tensor":
            if c["hidden_size"] % k:
                reasons.append(f"hidden_size {c['hidden_size']} is not divisible by {k}")
                continue
            kv = c.get("num_key_value_heads")  # only checked when the card has it (exo's own gap)
            if kv is not None and kv % k:
                reasons.append(f"num_key_value_heads {kv} is not divisible by {k}")
                continue
        groups = [g for g in itertools.combinations(pool, k) if sum(n.ram_available for n in g) >= c["storage_size"]]
        if groups:
            return _instance(c, max(groups, key=lambda g: sum(n.ram_available for n in g)), sharding, meta)
        reasons.append(f"no cycle of {k} node(s) has {c['storage_size']} bytes available")
    return "No cycles found with sufficient memory" + (f" ({'; '.join(reasons)})" if reasons else "")


def _layer_split(n_layers: int, weights: list[int]) -> list[int]:
    """Layers in proportion to each node's ramAvailable (largest remainder, at least one each)."""
    total = sum(weights)
    raw = [n_layers * w / total for w in weights]
    counts = [max(1, int(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while sum(counts) < n_layers:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts) > n_layers:
        j = max(range(len(counts)), key=lambda x: counts[x])
        counts[j] -= 1
    return counts


def _instance(c: dict[str, Any], group: tuple[SimNode, ...], sharding: str, meta: str) -> dict:
    n = c["n_layers"]
    spans, start = [], 0
    counts = _layer_split(n, [g.ram_available for g in group]) if sharding == "Pipeline" else [n] * len(group)
    for cnt in counts:
        spans.append((start, start + cnt) if sharding == "Pipeline" else (0, n))
        start += cnt
    runners = {}
    node_to_runner = {}
    for rank, (node, (s, e)) in enumerate(zip(group, spans)):
        rid = str(uuid.uuid4())
        node_to_runner[node.node_id] = rid
        runners[rid] = {f"{sharding}ShardMetadata": {"modelCard": card_state(c), "deviceRank": rank,
                                                     "worldSize": len(group), "startLayer": s, "endLayer": e,
                                                     "nLayers": n}}
    body: dict[str, Any] = {"instanceId": str(uuid.uuid4()),
                            "shardAssignments": {"modelId": c["model_id"], "runnerToShard": runners,
                                                 "nodeToRunner": node_to_runner}}
    if meta == "MlxRing":
        body["hosts"] = [{"ip": "127.0.0.1", "port": 50000 + i} for i in range(len(group))]
    else:
        body["ibvDevices"] = [[None if i == j else f"rdma_en{j}" for j in range(len(group))] for i in range(len(group))]
        body["ibvCoordinators"] = {g.node_id: "127.0.0.1:52416" for g in group}
    return {f"{meta}Instance": body}


def _untag(obj: dict) -> tuple[str, dict]:
    return next(iter(obj.items()))


def instance_model(inst: dict) -> str:
    return _untag(inst)[1]["shardAssignments"]["modelId"]


def instance_shards(inst: dict) -> list[tuple[str, str, dict]]:
    """(node_id, runner_id, shard body) in rank order."""
    sa = _untag(inst)[1]["shardAssignments"]
    node_of = {r: nid for nid, r in sa["nodeToRunner"].items()}
    rows = [(node_of[rid], rid, _untag(sh)[1]) for rid, sh in sa["runnerToShard"].items()]
    return sorted(rows, key=lambda r: r[2]["deviceRank"])


# --- the simulator --------------------------------------------------------------------------------------


class Simulator:
    """Cluster state + HTTP server. Control methods are for tests; the HTTP side is the contract."""

    def __init__(self, models: dict[str, str | Path] | None = None, *, nodes: int | list[dict] = 2,
                 faults: Faults | None = None, host: str = "127.0.0.1", port: int = 0):
        specs = [{} for _ in range(nodes)] if isinstance(nodes, int) else nodes
        self.nodes = [SimNode(**{"node_id": f"simnode-{i}", "name": f"sim-mac-{i}", **s}) for i, s in enumerate(specs)]
        self.api_node = self.nodes[0].node_id
        self.faults = faults or Faults()
        self.models = {k: Path(v) for k, v in (models or {}).items()}  # model id -> local folder
        self.cards = {c["model_id"]: card(**c) for c in BUILTIN_CARDS}
        self.custom: dict[str, dict] = {}
        self.instances: dict[str, dict] = {}
        self.runners: dict[str, dict] = {}
        self.log: list[str] = []  # the master's log: where failed placements end up
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer((host, port), _Handler)
        self.server.daemon_threads = True
        self.server.sim = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Simulator":
        self._thread = threading.Thread(target=self.server.serve_forever, name="exo-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "Simulator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- control (tests)

    def set_faults(self, **kw: Any) -> None:
        for k, v in kw.items():
            if k not in {f.name for f in fields(Faults)}:
                raise ValueError(f"unknown fault {k}")
            setattr(self.faults, k, v)

    def add_custom_card(self, model_id: str, folder: str | Path | None = None, **card_fields: Any) -> dict:
        """What a user's ~/.exo/custom_model_cards/<org>--<name>.toml does: a card exo did not ship."""
        c = card_from_folder(model_id, Path(folder)) if folder else card(model_id=model_id, is_custom=True)
        c.update(card_fields)
        with self.lock:
            self.custom[model_id] = c
        return c

    def lose_node(self, node_id: str) -> None:
        """A node leaves the cluster: its instances go away with it."""
        with self.lock:
            self.nodes = [n for n in self.nodes if n.node_id != node_id]
            for iid, inst in list(self.instances.items()):
                if any(nid == node_id for nid, _, _ in instance_shards(inst)):
                    self._drop_instance(iid)
            self.log.append(f"node {node_id} disconnected")

    def node(self, node_id: str) -> SimNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    # -- state

    def all_cards(self) -> dict[str, dict]:
        return {**self.cards, **self.custom}

    def state(self) -> dict[str, Any]:
        with self.lock:
            now = datetime.now(timezone.utc).isoformat()
            ids = [n.node_id for n in self.nodes]
            return {
                "instances": dict(self.instances),
                "runners": dict(self.runners),
                "downloads": {},
                "tasks": {},
                "lastSeen": {i: now for i in ids},
                "topology": {"nodes": ids,
                             "connections": [{"source": a, "sink": b} for a in ids for b in ids if a != b]},
                "nodeIdentities": {n.node_id: {"friendlyName": n.name, "modelId": "Simulated Mac", "chipId": "sim",
                                               "osVersion": "26.2", "exoVersion": self._version(n)}
                                   for n in self.nodes},
                "nodeMemory": {n.node_id: {"ramTotal": {"inBytes": n.ram_total},
                                           "ramAvailable": {"inBytes": n.ram_available},
                                           "swapTotal": {"inBytes": 0}, "swapAvailable": {"inBytes": 0}}
                               for n in self.nodes},
                "nodeDisk": {}, "nodeNetwork": {},
                "nodeRdmaCtl": {n.node_id: {"enabled": n.rdma} for n in self.nodes},
                "nodeBackends": {n.node_id: list(n.backends) for n in self.nodes},
                "customModelCards": {k: card_state(c) for k, c in self.custom.items()},
            }

    def _version(self, n: SimNode) -> str:
        if self.faults.version_mismatch and n is self.nodes[-1]:
            return self.faults.version_mismatch
        return n.version

    def model_entry(self, c: dict) -> dict:
        return {"id": c["model_id"], "object": "model", "created": 0, "owned_by": "exo",
                "hugging_face_id": c["model_id"], "name": c["model_id"].split("/")[-1],
                "storage_size_megabytes": round(c["storage_size"] / 1e6, 1), "supports_tensor": c["supports_tensor"],
                **{k: c.get(k) for k in ("tasks", "is_custom", "family", "quantization", "base_model",
                                          "capabilities", "reasoning_dialect", "context_length")}}

    # -- placement lifecycle

    def previews(self, model_id: str, node_ids: list[str] | None) -> list[dict]:
        c = self.all_cards()[model_id]
        pool = [n for n in self.nodes if not node_ids or n.node_id in node_ids]
        out = []
        for sharding in ("Pipeline", "Tensor"):
            for meta in ("MlxRing", "MlxJaccl"):
                for k in range(1, len(pool) + 1):
                    res = place(c, pool, sharding, meta, k)
                    ok = isinstance(res, dict)
                    deltas = {}
                    if ok:
                        nids = [nid for nid, _, _ in instance_shards(res)]
                        deltas = {nid: c["storage_size"] // len(nids) for nid in nids}
                    out.append({"model_id": model_id, "sharding": sharding, "instance_meta": meta, "min_nodes": k,
                                "instance": res if ok else None, "memory_delta_by_node": deltas,
                                "error": None if ok else res})
        return out

    def start_placement(self, model_id: str, sharding: str, meta: str, min_nodes: int) -> None:
        threading.Thread(target=self._place_later, args=(model_id, sharding, meta, min_nodes), daemon=True).start()

    def _place_later(self, model_id: str, sharding: str, meta: str, min_nodes: int) -> None:
        if self.stopping.wait(self.faults.placement_delay):
            return
        with self.lock:
            res = place(self.all_cards()[model_id], self.nodes, sharding, meta, min_nodes)
            if isinstance(res, str):
                self.log.append(f"placement of {model_id} ({sharding}/{meta}, min_nodes={min_nodes}) failed: {res}")
                return
            self.add_instance(res)

    def add_instance(self, inst: dict) -> None:
        with self.lock:
            iid = _untag(inst)[1]["instanceId"]
            self.instances[iid] = inst
            for _, rid, _ in instance_shards(inst):
                self.runners[rid] = {"RunnerIdle": {}}
        threading.Thread(target=self._load, args=(iid,), daemon=True).start()

    def _alive(self, iid: str) -> bool:
        return iid in self.instances and not self.stopping.is_set()

    def _load(self, iid: str) -> None:
        """Runners go Loading (layer by layer) -> Ready; the model is really loaded once."""
        inst = self.instances[iid]
        model_id = instance_model(inst)
        shards = instance_shards(inst)
        spans = {rid: sh["endLayer"] - sh["startLayer"] for _, rid, sh in shards}
        folder = self.models.get(model_id)
        for step in range(max(spans.values()) + 1):
            with self.lock:
                if not self._alive(iid):
                    return
                for rid, total in spans.items():
                    self.runners[rid] = {"RunnerLoading": {"layersLoaded": min(step, total), "totalLayers": total}}
                if step == 1 and folder is None:
                    nid, rid, _ = shards[0]
                    self.runners[rid] = {"RunnerFailed": {"errorMessage": f"Model {model_id} not found on node "
                                                          f"{nid}: no complete folder in its models dirs",
                                                          "diagnostics": []}}
                    return
                if step == 1 and self.faults.runner_failure:
                    nid, rid, _ = shards[-1]
                    self.runners[rid] = {"RunnerFailed": {"errorMessage": self.faults.runner_failure,
                                                          "diagnostics": []}}
                    return
            if step == 0 and folder is not None:
                load_local(folder)  # real load, outside the state lock
            if self.faults.never_ready and step >= max(spans.values()) - 1:
                self.stopping.wait()  # stuck one layer short, like a runner that hangs
                return
            time.sleep(self.faults.load_step)
        with self.lock:
            if not self._alive(iid):
                return
            c = self.all_cards()[model_id]
            for nid, rid, sh in shards:
                self.runners[rid] = {"RunnerReady": {}}
                share = c["storage_size"] * spans[rid] // max(1, sh["nLayers"])
                node = next((n for n in self.nodes if n.node_id == nid), None)
                if node:
                    node.ram_available = max(0, node.ram_available - share)
            inst["_memory_taken"] = True

    def _drop_instance(self, iid: str) -> None:
        inst = self.instances.pop(iid, None)
        if inst is None:
            return
        c = self.all_cards().get(instance_model(inst))
        for nid, rid, sh in instance_shards(inst):
            self.runners.pop(rid, None)
            node = next((n for n in self.nodes if n.node_id == nid), None)
            if inst.get("_memory_taken") and node and c:
                node.ram_available += c["storage_size"] * (sh["endLayer"] - sh["startLayer"]) // max(1, sh["nLayers"])

    def running_instance(self, model_id: str) -> dict | None:
        with self.lock:
            return next((i for i in self.instances.values() if instance_model(i) == model_id), None)


def _public(inst: dict) -> dict:
    """An instance without the simulator's bookkeeping keys."""
    tag, body = _untag(inst)
    return {tag: {k: v for k, v in body.items() if not k.startswith("_")}}


# --- HTTP -----------------------------------------------------------------------------------------------

HTML = b"<!doctype html><html><head><title>Dashboard</title></head><body><h1>Welcome</h1></body></html>"


class _Handler(BaseHTTPRequestHandler):
    server_version = "exo-simulator"
    sim: Simulator

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    # -- replies

    def _send(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, type_: str = "BadRequest") -> None:
        self._send(status, {"error": {"message": message, "type": type_, "code": status}})

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        try:
            data = json.loads(self.rfile.read(n) or b"{}")
        except ValueError:
            data = None
        return data if isinstance(data, dict) else {}

    def _dispatch(self, method: str) -> None:
        self.sim = self.server.sim  # type: ignore[attr-defined]
        if self.sim.faults.html:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(HTML)))
            self.end_headers()
            self.wfile.write(HTML)
            return
        url = urlparse(self.path)
        q = {k: v if k == "node_ids" else v[-1] for k, v in parse_qs(url.query).items()}
        path = unquote(url.path).rstrip("/") or "/"
        try:
            handled = getattr(self, "route_" + method)(path, q)
        except (BrokenPipeError, ConnectionResetError):
            return
        if handled is False:
            self._error(404, f"Not Found: {method} {path}", "NotFound")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- routes

    def route_GET(self, path: str, q: dict) -> bool | None:
        sim = self.sim
        if path == "/node_id":
            return self._send(200, sim.api_node)
        if path == "/state" or path.startswith("/state/"):
            return self._state_path(path)
        if path in ("/models", "/v1/models"):
            cards = sim.all_cards().values()
            if q.get("status") == "downloaded":
                cards = [c for c in cards if c["model_id"] in sim.models]
            return self._send(200, {"object": "list", "data": [sim.model_entry(c) for c in cards]})
        if path == "/instance/previews":
            mid = q.get("model_id", "")
            if mid not in sim.all_cards():
                return self._error(404, f"Model card not found for {mid}", "NotFound")
            return self._send(200, {"previews": sim.previews(mid, q.get("node_ids"))})
        if path == "/instance/placement":
            mid = q.get("model_id", "")
            if mid not in sim.all_cards():
                return self._error(404, f"Model card not found for {mid}", "NotFound")
            with sim.lock:
                res = place(sim.all_cards()[mid], sim.nodes, q.get("sharding", "Pipeline"),
                            q.get("instance_meta", "MlxRing"), int(q.get("min_nodes", 1)))
            return self._send(200, res) if isinstance(res, dict) else self._error(400, res)
        if path.startswith("/instance/"):
            inst = sim.instances.get(path.split("/", 2)[2])
            return self._send(200, _public(inst)) if inst else self._error(404, "Instance not found", "NotFound")
        return False

    def _state_path(self, path: str) -> None:
        node: Any = self.sim.state()
        node["instances"] = {k: _public(v) for k, v in node["instances"].items()}
        for part in [p for p in path.split("/")[2:] if p]:
            if not isinstance(node, dict) or part not in node:
                return self._error(404, f"No state at {path}", "NotFound")
            node = node[part]
        self._send(200, node)

    def route_POST(self, path: str, q: dict) -> bool | None:
        sim, body = self.sim, self._body()
        if path == "/place_instance":
            mid = body.get("model_id", "")
            c = sim.all_cards().get(mid)
            if c is None:
                return self._error(404, f"Model card not found for {mid}: exo needs a built-in or custom card",
                                   "NotFound")
            sim.start_placement(mid, body.get("sharding", "Pipeline"), body.get("instance_meta", "MlxRing"),
                                int(body.get("min_nodes", 1)))
            return self._send(200, {"message": "Command received.", "command_id": str(uuid.uuid4()),
                                    "model_card": sim.model_entry(c)})
        if path == "/instance":
            inst = body.get("instance")
            if not isinstance(inst, dict) or len(inst) != 1:
                return self._error(422, "body must be {instance: {...}}")
            c = sim.all_cards().get(instance_model(inst))
            with sim.lock:
                free = sum(n.ram_available for n in sim.nodes)
            if c is None or c["storage_size"] > free:
                return self._error(400, "Insufficient memory to create instance")
            sim.add_instance(inst)
            return self._send(200, {"message": "Command received.", "command_id": str(uuid.uuid4())})
        if path == "/models/add":
            mid = body.get("model_id", "")
            if mid in sim.models:
                return self._send(200, sim.model_entry(sim.add_custom_card(mid, sim.models[mid])))
            return self._error(400, f"Could not fetch config for {mid} from Hugging Face (offline)")
        if path in ("/v1/chat/completions", "/ollama/v1/chat/completions", "/bench/chat/completions"):
            return self._chat(body, bench=path.startswith("/bench"))
        return False

    def route_DELETE(self, path: str, q: dict) -> bool | None:
        sim = self.sim
        if path.startswith("/instance/"):
            iid = path.split("/", 2)[2]
            with sim.lock:
                if iid not in sim.instances:
                    return self._error(404, f"Instance {iid} not found", "NotFound")
                sim._drop_instance(iid)
            return self._send(200, {"message": "Command received.", "command_id": str(uuid.uuid4()),
                                    "instance_id": iid})
        if path.startswith("/models/custom/"):
            mid = path.removeprefix("/models/custom/")
            with sim.lock:
                if sim.custom.pop(mid, None) is None:
                    return self._error(404, f"Custom model card {mid} not found", "NotFound")
            return self._send(200, {"message": f"Deleted custom model card {mid}"})
        return False

    # -- generation

    def _chat(self, body: dict, bench: bool) -> None:
        sim = self.sim
        mid = body.get("model")
        inst = sim.running_instance(mid) if isinstance(mid, str) else None
        if inst is None:
            return self._error(404, f"No instance found for model {mid}", "NotFound")
        folder = sim.models.get(mid)
        if folder is None:
            return self._error(500, f"Model {mid} has no weights on this node", "InternalServerError")
        args = dict(max_tokens=int(body.get("max_tokens") or 256), temperature=float(body.get("temperature") or 0.0),
                    enable_thinking=body.get("enable_thinking"))
        if body.get("seed") is not None:
            import mlx.core as mx

            mx.random.seed(int(body["seed"]))
        reasoning = bool(sim.all_cards()[mid].get("reasoning_dialect")) and args["enable_thinking"] is not False
        if body.get("stream"):
            return _Stream(self, inst, folder, body["messages"], args, reasoning).run()
        return self._complete(inst, folder, body["messages"], args, bench)

    def _complete(self, inst: dict, folder: Path, messages: list, args: dict, bench: bool) -> None:
        sim, mid = self.sim, instance_model(inst)
        if sim.faults.broken_200 or sim.faults.node_loss_after is not None:
            partial = json.dumps(_completion(mid, "", "stop", 0, 0)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(partial)))
            self.end_headers()
            self.wfile.write(partial[: len(partial) // 2])  # generation failed after the headers went out
            self.wfile.flush()
            self.close_connection = True
            if sim.faults.node_loss_after is not None:
                sim.lose_node(instance_shards(inst)[-1][0])
            return
        text, last = [], None
        for piece in generate_local(folder, messages, **args):
            if isinstance(piece, Prefill):
                continue
            text.append(piece.text)
            last = piece
        out = _completion(mid, "".join(text), last.finish_reason if last else "stop",
                          last.prompt_tokens if last else 0, last.generation_tokens if last else 0)
        if bench and last:
            out["generation_stats"] = _gen_stats(last)
            out["power_usage"] = None
        self._send(200, out)


def _completion(mid: str, text: str, finish: str | None, prompt_tokens: int, gen_tokens: int) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": mid, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": gen_tokens,
                      "total_tokens": prompt_tokens + gen_tokens}}


def _gen_stats(p: Piece) -> dict:
    return {"prompt_tps": p.prompt_tps, "generation_tps": p.generation_tps, "prompt_tokens": p.prompt_tokens,
            "generation_tokens": p.generation_tokens, "peak_memory_usage": {"inBytes": p.peak_memory_bytes},
            "prefix_cache_hit": False}


class _Stream:
    """One SSE answer: keep-alives from an idle timer, prefill comments, chunks, stats, [DONE]."""

    def __init__(self, h: _Handler, inst: dict, folder: Path, messages: list, args: dict, reasoning: bool):
        self.h, self.inst, self.folder, self.messages, self.args = h, inst, folder, messages, args
        self.reasoning = reasoning  # text before </think> goes to reasoning_content
        self.mid = instance_model(inst)
        self.cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        self.wlock = threading.Lock()
        self.last_write = time.monotonic()
        self.done = threading.Event()

    def write(self, text: str) -> None:
        with self.wlock:
            self.h.wfile.write(text.encode())
            self.h.wfile.flush()
            self.last_write = time.monotonic()

    def chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> None:
        obj: dict[str, Any] = {"id": self.cid, "object": "chat.completion.chunk", "created": int(time.time()),
                               "model": self.mid, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            obj["usage"] = usage
        self.write(f"data: {json.dumps(obj)}\n\n")

    def _keepalive(self) -> None:
        period = self.h.sim.faults.keepalive_interval
        while not self.done.wait(min(period, 0.05)):
            if time.monotonic() - self.last_write >= period:
                try:
                    self.write(": keep-alive\n\n")
                except OSError:
                    return

    def run(self) -> None:
        sim = self.h.sim
        self.h.send_response(200)
        self.h.send_header("Content-Type", "text/event-stream")
        self.h.send_header("Cache-Control", "no-cache")
        self.h.end_headers()
        self.h.close_connection = True  # the body ends when the connection closes
        self.write(": keep-alive\n\n")
        ticker = threading.Thread(target=self._keepalive, daemon=True)
        ticker.start()
        try:
            self._generate(sim)
        except OSError:
            pass  # the client went away
        finally:
            self.done.set()

    def _generate(self, sim: Simulator) -> None:
        thinking = self.reasoning
        last = None
        n = 0
        for piece in generate_local(self.folder, self.messages, **self.args):
            if isinstance(piece, Prefill):
                self.write(f": prefill_progress {json.dumps({'processed': piece.done, 'total': piece.total})}\n\n")
                continue
            loss_at = sim.faults.node_loss_after
            if loss_at is not None and n >= loss_at:
                lost = instance_shards(self.inst)[-1][0]
                sim.lose_node(lost)
                self.write("data: " + json.dumps({"error": {"message": f"Runner on node {lost} disconnected",
                                                            "type": "InternalServerError", "code": 500}}) + "\n\n")
                self.write("data: [DONE]\n\n")
                return
            if sim.faults.token_delay:
                time.sleep(sim.faults.token_delay)
            text = piece.text
            if thinking and "</think>" in text:
                before, _, text = text.partition("</think>")
                if before:
                    self.chunk({"reasoning_content": before})
                thinking = False
            if text:
                self.chunk({"reasoning_content": text} if thinking else {"content": text})
                n += 1  # chunks sent: what node_loss_after counts
            last = piece
        usage = {"prompt_tokens": last.prompt_tokens if last else 0,
                 "completion_tokens": last.generation_tokens if last else 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.chunk({}, last.finish_reason if last else "stop", usage)
        if last:
            self.write(f": generation_stats {json.dumps(_gen_stats(last))}\n\n")
        self.write("data: [DONE]\n\n")


# --- command line ---------------------------------------------------------------------------------------


def _fault_value(name: str, raw: str | None) -> Any:
    types = {f.name: f.type for f in fields(Faults)}
    if name not in types:
        raise SystemExit(f"unknown fault {name!r}; known: {', '.join(types)}")
    t = str(types[name])
    if raw is None:
        return True if "bool" in t else "simulated failure"
    if "bool" in t:
        return raw.lower() in ("1", "true", "yes", "on")
    if "int" in t:
        return int(raw)
    if "float" in t:
        return float(raw)
    return raw


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.exo_simulator", description="exo contract simulator")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", action="append", default=[], metavar="ID=PATH", help="model id served from a folder")
    ap.add_argument("--custom-card", action="append", default=[], metavar="ID", help="add a custom card (needs --model)")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--fault", action="append", default=[], metavar="NAME[=VALUE]")
    a = ap.parse_args(argv)
    models = dict(m.split("=", 1) for m in a.model)
    faults = Faults()
    for f in a.fault:
        name, _, raw = f.partition("=")
        setattr(faults, name.replace("-", "_"), _fault_value(name.replace("-", "_"), raw if _ else None))
    sim = Simulator(models, nodes=a.nodes, faults=faults, host=a.host, port=a.port)
    for mid in a.custom_card:
        sim.add_custom_card(mid, models.get(mid))
    sim.start()
    print(sim.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sim.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
