"""Long-document jobs: plan (fit, memory, time), run (single pass or map-reduce), cache, resume.

A job asks one or more tasks (questions, a summary, a prompt file) of one document. The plan counts tokens
with the model's own tokenizer and chat template, reserves the output tokens, and picks a single pass when the
document fits the working context, else map-reduce over overlapping chunks with a reduce step. Every prompt is
built as a document prefix followed by a task suffix, so the document's prefill is made once and reused for
every task (the MLX engine's prefix cache, parallel/prefix.py). Each finished unit (an answer, a chunk's note, a
reduce step) is written to the job directory as it completes; a job killed at any point resumes from what is
there.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, Field

from . import catalog, documents, memory, paths, safeio
from .documents import Document
from .engines.base import EngineError, Message, Stats
from .errors import ArthurError
from .memory import MemoryPlan
from .types import NodeMemory, Route

SYSTEM = "You answer questions about the document the user gives you, using only that document."
SENTINEL = "\u2063ARTHUR-TASK\u2063"  # an invisible marker that no template or document produces
DEFAULT_MAX_TOKENS = 512
DEFAULT_STEP = 2048
MIN_CHUNK = 64  # a chunk budget below this is not worth running
NOTE_SEPARATOR = 8  # tokens for the "[Part i]" label and blank lines around each note in a reduce prompt
WARMUP_TOKENS = 1024  # long enough that the measured rate is the steady one, not the first kernels
THINK_END = "</think>"


class DocJobError(ArthurError, RuntimeError):
    """A document job cannot start or continue; the message says why and what to do."""


# --- values -----------------------------------------------------------------------------------------


class Task(BaseModel):
    id: str  # q1, q2, ...
    kind: Literal["ask", "summarize", "prompt"]
    text: str = ""

    @property
    def label(self) -> str:
        # one branch per kind: a summary has no text, so the prompt's first line must not be built for it
        if self.kind == "summarize":
            return "Summary"
        if self.kind == "prompt":
            return (self.text.strip().splitlines() or [""])[0][:80]
        return self.text


def make_tasks(asks: list[str] | None = None, summarize: bool = False, prompt: str | None = None) -> list[Task]:
    tasks = [Task(id="", kind="ask", text=q.strip()) for q in asks or [] if q.strip()]
    if summarize:
        tasks.append(Task(id="", kind="summarize"))
    if prompt is not None:
        if not prompt.strip():
            raise DocJobError("the prompt file is empty: write the instruction into it")
        tasks.append(Task(id="", kind="prompt", text=prompt.strip()))
    if not tasks:
        raise DocJobError("nothing to do: pass --ask QUESTION, --summarize or --prompt-file FILE")
    return [t.model_copy(update={"id": f"q{i + 1}"}) for i, t in enumerate(tasks)]


class ChunkPlan(BaseModel):
    index: int
    start: int
    end: int
    tokens: int


class Alternative(BaseModel):
    model: str
    context_length: int | None = None
    single_pass: bool = False
    memory_fits: bool | None = None
    note: str = ""


class Plan(BaseModel):
    model: str
    engine: str
    route: str
    fallback_reason: str | None = None
    context_limit: int  # the working context: the model's, or less (--context, memory)
    model_context: int | None = None
    document_tokens: int
    tokens_exact: bool = True  # False: counted without the model's tokenizer (estimate)
    prompt_overhead: int = 0  # template, system prompt and the longest task around the document
    reserve_tokens: int  # output tokens reserved per answer
    mode: Literal["single", "map-reduce", "cannot-run"]
    chunk_budget: int | None = None
    overlap: int = 0
    chunks: list[ChunkPlan] = Field(default_factory=list)
    reduce_group: int | None = None  # notes per reduce step
    tasks: list[Task] = Field(default_factory=list)
    thinking: bool | None = None
    thinking_supported: bool = False
    prefill_tokens: int = 0
    warmup_tps: float | None = None
    prefill_seconds: float | None = None
    generate_tokens: int = 0  # at most: every unit may run to the reserved answer length
    decode_tps: float | None = None
    generate_seconds: float | None = None
    seconds: float | None = None  # prefill + generation, when both rates are known
    rates_from: str | None = None  # "warm-up" (measured now) or "an earlier run on this machine"
    cached_prefix: bool = False  # the document's prompt cache is on disk already
    nodes: list[NodeMemory] = Field(default_factory=list)
    memory: MemoryPlan | None = None
    explanation: list[str] = Field(default_factory=list)
    suggestions: list[str] = Field(default_factory=list)
    alternatives: list[Alternative] = Field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return self.mode != "cannot-run"


class Answer(BaseModel):
    """One generated text (a final answer, a chunk's note, or a reduce step) and how it was made."""

    unit: str
    text: str
    token_ids: list[int] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from a prompt cache instead of being prefilled
    generation_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    ttft: float = 0.0
    peak_memory_bytes: int | None = None
    finish_reason: str | None = None
    cache: str | None = None  # memory | disk | prefill | resident (the serving ranks' prefix cache) | none

    @property
    def answer(self) -> str:
        """The text after a thinking block, when there is one."""
        return self.text.split(THINK_END, 1)[1].strip() if THINK_END in self.text else self.text.strip()


# --- prompts ---------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """A chat prompt as a document prefix and a task suffix (token ids), plus the same as messages."""

    head: str  # user text before the task
    tail: str  # the task
    prefix: list[int] = field(default_factory=list)
    suffix: list[int] = field(default_factory=list)
    cacheable: bool = True  # worth keeping the prefix (a document or a chunk), not a one-off reduce prompt
    thinking: bool | None = None  # the template's enable_thinking (None: the template's default)

    @property
    def tokens(self) -> int:
        return len(self.prefix) + len(self.suffix)

    def messages(self) -> list[Message]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.head + self.tail}]


HEADS_KEPT = 4  # tokenized document prefixes a Prompter keeps
COUNT_PIECE = 1 << 20  # characters counted per tokenizer call


class Prompter:
    """Renders prompts with the model's chat template and cuts them where the task begins.

    The prefix and the suffix are tokenized separately and joined, so every question's token sequence starts
    with exactly the same prefix tokens (tokenizing the whole text could merge tokens across the cut).
    """

    def __init__(self, tokenizer: Any | None, thinking: bool | None = None):
        self.tok = tokenizer
        template = getattr(tokenizer, "chat_template", None) or ""
        self.thinking_supported = "enable_thinking" in str(template)
        self.thinking = thinking if self.thinking_supported else None
        # head -> (prefix ids, template text after the cut): every task on the same document (or chunk)
        # reuses one tokenization of it, which at 262k tokens takes seconds.
        self._heads: dict[str, tuple[list[int], str]] = {}

    @property
    def exact(self) -> bool:
        return self.tok is not None

    def count(self, text: str) -> int:
        if self.tok is None:
            return max(1, round(len(text) / 3.5))  # no tokenizer (a remote model): a conservative guess
        if len(text) > COUNT_PIECE:  # in pieces cut after line ends: the token ids of 16 MB would take GBs
            return sum(self.count(text[a:b]) for a, b in documents._cut(text, 0, len(text), COUNT_PIECE))
        return len(self.tok.encode(text, add_special_tokens=False))

    def _render(self, head: str) -> str:
        kw = {} if self.thinking is None else {"enable_thinking": self.thinking}
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": head + SENTINEL}]
        try:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        except Exception:  # noqa: BLE001 - templates without a system role: fold it into the user turn
            msgs = [{"role": "user", "content": f"{SYSTEM}\n\n{head}{SENTINEL}"}]
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)

    def build(self, head: str, tail: str, cacheable: bool = True) -> Prompt:
        p = Prompt(head, tail, cacheable=cacheable, thinking=self.thinking)
        if self.tok is None:
            p.prefix = [0] * self.count(SYSTEM + head)
            p.suffix = [0] * (self.count(tail) + 16)
            return p
        if head not in self._heads:
            text = self._render(head)
            if SENTINEL not in text:
                raise DocJobError("the model's chat template drops the user's text; this model cannot run "
                                  "document jobs")
            before, after = text.split(SENTINEL, 1)
            bos = getattr(self.tok, "bos_token", None)
            if len(self._heads) >= HEADS_KEPT:
                self._heads.pop(next(iter(self._heads)))  # the oldest: map-reduce moves chunk by chunk
            self._heads[head] = (self.tok.encode(before, add_special_tokens=not (bos and before.startswith(bos))),
                                 after)
        prefix, after = self._heads[head]
        p.prefix = list(prefix)
        p.suffix = self.tok.encode(tail + after, add_special_tokens=False)
        return p


