"""MlxEngine: a model run by mlx-lm in this process, split across rank processes (pipeline or tensor), or
served by a deployment's resident ranks (`endpoint`: rank 0's HTTP address, see parallel/server.py).

With an endpoint, stream() posts an OpenAI-style streaming chat completion to rank 0 and turns its server-sent
events (and its `: prefill d/t` comments) into Events; the ranks keep the weights and a prefix cache between
calls, so nothing is loaded here and a second question on the same document prefills only the question.

Single mode loads in-process (`.model`, `.tokenizer` are there for prompt-cache work). Distributed mode starts
the ranks for every `stream()` call: on this machine over loopback (`hosts=None`, `n` ranks) or on `hosts` via
`mlx.launch` with a generated hostfile (ring with IPs, jaccl with the RDMA device matrix, nccl on GPUs). Each
rank loads its share and answers one request; rank 0's lines become Events. A rank's death, Ctrl-C or close()
stops the whole process group.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ..hostfile import (BackendUnavailable, HostfileError, RemoteError, check_backend, free_ports, hosts_from,
                        is_this_machine, loopback_ring, over_ssh, rank_env, write_hostfile)
from ..parallel.ranks import RankFailed, RankProcesses
from ..parallel.registry import supported, tensor_blockers
from .base import EngineError, Event, Message, Stats

MODES = ("single", "pipeline", "tensor")
IDLE_TIMEOUT = 600.0  # seconds without a byte from rank 0 (it sends a prefill line per chunk) before giving up


def _error_text(resp) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:300]


def resolve_model(model: str | Path) -> Path:
    """A local MLX folder, or a Hugging Face repo id already in the local cache."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EngineError(f"{p}: no config.json; pass an MLX model folder or a cached repo id")
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception as e:
        raise EngineError(f"model {model!r} is neither a folder nor in the local Hugging Face cache "
                          f"({type(e).__name__}); link or download it first") from None


def send_request(host, request: Path) -> None:
    """Rank 0 reads the request: when mlx.launch puts rank 0 on another node, the file must be there too,
    at the same path (sent over ssh, the way mlx.launch itself reaches the nodes)."""
    if is_this_machine(host.ssh):
        return
    script = f"mkdir -p {shlex.quote(str(request.parent))} && cat > {shlex.quote(str(request))}"
    try:
        over_ssh(host.ssh, [script], input=request.read_bytes(), timeout=60)
    except RemoteError as e:
        raise EngineError(f"cannot send the request to {host.ssh} over ssh: {e}") from None