def task_tail(task: Task, stage: Literal["single", "map", "reduce"]) -> str:
    if task.kind == "ask":
        return {"single": f"Question: {task.text}",
                "map": f"Question: {task.text}\nAnswer from this part only; if it does not say, answer briefly "
                       "that this part does not say.",
                "reduce": f"Question: {task.text}\nCombine the notes into one answer."}[stage]
    if task.kind == "summarize":
        return {"single": "Summarize the document.", "map": "Summarize this part.",
                "reduce": "Combine the notes into one summary of the whole document."}[stage]
    return {"single": task.text, "map": f"{task.text}\n(Apply this to this part only.)",
            "reduce": f"{task.text}\nCombine the notes into one answer."}[stage]


def single_head(doc_text: str) -> str:
    return f"Document:\n\n{doc_text}\n\n"


def map_head(chunk_text: str, i: int, n: int) -> str:
    return f"Part {i + 1} of {n} of a document:\n\n{chunk_text}\n\n"


def reduce_head(notes: list[str], first: int, total: int) -> str:
    body = "\n\n".join(f"[Part {first + i + 1}]\n{note}" for i, note in enumerate(notes))
    return f"Notes on parts {first + 1} to {first + len(notes)} of {total} of one document, in order:\n\n{body}\n\n"


# --- runners: where the tokens come from --------------------------------------------------------------


class Reporter:
    """Progress callbacks; the command line draws bars, tests and the library use this silent one."""

    def plan(self, plan: Plan) -> None: ...
    def unit_start(self, unit: str, label: str, prompt_tokens: int, max_tokens: int) -> None: ...
    def prefill(self, done: int, total: int) -> None: ...
    def token(self, generated: int) -> None: ...
    def unit_done(self, answer: Answer, resumed: bool = False) -> None: ...


class MlxRunner:
    """The MLX engine in this process (its rank loop in a thread, engines/mlx.py): token-level prompts, and the
    engine's prefix cache, which keeps each document (several, within its memory budget) and its restore points in
    memory and on this node's disk."""

    engine = "mlx"
    local = True

    def __init__(self, eng: Any, *, model_id: str, path: Path | None = None, info: Any = None, route: str = "local",
                 fallback_reason: str | None = None, use_cache: bool = True, step: int = DEFAULT_STEP):
        self.eng, self.tokenizer = eng, eng.tokenizer
        self.model_id, self.path, self.info = model_id, path, info
        self.route, self.fallback_reason = route, fallback_reason
        self.use_cache, self.step = use_cache, step
        self.cache_hits = {"memory": 0, "disk": 0, "prefill": 0}
        self.decode_tps: float | None = None  # measured by warmup()

    @property
    def context_length(self) -> int | None:
        return getattr(self.info, "context_length", None)

    def cached_on_disk(self, prompt: Prompt) -> bool:
        return self.use_cache and _saved_on_disk(self.path, prompt)

    def _run(self, tokens: list[int], max_tokens: int) -> Any:
        from .engines.base import collect

        return collect(self.eng.stream_ids(tokens, max_tokens=max_tokens, cache=False)).stats

    def warmup(self, tokens: list[int], n: int = WARMUP_TOKENS) -> float | None:
        """Prefill tokens/s from a short run on a throwaway cache (after a tiny untimed one that compiles); the
        same run's generation rate is kept in decode_tps."""
        n = min(n, len(tokens))
        if n < 8:
            return None
        try:
            self._run(tokens[:8], 2)
            stats = self._run(tokens[:n], DECODE_WARMUP_TOKENS + 1)
        except EngineError as e:
            raise DocJobError(f"{self.model_id}: the warm-up failed: {e}") from None
        self.decode_tps = stats.generation_tps or None
        return stats.prompt_tps or None

    def answer(self, unit: str, prompt: Prompt, *, max_tokens: int, temperature: float,
               reporter: Reporter) -> Answer:
        t0 = time.perf_counter()
        cacheable = self.use_cache and prompt.cacheable and bool(prompt.prefix)
        events = self.eng.stream_ids(prompt.prefix + prompt.suffix, max_tokens=max_tokens, temperature=temperature,
                                     cache=cacheable, point=len(prompt.prefix), enable_thinking=prompt.thinking)
        text, first_at, stats, _ = _drain(events, unit, self.engine, reporter, prompt.tokens)
        stats = stats or Stats()
        end = time.perf_counter()
        first_at = first_at or end
        how = {"memory": "memory", "disk": "disk", "new": "prefill"}.get(stats.cache_source, "none") \
            if cacheable else "none"
        self.cache_hits[how] = self.cache_hits.get(how, 0) + 1
        ids = list((self.eng.last_done or {}).get("ids") or [])
        if stats.finish_reason == "stop":
            ids = ids[:-1]  # the end token is not part of the answer
        return Answer(
            unit=unit, text=text, token_ids=ids, prompt_tokens=prompt.tokens, cached_tokens=stats.cached_tokens,
            generation_tokens=stats.generation_tokens, prefill_seconds=first_at - t0,
            decode_seconds=end - first_at, ttft=first_at - t0, peak_memory_bytes=stats.peak_memory_bytes,
            finish_reason=stats.finish_reason, cache=how)

    def close(self) -> None:
        self.eng.close()


def _drain(events: Iterator[Any], unit: str, engine: str, reporter: Reporter,
           prompt_tokens: int) -> tuple[str, float | None, Any, int]:
    """One unit's events: (text, when its first token came, the final stats, token events seen), with progress
    on the reporter. An engine's failure keeps the finished units: the job resumes once the engine answers."""
    parts: list[str] = []
    first_at, stats, n = None, None, 0
    try:
        for ev in events:
            if ev.kind == "prefill":
                reporter.prefill(ev.done, ev.total or prompt_tokens)
            elif ev.kind == "token":
                first_at = first_at or time.perf_counter()
                parts.append(ev.text)
                n += 1
                reporter.token(n)
            elif ev.kind == "done":
                stats = ev.stats
                if stats is not None and stats.generation_tokens:
                    reporter.token(stats.generation_tokens)  # deltas may carry several tokens each
    except EngineError as e:
        raise DocJobError(f"{engine} failed on {unit}: {e}; finished parts are kept "
                          "(`arthur-cluster doc --resume`)") from None
    return "".join(parts), first_at, stats, n


def _saved_on_disk(folder: Path | None, prompt: Prompt) -> bool:
    """Whether this node's disk holds the document part of `prompt` for the engine in this process (a restore
    point at or past the prefix's end)."""
    from .parallel import prefix
    from .parallel.server import parser

    if folder is None or not prompt.prefix:
        return False
    p = parser()  # the engine's own defaults
    whole = prompt.prefix + prompt.suffix
    saved = prefix.node_store(folder, "single").longest(whole, p.get_default("block"), p.get_default("window"),
                                                        prefix.thinking_flags(prompt.thinking), len(prompt.prefix))
    return saved >= len(prompt.prefix)


class EngineRunner:
    """Any Engine (exo, MLX ranks) spoken to with messages: no control over its prompt cache."""

    def __init__(self, engine: Any, *, tokenizer: Any | None = None, info: Any = None, route: str = "",
                 fallback_reason: str | None = None, context_length: int | None = None):
        self.eng = engine
        self.engine = getattr(engine, "name", "engine")
        self.model_id = engine.model_id
        self.tokenizer, self.info = tokenizer, info
        self.route, self.fallback_reason = route or self.engine, fallback_reason
        self._context = context_length
        self.cache_hits: dict[str, int] = {}

    @property
    def context_length(self) -> int | None:
        return self._context or getattr(self.info, "context_length", None)

    def cached_on_disk(self, prompt: Prompt) -> bool:
        return False

    def warmup(self, tokens: list[int], n: int = WARMUP_TOKENS) -> float | None:
        return None  # measured from the first unit's own prefill instead (the engine reports prompt tok/s)

    def answer(self, unit: str, prompt: Prompt, *, max_tokens: int, temperature: float,
               reporter: Reporter) -> Answer:
        t0 = time.perf_counter()
        events = self.eng.stream(prompt.messages(), max_tokens=max_tokens, temperature=temperature,
                                 enable_thinking=prompt.thinking)
        text, first_at, stats, n = _drain(events, unit, self.engine, reporter, prompt.tokens)
        end = time.perf_counter()
        first_at = first_at or end
        cached = stats.cached_tokens if stats else 0
        return Answer(
            unit=unit, text=text, prompt_tokens=(stats.prompt_tokens if stats else 0) or prompt.tokens,
            generation_tokens=(stats.generation_tokens if stats else 0) or n, prefill_seconds=first_at - t0,
            decode_seconds=end - first_at, ttft=first_at - t0,
            peak_memory_bytes=stats.peak_memory_bytes if stats else None,
            finish_reason=stats.finish_reason if stats else None, cached_tokens=cached,
            cache="resident" if cached else "none")  # resident MLX ranks keep the document's prefix

    def close(self) -> None:
        self.eng.close()


# --- opening a model ---------------------------------------------------------------------------------


def read_deployment() -> Any:
    """The bring-up record (bringup.Deployment), or None when nothing is up."""
    from . import bringup

    try:
        return bringup.read_record()
    except bringup.DeploymentError as e:
        raise DocJobError(str(e)) from None


def resolve_model(name: str) -> tuple[str, Path]:
    """A folder path, a repo id or a short name (modelname.resolve, as every command) -> (repo id, folder)."""
    from . import modelname

    try:
        repo_id, folder = modelname.resolve(name)
    except modelname.ModelNameError as e:
        raise DocJobError(str(e)) from None
    if folder is None:
        raise DocJobError(f"model {name!r} not found in LM Studio, the Hugging Face cache or exo's folders; "
                          "pass the model folder's path or list models with `arthur-cluster models`")
    if not (folder / "config.json").is_file():
        raise DocJobError(f"{folder}: no config.json; pass a model folder (LM Studio or Hugging Face layout)")
    return repo_id, folder


def load_local(folder: Path, model_id: str, *, route: str = "local", fallback_reason: str | None = None,
               use_cache: bool = True, step: int = DEFAULT_STEP) -> MlxRunner:
    """The MLX engine in this process, on one node, for token-level prompts and the document's prefix cache."""
    from . import modelfiles
    from .engines.mlx import MlxEngine

    try:
        info = modelfiles.require_ok(modelfiles.inspect(folder))
    except modelfiles.ModelFileError as e:
        raise DocJobError(str(e)) from None
    try:
        eng = MlxEngine(folder, model_id=model_id, prefill_step=step)
    except EngineError as e:
        raise DocJobError(str(e)) from None
    return MlxRunner(eng, model_id=model_id, path=folder, info=info, route=route, fallback_reason=fallback_reason,
                     use_cache=use_cache, step=step)


class PlanRunner:
    """What a plan needs of a model, without its weights: the tokenizer, the header facts (modelfiles.inspect),
    where it would run and on which nodes. Planning a 31 GB model this way costs megabytes."""

    def __init__(self, *, model_id: str, tokenizer: Any, info: Any, path: Path | None = None, engine: str = "mlx",
                 route: str = "local", fallback_reason: str | None = None, use_cache: bool = True,
                 step: int = DEFAULT_STEP, nodes: list[memory.NodeMemory] | None = None,
                 context_length: int | None = None):
        self.model_id, self.tokenizer, self.info, self.path = model_id, tokenizer, info, path
        self.engine, self.route, self.fallback_reason = engine, route, fallback_reason
        self.use_cache, self.step, self.nodes = use_cache, step, nodes
        self.local = engine == "mlx" and len(nodes or []) <= 1  # mlx-lm in this process, on this machine
        self._context = context_length
        self.model = None  # never loaded: the plan is made from the headers

    @property
    def context_length(self) -> int | None:
        return getattr(self.info, "context_length", None) or self._context

    def cached_on_disk(self, prompt: Prompt) -> bool:
        # the engine in this process reads this node's disk; resident ranks keep their own (counted as prefilled)
        return self.local and self.use_cache and _saved_on_disk(self.path, prompt)

    def warmup(self, tokens: list[int], n: int = WARMUP_TOKENS) -> float | None:
        return None  # no weights: rates come from an earlier run (read_rates), or are measured when the job starts


def _planning_folder(folder: Path) -> tuple[Any, Any]:
    """(tokenizer, ModelInfo) of a model folder from its headers and tokenizer files only."""
    from . import modelfiles

    try:
        info = modelfiles.require_ok(modelfiles.inspect(folder))
    except modelfiles.ModelFileError as e:
        raise DocJobError(str(e)) from None
    return _tokenizer(folder), info


def _tokenizer(folder: Path) -> Any:
    from mlx_lm.utils import load_tokenizer

    try:
        return load_tokenizer(folder)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a broken tokenizer
        raise DocJobError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e}); the plan counts tokens "
                          "with it: restore tokenizer.json / tokenizer_config.json from the model's source") from None