class MlxEngine:
    name = "mlx"

    def __init__(self, model: str | Path, *, mode: str = "single", hosts: list | None = None,
                 backend: str = "ring", n: int = 1, prefill_step: int = 2048, timeout: float = 3600.0,
                 python: str | None = None, endpoint: str | None = None):
        if mode not in MODES:
            raise EngineError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.path = Path(model) if endpoint else resolve_model(model)
        self.model_id = str(model)
        self.mode, self.backend, self.prefill_step, self.timeout = mode, backend, prefill_step, timeout
        self.hosts = hosts_from(hosts) if hosts else None
        self.n = len(self.hosts) if self.hosts else n
        self.python = python or sys.executable
        self.model = self.tokenizer = None
        self._procs: RankProcesses | None = None
        self.last_done: dict | None = None  # distributed: rank 0's final line (per-rank memory and weights)
        if endpoint:
            return  # the resident ranks hold the model
        if mode == "single":
            if self.n != 1 or self.hosts:
                raise EngineError("single mode runs one process; choose mode 'pipeline' or 'tensor' for several")
            self._load_local()
        else:
            self._check_distributed()

    # --- setup -----------------------------------------------------------------------------------------

    def _load_local(self) -> None:
        from mlx_lm import load

        try:
            self.model, self.tokenizer = load(str(self.path))
        except Exception as e:
            raise EngineError(f"could not load {self.path}: {type(e).__name__}: {e}") from None

    def _check_distributed(self) -> None:
        config = json.loads((self.path / "config.json").read_text())
        mtype = config.get("model_type", "?")
        if self.n < 2:
            raise EngineError(f"{self.mode} mode needs at least 2 ranks, got n={self.n}")
        if not supported(mtype)[self.mode]:
            raise EngineError(f"no {self.mode} split for model type {mtype!r}")
        if self.mode == "tensor" and (why := tensor_blockers(config, self.n)):
            raise EngineError(f"cannot split {mtype} {self.n} ways: " + "; ".join(why)
                              + ". Use a rank count that divides these, or mode='pipeline'.")
        if self.hosts is None:  # ranks run here, so this mlx build must have the backend
            try:
                check_backend(self.backend)
            except BackendUnavailable as e:
                raise EngineError(str(e)) from None

    # --- streaming -------------------------------------------------------------------------------------

    def stream(self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0,
               enable_thinking: bool | None = None) -> Iterator[Event]:
        if self.endpoint:
            return self._stream_http(messages, max_tokens, temperature, enable_thinking)
        if self.mode == "single":
            return self._stream_local(messages, max_tokens, temperature, enable_thinking)
        return self._stream_ranks(messages, max_tokens, temperature, enable_thinking)

    def _prompt(self, messages: list[Message], enable_thinking: bool | None) -> list[int]:
        kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def _stream_local(self, messages, max_tokens, temperature, enable_thinking) -> Iterator[Event]:
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        if self.model is None:
            raise EngineError("the engine is closed")
        prompt = self._prompt(messages, enable_thinking)
        progress: list[tuple[int, int]] = []
        mx.reset_peak_memory()
        last = None
        for resp in stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens,
                                    sampler=make_sampler(temp=temperature), prefill_step_size=self.prefill_step,
                                    prompt_progress_callback=lambda d, t: progress.append((d, t))):
            for d, t in progress:
                yield Event("prefill", done=d, total=t)
            progress.clear()
            if resp.text:
                yield Event("token", text=resp.text)
            last = resp
        stats = Stats(finish_reason="length")
        if last is not None:
            stats = Stats(prompt_tokens=last.prompt_tokens, generation_tokens=last.generation_tokens,
                          prompt_tps=last.prompt_tps, generation_tps=last.generation_tps,
                          peak_memory_bytes=int(mx.get_peak_memory()), finish_reason=last.finish_reason)
        yield Event("done", stats=stats)

    def _commands(self, request: Path, max_tokens: int, temperature: float, tmp: Path):
        worker = ["-m", "arthur_cluster.parallel.worker", "--model", str(self.path), "--mode", self.mode,
                  "--backend", self.backend, "--request", str(request), "--max-tokens", str(max_tokens),
                  "--prefill-step", str(self.prefill_step), "--temperature", str(temperature)]
        if self.hosts is None:  # ranks on this machine, joined by hand
            ring = loopback_ring(self.n) if self.backend == "ring" else None
            port = free_ports(1)[0] if self.backend == "nccl" else None
            envs = [rank_env(self.backend, r, self.n, files=tmp, ring=ring, nccl_port=port)
                    for r in range(self.n)]
            return [[self.python, *worker]] * self.n, envs
        # This interpreter's own launcher first: one on PATH may belong to another MLX.
        own = Path(self.python).parent / "mlx.launch"
        launcher = str(own) if own.is_file() else shutil.which("mlx.launch") or str(own)
        hostfile = write_hostfile(tmp / "hosts.json", self.backend, self.hosts)
        send_request(self.hosts[0], request)
        # --python: the same interpreter path on every host (venvs at the same place on every Mac). Other
        # nodes have the weights in their own HF cache (linked there), so the ranks get the repo id too.
        cmd = [launcher, "--backend", self.backend, "--hostfile", str(hostfile), "--python", self.python,
               "--", *worker, "--repo-id", self.model_id]
        return [cmd], None

    def _stream_ranks(self, messages, max_tokens, temperature, enable_thinking) -> Iterator[Event]:
        tmp = Path(tempfile.mkdtemp(prefix="arthur-mlx-"))
        procs = None
        try:
            request = tmp / "request.json"
            request.write_text(json.dumps({"messages": messages, "enable_thinking": enable_thinking}))
            try:
                commands, envs = self._commands(request, max_tokens, temperature, tmp)
                self._procs = procs = RankProcesses(commands, envs)
            except (HostfileError, OSError) as e:
                raise EngineError(f"cannot start the {self.mode} ranks of {self.model_id}: {e}") from None
            for ev in procs.events(timeout=self.timeout):
                kind = ev.get("event")
                if kind == "prefill":
                    yield Event("prefill", done=int(ev["done"]), total=int(ev["total"]))
                elif kind == "token" and ev.get("text"):
                    yield Event("token", text=ev["text"])
                elif kind == "done":
                    peaks = ev.get("peak_memory_bytes") or [None]
                    self.last_done = ev
                    yield Event("done", stats=Stats(
                        prompt_tokens=ev["prompt_tokens"], generation_tokens=ev["generation_tokens"],
                        prompt_tps=ev["prompt_tps"], generation_tps=ev["generation_tps"],
                        peak_memory_bytes=max(p for p in peaks if p is not None) if peaks[0] is not None else None,
                        finish_reason=ev.get("finish_reason")))
        except RankFailed as e:
            raise EngineError(f"{self.mode} run of {self.model_id} over {self.n} ranks failed: {e}") from None
        finally:
            if procs is not None:
                procs.kill()
            shutil.rmtree(tmp, ignore_errors=True)

    def _stream_http(self, messages, max_tokens, temperature, enable_thinking) -> Iterator[Event]:
        import requests

        body = {"model": self.model_id, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
        if enable_thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": enable_thinking}
        url = self.endpoint + "/v1/chat/completions"
        self._thinking, self._finish = False, None
        deadline = time.monotonic() + self.timeout
        try:
            resp = requests.post(url, json=body, stream=True, timeout=(10, IDLE_TIMEOUT))
        except requests.RequestException as e:
            raise EngineError(f"nothing answers at {url} ({type(e).__name__}): the resident ranks of {self.model_id} "
                              "are not running; `arthur-cluster down`, then `up` again") from None
        try:
            if resp.status_code != 200:
                raise EngineError(f"rank 0 at {self.endpoint} answered {resp.status_code}: {_error_text(resp)}")
            for line in resp.iter_lines(decode_unicode=True):
                if time.monotonic() > deadline:
                    raise EngineError(f"no complete answer from {self.endpoint} within {self.timeout:.0f} s")
                if line.startswith(": prefill "):
                    done, total = line[len(": prefill "):].split("/")
                    yield Event("prefill", done=int(done), total=int(total))
                elif line.startswith("data: ") and line != "data: [DONE]":
                    yield from self._chunk_events(json.loads(line[6:]))
        except requests.RequestException as e:
            raise EngineError(f"the answer from {self.endpoint} broke off ({type(e).__name__}: {e})") from None
        finally:
            resp.close()

    def _chunk_events(self, obj: dict) -> Iterator[Event]:
        """One chunk: its text, and after the last one (usage, asked with stream_options) the done event."""
        if "error" in obj:
            raise EngineError(f"rank 0 at {self.endpoint}: {obj['error'].get('message')}")
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            thought, text = delta.get("reasoning") or "", delta.get("content") or ""
            if thought:  # as the model wrote it: thinking, then its end marker, then the answer (docjob splits)
                self._thinking = True
                yield Event("token", text=thought)
            if text:
                if self._thinking:
                    self._thinking = False
                    text = "</think>" + text
                yield Event("token", text=text)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        if obj.get("usage"):
            info, usage = obj.get("arthur") or {}, obj["usage"]
            self.last_done = info
            peaks = info.get("peak_memory_bytes") or []
            yield Event("done", stats=Stats(
                prompt_tokens=usage.get("prompt_tokens", 0), generation_tokens=usage.get("completion_tokens", 0),
                prompt_tps=info.get("prompt_tps", 0.0), generation_tps=info.get("generation_tps", 0.0),
                peak_memory_bytes=max(peaks) if peaks else None, finish_reason=self._finish,
                cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)))

    @property
    def rank_pids(self) -> list[int]:
        """Process ids of the running job's processes (ranks, or the launcher; resident: as of the last answer)."""
        if self.endpoint:
            return list((self.last_done or {}).get("rank_pids") or [])
        return self._procs.pids if self._procs else []

    def close(self) -> None:
        if self._procs is not None:
            self._procs.kill()
            self._procs = None
        self.model = self.tokenizer = None

    def __enter__(self) -> "MlxEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MlxEngine", "resolve_model"]