def plan_runner(model: str | None = None, *, use_cache: bool = True, step: int = DEFAULT_STEP) -> PlanRunner:
    """The same choice as open_runner (the deployment's model unless another is asked for), without weights."""
    dep = read_deployment()
    if dep is not None and (model is None or model in (dep.model, dep.served_id, str(dep.model_path))):
        local = dep.engine == "mlx" and dep.route.nodes <= 1 and dep.model_path is not None
        folder = dep.model_path if dep.model_path is not None and Path(dep.model_path).is_dir() else None
        tok, info = _planning_folder(folder) if folder else (None, None)
        ctx = None
        if info is None:
            try:
                ctx = catalog.load().entry(dep.model).context_length
            except catalog.CatalogError:
                ctx = None
        return PlanRunner(model_id=dep.model if local else dep.served_id, tokenizer=tok, info=info, path=folder,
                          engine=dep.engine, route=dep.route.label, fallback_reason=dep.fallback_reason,
                          use_cache=use_cache, step=step, context_length=ctx,
                          nodes=[this_machine()] if local else deployment_nodes(dep))
    if model is None:
        raise DocJobError("no model: pass --model PATH|REPO_ID, or bring a cluster up first "
                          "(`arthur-cluster up`) so the job runs on its deployment")
    repo_id, folder = resolve_model(model)
    tok, info = _planning_folder(folder)
    return PlanRunner(model_id=repo_id, tokenizer=tok, info=info, path=folder, use_cache=use_cache, step=step,
                      nodes=[this_machine()])


def open_runner(model: str | None = None, *, use_cache: bool = True, step: int = DEFAULT_STEP) -> Any:
    """The deployment's engine when one is up (and no other model was asked for), else mlx-lm locally."""
    dep = read_deployment()
    if dep is not None and (model is None or model in (dep.model, dep.served_id, str(dep.model_path))):
        return _from_deployment(dep, use_cache=use_cache, step=step)
    if model is None:
        raise DocJobError("no model: pass --model PATH|REPO_ID, or bring a cluster up first "
                          "(`arthur-cluster up`) so the job runs on its deployment")
    repo_id, folder = resolve_model(model)
    return load_local(folder, repo_id, use_cache=use_cache, step=step)


def _from_deployment(dep: Any, *, use_cache: bool, step: int) -> Any:
    """A runner on what bring-up deployed: mlx-lm in this process for one node (so the prompt cache is ours),
    otherwise the deployment's own engine: exo's API, or the resident MLX ranks' endpoint (which keep the
    document's prefix cache themselves, so later questions prefill only themselves)."""
    from . import bringup

    route, reason = dep.route.label, dep.fallback_reason
    if dep.engine == "mlx" and dep.route.nodes <= 1 and dep.model_path is not None and dep.resident is None:
        return load_local(dep.model_path, dep.model, route=route, fallback_reason=reason,
                          use_cache=use_cache, step=step)
    try:
        eng = bringup.engine_for(dep)
    except (EngineError, bringup.DeploymentError) as e:
        raise DocJobError(f"{paths.deployment_file()}: {e}") from None
    tok, info = _tokenizer_and_info(dep.model_path)
    return EngineRunner(eng, tokenizer=tok, info=info, route=route, fallback_reason=reason)


def _tokenizer_and_info(folder: Path | None) -> tuple[Any, Any]:
    """The model's tokenizer and header facts when its files are on this machine, else (None, None)."""
    if folder is None or not folder.is_dir():
        return None, None
    from mlx_lm.utils import load_tokenizer

    from . import modelfiles

    return load_tokenizer(folder), modelfiles.inspect(folder)


# --- planning ----------------------------------------------------------------------------------------


def _deployed_route(runner: Any) -> Route | None:
    """The deployment's Route for a runner that runs (or plans) on it; None for a model in this process."""
    if isinstance(runner, EngineRunner) or (isinstance(runner, PlanRunner) and not runner.local):
        dep = read_deployment()
        return dep.route if dep is not None else None
    return None


def this_machine() -> memory.NodeMemory:
    from .cluster import local_node

    return local_node()


def _exo_node_memory(dep: Any) -> dict[str, memory.NodeMemory]:
    """Each exo node's memory from exo's own state (what pick and probe judge exo routes by); empty when exo
    does not answer (the plan then says the memory is unknown)."""
    from .cluster import exo_client
    from .exo_client import ExoError

    try:
        state = exo_client(dep.endpoint).state()
    except ExoError:
        return {}
    return {n.node_id: n.memory() for n in state.nodes.values()}


def deployment_nodes(dep: Any) -> list[memory.NodeMemory]:
    """Node memory for the deployment's nodes: exo's state for an exo deployment, else models.toml's cluster
    section by name (or this machine)."""
    if dep is None or not dep.nodes:
        return [this_machine()]
    if dep.engine == "exo" and dep.endpoint:
        live = _exo_node_memory(dep)
        if live:
            return [live.get(name) or memory.NodeMemory(name=name) for name in dep.nodes]
    known: dict[str, int | None] = {}
    try:
        cat = catalog.load()
        known = {n.name: n.memory_bytes for n in (cat.cluster.nodes if cat.cluster else [])}
    except catalog.CatalogError:
        pass
    return [memory.NodeMemory(name=name, memory_bytes=known.get(name)) for name in dep.nodes]


def split_of(route: Route | None, n_nodes: int) -> memory.Split:
    """How the plan divides the model: the deployment's route (Route.split), one node holding all of it."""
    if n_nodes <= 1 or route is None:
        return "single" if n_nodes <= 1 else "pipeline"
    return route.split


def _apple(runner: Any, nodes: list[NodeMemory] | None = None) -> bool:
    """How the nodes run attention, as pick and probe judge it: what the nodes say of themselves (exo's chip
    or backends); else a deployment's nodes (exo's, [cluster]'s) are Macs; mlx-lm in this process, and nodes
    "like this one", run on this machine."""
    said = [n.apple for n in nodes or [] if n.apple is not None]
    if said:
        return all(said)
    if isinstance(runner, EngineRunner) or (isinstance(runner, PlanRunner) and not runner.local):
        return True
    return memory.machine_is_apple()


def _memory_plan(runner: Any, context: int, nodes: list[memory.NodeMemory], split: memory.Split,
                 step: int) -> memory.MemoryPlan | None:
    try:
        source = runner.info if runner.info is not None else catalog.load().entry(runner.model_id)
        return memory.fit(source, context=context, nodes=nodes, split=split, prefill_step=step,
                          apple=_apple(runner, nodes), name=runner.model_id)
    except (memory.PlanError, catalog.CatalogError):
        return None


def _max_fitting_context(runner: Any, hi: int, nodes: list[memory.NodeMemory], split: memory.Split,
                         step: int) -> int:
    """The largest context (a multiple of 256) whose memory plan fits every node; 0 when none does."""
    lo, best = 1, 0
    hi_steps = hi // memory.KV_STEP
    while lo <= hi_steps:
        mid = (lo + hi_steps) // 2
        mp = _memory_plan(runner, mid * memory.KV_STEP, nodes, split, step)
        if mp is None or mp.fits is not False:
            best, lo = mid, mid + 1
        else:
            hi_steps = mid - 1
    return best * memory.KV_STEP


def _nodes_needed(runner: Any, context: int, node: memory.NodeMemory, step: int, upto: int = 16) -> int | None:
    for k in range(2, upto + 1):
        nodes = [node.model_copy(update={"name": f"node{i}"}) for i in range(k)]
        mp = _memory_plan(runner, context, nodes, "pipeline", step)
        if mp is not None and mp.fits:
            return k
    return None


def _alternatives(runner: Any, need: int, nodes: list[memory.NodeMemory], split: memory.Split,
                  step: int) -> list[Alternative]:
    """The catalogue's other models: does the whole document fit their context, and their memory here?"""
    try:
        cat = catalog.load()
    except catalog.CatalogError:
        return []
    out = []
    for rid in cat.candidates():
        if rid == runner.model_id:
            continue
        e = cat.entry(rid)
        fits_ctx = e.context_length is not None and e.context_length >= need
        mem_fits = None
        if fits_ctx and e.storage_bytes:
            try:
                mem_fits = memory.plan(e, context=need, nodes=nodes, split=split, prefill_step=step).fits
            except memory.PlanError:
                mem_fits = None
        out.append(Alternative(model=rid, context_length=e.context_length, single_pass=fits_ctx,
                               memory_fits=mem_fits))
    return out


def plan_job(doc: Document, tasks: list[Task], runner: Any, *, max_tokens: int = DEFAULT_MAX_TOKENS,
             context: int | None = None, thinking: bool | None = None, nodes: list[memory.NodeMemory] | None = None,
             warmup: bool = True, overlap: float = 0.1) -> Plan:
    """Decide single pass or map-reduce, chunk the document, check memory on every node, estimate time."""
    prompter = Prompter(runner.tokenizer, thinking)
    # mlx-lm in this process runs on this machine; any other engine runs where the deployment put it.
    nodes = nodes or getattr(runner, "nodes", None) or \
        deployment_nodes(read_deployment() if isinstance(runner, EngineRunner) else None)
    split = split_of(_deployed_route(runner), len(nodes))
    step = getattr(runner, "step", DEFAULT_STEP)
    model_ctx = runner.context_length
    limit = min(x for x in (model_ctx, context) if x) if (model_ctx or context) else None
    if limit is None:
        raise DocJobError(f"{runner.model_id}: its context length is unknown; pass --context N")
    doc_tokens = prompter.count(doc.text)
    # A document that cannot fit one pass is not tokenized again inside the template: the prompt's overhead
    # is measured around an empty document instead (planning stays one pass over the text, plus chunking).
    whole = doc_tokens + max_tokens <= limit
    singles = [prompter.build(single_head(doc.text if whole else ""), task_tail(t, "single")) for t in tasks]
    need = max(p.tokens for p in singles) + max_tokens + (0 if whole else doc_tokens)
    plan = Plan(model=runner.model_id, engine=runner.engine, route=runner.route,
                fallback_reason=runner.fallback_reason, context_limit=limit, model_context=model_ctx,
                document_tokens=doc_tokens, tokens_exact=prompter.exact, prompt_overhead=need - max_tokens - doc_tokens,
                reserve_tokens=max_tokens, mode="single", tasks=tasks, thinking=prompter.thinking,
                thinking_supported=prompter.thinking_supported, nodes=nodes)
    mem_limit = limit
    mp = _memory_plan(runner, min(need, limit), nodes, split, step)
    if mp is not None and mp.fits is False:
        mem_limit = _max_fitting_context(runner, min(need, limit), nodes, split, step)
        plan.explanation.append(
            f"memory: {_node_shortfall(mp)}; the nodes hold at most {mem_limit:,} tokens of context")
        if mem_limit:
            mp = _memory_plan(runner, mem_limit, nodes, split, step)
    plan.memory = mp
    work = min(limit, mem_limit)
    if need <= work:
        plan.explanation.insert(0, f"single pass: {need:,} tokens (document {doc_tokens:,} + prompt "
                                   f"{plan.prompt_overhead:,} + {max_tokens:,} reserved for the answer) fit the "
                                   f"{work:,}-token context")
        # With the prompt cache the document is prefilled once for every question; without it, once each.
        plan.prefill_tokens = singles[0].tokens + sum(len(p.suffix) if _caches(runner) else p.tokens
                                                      for p in singles[1:])
        plan.cached_prefix = runner.cached_on_disk(singles[0])
    else:
        _plan_map_reduce(plan, doc, tasks, prompter, work, need, max_tokens, overlap)
        if plan.feasible:
            plan.prefill_tokens = _map_reduce_prefill(plan, prompter, _caches(runner))
        plan.alternatives = _alternatives(runner, need, nodes, split, step)
        _suggest(plan, runner, need, nodes, split, step, mem_limit < limit, work)
    if plan.feasible:
        first = singles[0] if whole else _warmup_prompt(prompter, doc, tasks[0])
        _estimate_time(plan, runner, first, measure=warmup)
    return plan


def _node_shortfall(mp: memory.MemoryPlan) -> str:
    worst = [n for n in mp.nodes if n.fits is False]
    return "; ".join(f"{n.node} needs {memory.human_bytes(n.total)} of {memory.human_bytes(n.budget)}"
                     for n in worst)


def _plan_map_reduce(plan: Plan, doc: Document, tasks: list[Task], prompter: Prompter, work: int, need: int,
                     max_tokens: int, overlap: float) -> None:
    empty = max(prompter.build(map_head("", 99, 99), task_tail(t, "map")).tokens for t in tasks)
    budget = work - empty - max_tokens - 4  # 4: the part numbers may take more digits than "99"
    reduce_empty = max(prompter.build(reduce_head([], 99, 99), task_tail(t, "reduce")).tokens for t in tasks)
    group = (work - reduce_empty - max_tokens) // (max_tokens + NOTE_SEPARATOR)
    why = (f"the document needs {need:,} tokens (document {plan.document_tokens:,} + prompt "
           f"{plan.prompt_overhead:,} + {max_tokens:,} reserved) but the working context is {work:,}")
    if budget < MIN_CHUNK or group < 2:
        plan.mode = "cannot-run"
        plan.explanation.insert(0, why + (f"; map-reduce needs room for a chunk of at least {MIN_CHUNK} tokens and "
                                          f"two notes of {max_tokens} tokens in one context, and {work:,} is too small"))
        return
    chunks = documents.chunk(doc.text, prompter.count, budget, overlap=int(budget * overlap))
    plan.mode, plan.chunk_budget, plan.overlap, plan.reduce_group = "map-reduce", budget, int(budget * overlap), group
    plan.chunks = [ChunkPlan(index=c.index, start=c.start, end=c.end, tokens=c.tokens) for c in chunks]
    plan.explanation.insert(0, why + f": map-reduce over {len(chunks)} chunks of up to {budget:,} tokens "
                                     f"({plan.overlap:,} overlapping), then reduce {group} notes at a time")


def _caches(runner: Any) -> bool:
    """Whether the runner reuses a document's (or chunk's) prefill across tasks: mlx-lm in this process does,
    unless --no-cache; an engine behind an API is counted as prefilling every prompt whole."""
    return bool(getattr(runner, "use_cache", False)) and not isinstance(runner, EngineRunner) and \
        getattr(runner, "local", True)


def _map_reduce_prefill(plan: Plan, prompter: Prompter, caches: bool) -> int:
    """Tokens prefilled by the map and reduce units: each chunk once (with the cache) or once per task, each
    reduce prompt whole (notes counted at their full reserved length: an upper bound)."""
    tasks, n = plan.tasks, len(plan.chunks)
    map_empty = max(prompter.build(map_head("", 99, 99), task_tail(t, "map")).tokens for t in tasks)
    suffix = max(len(prompter.build(map_head("", 99, 99), task_tail(t, "map")).suffix) for t in tasks)
    chunks = sum(c.tokens for c in plan.chunks) + n * map_empty
    maps = chunks + (len(tasks) - 1) * (n * suffix if caches else chunks)
    reduce_empty = max(prompter.build(reduce_head([], 99, 99), task_tail(t, "reduce")).tokens for t in tasks)
    per_task = unit_count(plan) // len(tasks) - n  # reduce units of one task
    notes = n + per_task - 1  # every note but the final answer is read by one reduce unit
    reduces = per_task * reduce_empty + notes * (plan.reserve_tokens + NOTE_SEPARATOR)
    return maps + len(tasks) * reduces


def _suggest(plan: Plan, runner: Any, need: int, nodes: list[memory.NodeMemory], split: memory.Split, step: int,
             memory_bound: bool, work: int) -> None:
    # The weights alone leave no room for a working context: neither the reserve nor --context is the cause.
    no_room = memory_bound and work - plan.prompt_overhead - 5 < MIN_CHUNK
    ctx_ok = [a for a in plan.alternatives if a.single_pass and a.memory_fits is not False]
    if ctx_ok:
        lead = ("a model that fits this memory and holds the whole document" if memory_bound else
                "for a single pass use a model whose context holds the whole document")
        plan.suggestions.append(f"{lead}: " + ", ".join(f"{a.model} ({a.context_length:,} tokens)" for a in ctx_ok))
    elif plan.model_context is not None and need > plan.model_context:
        longest = max([plan.model_context] + [a.context_length or 0 for a in plan.alternatives])
        plan.explanation.append(f"no candidate model holds the whole document in one pass: it needs {need:,} tokens, "
                                f"the longest context among them is {longest:,}")
    if memory_bound and nodes and nodes[0].budget:
        k = _nodes_needed(runner, min(need, plan.context_limit), max(nodes, key=lambda n: n.budget or 0), step)
        if k:
            plan.suggestions.append(f"more nodes: {k} nodes like {nodes[0].name} hold the full context "
                                    "(pipeline split)")
    if plan.model_context and need <= plan.model_context and plan.context_limit < need and not memory_bound:
        plan.suggestions.append(f"--context {need} (or none: the model allows {plan.model_context:,}) runs it in "
                                "one pass")
    if plan.mode == "cannot-run" and no_room:
        plan.suggestions.append(f"a lower-bit quantization of {plan.model}, or a smaller model: its weights alone "
                                "fill the memory of the nodes")
    elif plan.mode == "cannot-run":
        plan.suggestions.append("a smaller --max-tokens leaves more room for the document in each chunk")
        if plan.context_limit < (plan.model_context or 0):
            plan.suggestions.append(f"a longer --context (the model allows {plan.model_context:,})")


def unit_count(plan: Plan) -> int:
    """Units the plan runs: one answer per task, or a note per chunk and task plus the reduce tree per task."""
    if plan.mode == "single":
        return len(plan.tasks)
    n, group, reduces = len(plan.chunks), max(plan.reduce_group or 2, 2), 0
    while True:
        n = -(-n // group)
        reduces += n
        if n == 1:
            break
    return len(plan.tasks) * (len(plan.chunks) + reduces)


def _estimate_time(plan: Plan, runner: Any, first: Prompt, measure: bool = True) -> None:
    plan.generate_tokens = unit_count(plan) * plan.reserve_tokens
    if plan.cached_prefix and plan.mode == "single":
        plan.prefill_seconds = 0.0
    elif measure:
        tps = runner.warmup(first.prefix)
        if tps:
            plan.warmup_tps, plan.rates_from = tps, "warm-up"
            plan.prefill_seconds = plan.prefill_tokens / tps
    # measured by the warm-up of the engine in this process; runners without one here measure nothing
    decode = getattr(runner, "decode_tps", None) if measure else None
    if decode:
        plan.decode_tps, plan.rates_from = decode, plan.rates_from or "warm-up"
    _apply_rates(plan, runner)


def _apply_rates(plan: Plan, runner: Any) -> None:
    """Fill what the warm-up did not measure from an earlier run of this model on this machine, then total."""
    saved = read_rates(runner)
    if plan.prefill_seconds is None and saved.get("prefill_tps"):
        plan.warmup_tps, plan.rates_from = saved["prefill_tps"], "an earlier run on this machine"
        plan.prefill_seconds = plan.prefill_tokens / saved["prefill_tps"]
    if plan.decode_tps is None and saved.get("decode_tps"):
        plan.decode_tps = saved["decode_tps"]
        plan.rates_from = plan.rates_from or "an earlier run on this machine"
    if plan.decode_tps:
        plan.generate_seconds = plan.generate_tokens / plan.decode_tps
    if plan.prefill_seconds is not None and plan.generate_seconds is not None:
        plan.seconds = plan.prefill_seconds + plan.generate_seconds


DECODE_WARMUP_TOKENS = 16


def _warmup_prompt(prompter: Prompter, doc: Document, task: Task) -> Prompt:
    """A prompt on the document's first characters: enough tokens for the warm-up, not the whole text."""
    return prompter.build(single_head(doc.text[: WARMUP_TOKENS * 16]), task_tail(task, "single"))


def estimate_time(plan: Plan, runner: Any, doc: Document) -> None:
    """Time the plan with the loaded runner: prefill and generation rates measured on the document's start."""
    if plan.feasible:
        _estimate_time(plan, runner, _warmup_prompt(Prompter(runner.tokenizer, plan.thinking), doc, plan.tasks[0]))


def _rates_file() -> Path:
    return paths.state_dir() / "rates.json"


def _rates_key(runner: Any) -> str:
    from .cluster import local_node

    # The model id and route, not the weights' identity: an engine behind an API (which records) and the
    # planner (which has the folder) must find the same entry.
    return f"{runner.model_id}@{runner.route}@{local_node().name}"


def _saved_rates() -> dict:
    """Every recorded entry of rates.json ({} when it is missing or not a small JSON object)."""
    try:
        saved = safeio.read_json(_rates_file())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def read_rates(runner: Any) -> dict:
    entry = _saved_rates().get(_rates_key(runner))
    if not isinstance(entry, dict):
        return {}
    return {k: float(v) for k, v in entry.items() if k in ("prefill_tps", "decode_tps")
            and isinstance(v, (int, float)) and v > 0}


def record_rates(runner: Any, result: dict) -> None:
    """Keep a finished job's measured rates, so a later plan (which loads no weights) can estimate time."""
    rates = {k: result.get(k) for k in ("prefill_tps", "decode_tps") if (result.get(k) or 0) > 0}
    if not rates:
        return
    saved = _saved_rates()
    saved[_rates_key(runner)] = rates
    try:
        write_json(_rates_file(), saved)
    except OSError:
        pass  # a read-only state dir only costs later estimates


# --- the job directory ---------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    paths.write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def job_key(doc: Document, tasks: list[Task], model_id: str, max_tokens: int, thinking: bool | None,
            context: int | None) -> str:
    h = hashlib.sha256(json.dumps([doc.sha256, [t.model_dump() for t in tasks], model_id, max_tokens, thinking,
                                   context]).encode())
    return h.hexdigest()[:12]


class _Options(BaseModel):
    max_tokens: int
    thinking: bool | None = None
    context: int | None = None


class _DocumentMeta(BaseModel):
    sha256: str
    files: list[str]


class JobMeta(BaseModel):
    """The parts of job.json that resuming reads; a damaged file is refused in one line, never a traceback."""

    model: str
    options: _Options
    tasks: list[Task]
    document: _DocumentMeta
    status: str = "planned"
    model_path: str | None = None


class Job:
    """A job directory: job.json, document.txt, units/<unit>.json as each finishes, then the outputs."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)

    @property
    def meta_file(self) -> Path:
        return self.dir / "job.json"

    def meta(self) -> dict:
        try:
            meta = json.loads(self.meta_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DocJobError(f"{self.dir}: not a job directory (no job.json)") from None
        except (OSError, ValueError, RecursionError) as e:
            raise DocJobError(f"{self.meta_file}: unreadable ({type(e).__name__}: {e}); "
                              "the job cannot be resumed: start it again") from None
        try:
            JobMeta.model_validate(meta)
        except ValueError as e:
            first = e.errors()[0] if hasattr(e, "errors") and e.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ())) or "the top level"
            raise DocJobError(f"{self.meta_file}: damaged ({where}: {first.get('msg', e)}); the job cannot be "
                              "resumed: start it again") from None
        return meta

    def set_status(self, status: str) -> None:
        meta = self.meta()
        meta["status"] = status
        write_json(self.meta_file, meta)

    def unit_file(self, unit: str) -> Path:
        return self.dir / "units" / f"{unit}.json"

    def done(self, unit: str) -> Answer | None:
        f = self.unit_file(unit)
        if not f.is_file():
            return None
        try:
            return Answer.model_validate_json(f.read_text(encoding="utf-8"))
        except ValueError:
            return None  # a damaged unit is simply run again

    def save(self, answer: Answer) -> None:
        paths.write_atomic(self.unit_file(answer.unit), answer.model_dump_json(indent=2))

    def document(self) -> Document:
        meta = self.meta()
        path = self.dir / "document.txt"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else f"not UTF-8 at byte {e.start}"
            raise DocJobError(f"{path}: unreadable ({why}); the job cannot be resumed: start it again") from None
        doc = Document(text, [documents.Source(n, "", "text") for n in meta["document"]["files"]])
        if doc.sha256 != meta["document"]["sha256"]:
            raise DocJobError(f"{self.dir / 'document.txt'} was changed since the job started; start a new job")
        return doc


def create_job(doc: Document, tasks: list[Task], runner: Any, *, max_tokens: int, thinking: bool | None,
               context: int | None, out: Path | None = None) -> Job:
    key = job_key(doc, tasks, runner.model_id, max_tokens, thinking, context)
    job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + key[:6]
    folder = Path(out) if out else paths.jobs_dir() / job_id
    if (folder / "job.json").exists():
        raise DocJobError(f"{folder} already holds a job; continue it with --resume or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(folder / "document.txt", doc.text)
    write_json(folder / "job.json", {
        "id": folder.name, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "planned",
        "model": runner.model_id, "model_path": str(getattr(runner, "path", None) or "") or None,
        "engine": runner.engine, "route": runner.route,
        "fallback_reason": runner.fallback_reason,
        "options": {"max_tokens": max_tokens, "thinking": thinking, "context": context},
        "tasks": [t.model_dump() for t in tasks],
        "document": {"sha256": doc.sha256, "files": doc.names, "chars": len(doc.text)},
    })
    return Job(folder)


def find_job(out: Path | None, key: str | None = None) -> Job:
    """The job to resume: --out's, else the newest unfinished one (matching the inputs when given)."""
    if out is not None:
        job = Job(out)
        job.meta()
        return job
    root = paths.jobs_dir()
    for folder in sorted(root.glob("*/job.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            meta = Job(folder.parent).meta()
        except DocJobError:
            continue  # someone else's broken folder; --out names it directly
        if meta.get("status") != "done" and (key is None or meta.get("key") == key):
            return Job(folder.parent)
    raise DocJobError(f"no unfinished job to resume under {root}; pass --out DIR to name one, or start a new job")


# --- running -----------------------------------------------------------------------------------------


@dataclass
class RunState:
    answers: dict[str, Answer] = field(default_factory=dict)  # task id -> final answer
    units: list[Answer] = field(default_factory=list)  # every unit of this job, resumed ones included
    fresh: list[Answer] = field(default_factory=list)  # the units this process ran
    resumed: int = 0


def _unit(job: Job, runner: Any, state: RunState, reporter: Reporter, unit: str, label: str, prompt: Prompt,
          max_tokens: int, temperature: float) -> Answer:
    prev = job.done(unit)
    if prev is not None:
        state.resumed += 1
        state.units.append(prev)
        reporter.unit_done(prev, resumed=True)
        return prev
    reporter.unit_start(unit, label, prompt.tokens, max_tokens)
    ans = runner.answer(unit, prompt, max_tokens=max_tokens, temperature=temperature, reporter=reporter)
    job.save(ans)
    state.units.append(ans)
    state.fresh.append(ans)
    reporter.unit_done(ans)
    return ans


def run_job(job: Job, plan: Plan, runner: Any, *, reporter: Reporter | None = None, temperature: float = 0.0) -> dict:
    """Run (or continue) every unit the plan calls for, then write answers.md and result.json."""
    if not plan.feasible:
        raise DocJobError("the plan cannot run: " + "; ".join(plan.explanation + plan.suggestions))
    reporter = reporter or Reporter()
    meta = job.meta()
    max_tokens = meta["options"]["max_tokens"]
    doc = job.document()
    prompter = Prompter(runner.tokenizer, meta["options"]["thinking"])
    state = RunState()
    job.set_status("running")
    if plan.mode == "single":
        for t in plan.tasks:
            p = prompter.build(single_head(doc.text), task_tail(t, "single"))
            state.answers[t.id] = _unit(job, runner, state, reporter, f"answer-{t.id}", t.label, p, max_tokens,
                                        temperature)
    else:
        _map_reduce(job, plan, doc, prompter, runner, state, reporter, max_tokens, temperature)
    result = _result(job, plan, runner, state)
    paths.write_atomic(job.dir / "answers.md", answers_markdown(meta, plan, state))
    write_json(job.dir / "result.json", result)
    job.set_status("done")
    return result


def _map_reduce(job: Job, plan: Plan, doc: Document, prompter: Prompter, runner: Any, state: RunState,
                reporter: Reporter, max_tokens: int, temperature: float) -> None:
    n = len(plan.chunks)
    notes: dict[str, list[str]] = {t.id: [] for t in plan.tasks}
    for c in plan.chunks:  # chunk-major: each chunk's prefix is prefilled once for every task
        text = doc.text[c.start:c.end]
        for t in plan.tasks:
            p = prompter.build(map_head(text, c.index, n), task_tail(t, "map"))
            ans = _unit(job, runner, state, reporter, f"map-c{c.index:04d}-{t.id}",
                        f"part {c.index + 1}/{n}: {t.label}", p, max_tokens, temperature)
            notes[t.id].append(ans.answer)
    group = plan.reduce_group or 2
    for t in plan.tasks:
        level, items = 1, notes[t.id]
        while True:
            groups = [items[i:i + group] for i in range(0, len(items), group)]
            outs = []
            for g, batch in enumerate(groups):
                p = prompter.build(reduce_head(batch, g * group, len(items)), task_tail(t, "reduce"), cacheable=False)
                label = f"reduce {g + 1}/{len(groups)}: {t.label}"
                outs.append(_unit(job, runner, state, reporter, f"reduce-{t.id}-l{level}-g{g:04d}", label, p,
                                  max_tokens, temperature))
            if len(outs) == 1:
                state.answers[t.id] = outs[0]
                break
            items, level = [o.answer for o in outs], level + 1


def _rate(tokens: int, seconds: float) -> float | None:
    """None when nothing was timed (all from cache or resumed, or an engine that reports no times): not 0."""
    return round(tokens / seconds, 2) if tokens > 0 and seconds > 0 else None


def _result(job: Job, plan: Plan, runner: Any, state: RunState) -> dict:
    fresh = state.fresh
    prefilled = sum(u.prompt_tokens - u.cached_tokens for u in fresh)
    peak = max((u.peak_memory_bytes or 0 for u in state.units), default=0) or None
    hits = {"memory": sum(u.cache == "memory" for u in state.units), "disk": sum(u.cache == "disk" for u in state.units),
            "prefill": sum(u.cache == "prefill" for u in state.units), "none": sum(u.cache == "none" for u in state.units)}
    if any(u.cache == "resident" for u in state.units):  # answers from resident MLX ranks' prefix cache
        hits["resident"] = sum(u.cache == "resident" for u in state.units)
    return {
        "job": job.dir.name, "dir": str(job.dir), "model": plan.model, "engine": plan.engine, "route": plan.route,
        "fallback_reason": plan.fallback_reason, "mode": plan.mode, "chunks": len(plan.chunks),
        "tokens": {"document": plan.document_tokens, "prompt": sum(u.prompt_tokens for u in state.units),
                   "cached": sum(u.cached_tokens for u in state.units), "prefilled": prefilled,
                   "generated": sum(u.generation_tokens for u in state.units)},
        "prefill_tps": _rate(prefilled, sum(u.prefill_seconds for u in fresh)),
        "decode_tps": _rate(sum(u.generation_tokens for u in fresh if u.decode_seconds > 0),
                            sum(u.decode_seconds for u in fresh)),
        "ttft_seconds": [round(state.answers[t.id].ttft, 4) for t in plan.tasks if t.id in state.answers],
        "peak_memory_bytes": peak, "cache_hits": hits, "units": len(state.units), "resumed_units": state.resumed,
        "answers": [{"task": t.id, "kind": t.kind, "question": t.text, "answer": state.answers[t.id].answer,
                     "finish_reason": state.answers[t.id].finish_reason} for t in plan.tasks],
    }


def answers_markdown(meta: dict, plan: Plan, state: RunState) -> str:
    files = ", ".join(meta["document"]["files"]) or "stdin"
    lines = [f"# Answers: {files}", "", f"Model: {plan.model} ({plan.engine}, {plan.route}); "
             f"{plan.mode}, {plan.document_tokens:,} document tokens.", ""]
    for t in plan.tasks:
        title = {"ask": f"{t.id}: {t.text}", "summarize": f"{t.id}: Summary", "prompt": f"{t.id}: {t.label}"}[t.kind]
        lines += [f"## {title}", "", state.answers[t.id].answer, ""]
    return "\n".join(lines)


def run(files: list[str], *, asks: list[str] | None = None, summarize: bool = False, prompt: str | None = None,
        model: str | None = None, out: Path | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
        context: int | None = None, thinking: bool | None = None, use_cache: bool = True,
        reporter: Reporter | None = None, runner: Any = None) -> dict:
    """The whole job in one call (the demo and scripts): plan, then run; returns result.json's content."""
    doc = documents.load(files)
    tasks = make_tasks(asks, summarize, prompt)
    if runner is None:  # plan from the headers first: a job that cannot run never loads the weights
        plan = plan_job(doc, tasks, plan_runner(model, use_cache=use_cache), max_tokens=max_tokens,
                        context=context, thinking=thinking, warmup=False)
        if not plan.feasible:
            raise DocJobError("the plan cannot run: " + "; ".join(plan.explanation + plan.suggestions))
        with closing(open_runner(model, use_cache=use_cache)) as runner:  # a runner opened here is closed here
            estimate_time(plan, runner, doc)
            return _run_planned(doc, tasks, plan, runner, out, max_tokens, thinking, context, reporter)
    plan = plan_job(doc, tasks, runner, max_tokens=max_tokens, context=context, thinking=thinking)
    return _run_planned(doc, tasks, plan, runner, out, max_tokens, thinking, context, reporter)


def _run_planned(doc: Document, tasks: list[Task], plan: Plan, runner: Any, out: Path | None, max_tokens: int,
                 thinking: bool | None, context: int | None, reporter: Reporter | None) -> dict:
    (reporter or Reporter()).plan(plan)
    job = create_job(doc, tasks, runner, max_tokens=max_tokens, thinking=thinking, context=context, out=out)
    write_json(job.dir / "plan.json", plan.model_dump(mode="json"))
    return run_job(job, plan, runner, reporter=reporter)



def iter_units(plan: Plan) -> Iterator[str]:
    """Unit ids of the map and answer stages (reduce ids depend on the notes and are found as they run)."""
    if plan.mode == "single":
        yield from (f"answer-{t.id}" for t in plan.tasks)
    else:
        for c in plan.chunks:
            yield from (f"map-c{c.index:04d}-{t.id}" for t in plan.tasks)



def _same_model(runner: Any, meta: dict) -> bool:
    if runner.model_id == meta["model"]:
        return True
    here, there = getattr(runner, "path", None), meta.get("model_path")
    return bool(here and there) and Path(here).resolve() == Path(there).resolve()


def resume(out: Path | None = None, *, model: str | None = None, reporter: Reporter | None = None,
           runner: Any = None, use_cache: bool = True) -> dict:
    """Continue an unfinished job (--out's, else the newest) from the units already written."""
    job = find_job(out)
    meta = job.meta()
    try:
        plan = Plan.model_validate_json((job.dir / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise DocJobError(f"{job.dir}: no readable plan.json; the job never started, start it again") from None
    job.document()  # a missing or damaged document.txt is refused before any model is loaded
    if runner is not None:
        return _resume_on(job, plan, meta, runner, reporter)
    if model is None and meta.get("model_path") and Path(meta["model_path"]).is_dir():
        opened = load_local(Path(meta["model_path"]), meta["model"], use_cache=use_cache)
    else:
        opened = open_runner(model or meta["model"], use_cache=use_cache)
    with closing(opened):
        return _resume_on(job, plan, meta, opened, reporter)


def _resume_on(job: Job, plan: Plan, meta: dict, runner: Any, reporter: Reporter | None) -> dict:
    if not _same_model(runner, meta):
        raise DocJobError(f"{job.dir} was started with {meta['model']}, not {runner.model_id}: its finished "
                          f"parts came from that model; resume it with --model "
                          f"{meta.get('model_path') or meta['model']}")
    (reporter or Reporter()).plan(plan)
    return run_job(job, plan, runner, reporter=reporter)
