"""Zero-copy links from a model folder into the Hugging Face cache and exo: plan -> apply -> verify.

HF cache (layout B of the facts file): models--org--name/blobs/<etag> are absolute symlinks to the source
files, snapshots/<commit>/<file> are relative links to ../../blobs/<etag>, refs/main holds the commit with
no newline. Every deletion the hub offers then removes a link, never a source file.

exo: a read-only links directory holds <org>--<name> -> source folder (or, with exo_index, a real folder
of file links plus a generated index for sources that have none) and a custom model card.

Every entry is built in a staging folder beside its target and renamed into place, under a lock, so a
killed run leaves no half-made entry and the next run cleans up and repairs. Only entries carrying the
linker's record are ever replaced or removed; source folders are only read.
"""

from __future__ import annotations

from .errors import ArthurError

import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal

from pydantic import BaseModel, Field

from . import etags, exocard, paths
from .modelfiles import INDEX_NAME, ModelFileError, ModelInfo, read_header, require_ok

TOOL = "arthur-cluster"
RECORD_VERSION = 1
STAGING = ".arthur-cluster-staging"  # under <cache>/.locks (the hub's scanner skips it) and the exo links dir
EXO_RECORDS = ".arthur-cluster"  # in the exo links dir: one JSON record per link (never inside a source)
LOCK_NAME = "link.lock"
HF_MARKER = paths.LINK_MARKER

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, current file)


class LinkError(ArthurError):
    """A refusal: the message says what is in the way and how to proceed."""


class Action(BaseModel):
    op: Literal["create", "replace", "keep", "remove", "skip"]
    target: str
    detail: str = ""


class LinkedFile(BaseModel):
    name: str
    size: int
    mtime_ns: int
    etag: str
    etag_mode: etags.EtagMode


class LinkResult(BaseModel):
    repo_id: str
    source: Path
    dry_run: bool = False
    hf_repo: Path | None = None
    snapshot: Path | None = None
    commit: str | None = None
    etag_mode: etags.EtagMode | None = None
    exo_link: Path | None = None
    exo_mode: Literal["symlink", "index-dir"] | None = None
    card: Path | None = None
    env_line: str | None = None
    actions: list[Action] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(a.op in ("create", "replace", "remove") for a in self.actions)


class UnlinkResult(BaseModel):
    removed: list[str] = Field(default_factory=list)
    kept: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    dry_run: bool = False


class Finding(BaseModel):
    kind: Literal["broken", "drift", "damaged", "foreign", "dangerous", "stale-record", "leftover", "note"]
    severity: Literal["error", "warning", "note"]
    path: str
    message: str
    fix: str = ""
    repo_id: str | None = None


class DoctorReport(BaseModel):
    hf_cache: Path
    exo_dir: Path
    cards_dir: Path
    checked: dict[str, int] = Field(default_factory=dict)
    findings: list[Finding] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity in ("error", "warning") for f in self.findings)


# --- names ---------------------------------------------------------------------------------------

_ID_PART = re.compile(r"[\w.-]{1,96}")


def check_repo_id(repo_id: str | None) -> str:
    """org/name as the hub accepts it; anything else could name a folder outside the cache."""
    parts = (repo_id or "").split("/")
    ok = len(parts) == 2 and all(
        _ID_PART.fullmatch(p) and not p.startswith(("-", ".")) and not p.endswith(("-", ".")) for p in parts
    ) and "--" not in repo_id and ".." not in repo_id
    if not ok:
        raise LinkError(f"{repo_id!r} is not a usable repo id (org/name of letters, digits, '-', '_', '.'; no '--' "
                        "or '..'): rename the LM Studio folder or pass --repo-id ORG/NAME")
    return repo_id


def _check_rel(name: str) -> str:
    p = Path(name)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts) or "\\" in name:
        raise LinkError(f"file name {name!r} would leave the model folder; the folder is damaged or hostile")
    return name


def _exo_name(repo_id: str) -> str:
    return paths.exo_model_dirname(repo_id)


def env_line(links_dir: Path) -> str:
    dirs = [str(links_dir)] + [str(d) for d in paths.exo_read_only_dirs() if d != links_dir]
    return "EXO_MODELS_READ_ONLY_DIRS=" + shlex.quote(":".join(dirs))


# --- small file helpers ----------------------------------------------------------------------------


@contextmanager
def _lock() -> Iterator[None]:
    """One linker at a time per state dir: concurrent runs queue instead of interleaving renames."""
    state = paths.state_dir()
    state.mkdir(parents=True, exist_ok=True)
    with open(state / LOCK_NAME, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _clean_staging(staging: Path) -> None:
    """Remove what a killed run left. Called under the lock, so nothing in there is in use."""
    if not staging.is_dir():
        return
    for entry in os.scandir(staging):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)  # holds only links and our small files; rmtree never follows links
        else:
            os.unlink(entry.path)


def _swap_in(tmp: Path, target: Path, staging: Path) -> None:
    """Rename tmp onto target. An existing entry is moved aside first (a killed run between the two
    renames leaves no entry and the old one in staging: the next run cleans and rebuilds)."""
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_dir():
            if tmp.is_dir() and not tmp.is_symlink():
                os.unlink(target)  # a folder cannot be renamed over a link
                os.rename(tmp, target)
            else:
                os.replace(tmp, target)
            return
        old = staging / f"{target.name}.old.{os.getpid()}.{secrets.token_hex(4)}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)


def _source_abs(info: ModelInfo) -> Path:
    return Path(os.path.abspath(info.path))


def _inside(child: Path, parent: Path) -> bool:
    try:
        Path(os.path.realpath(child)).relative_to(os.path.realpath(parent))
        return True
    except ValueError:
        return False


# --- HF cache ------------------------------------------------------------------------------------


def _hf_files(info: ModelInfo, true_hashes: bool, previous: dict | None, progress: Progress | None,
              cache: etags.EtagCache) -> list[LinkedFile]:
    source = _source_abs(info)
    reuse = {}
    if previous and previous.get("source") == str(source):
        reuse = {(f["name"], f["size"], f["mtime_ns"]): f["etag"] for f in previous.get("files", [])
                 if f.get("etag_mode") == "true"}
    todo = [f for f in info.files if (true_hashes or not etags.is_lfs(f.name, f.size))
            and (f.name, f.size, f.mtime_ns) not in reuse]
    total = sum(f.size for f in todo)
    done = 0

    def step(n: int, name: str) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total, name)

    out = []
    for f in info.files:
        _check_rel(f.name)
        if (f.name, f.size, f.mtime_ns) in reuse:
            etag, mode = reuse[(f.name, f.size, f.mtime_ns)], "true"
        else:
            etag, mode = etags.etag_for(source / f.name, f.name, f.size, f.mtime_ns, true_hash=true_hashes,
                                        cache=cache, progress=step)
        out.append(LinkedFile(name=f.name, size=f.size, mtime_ns=f.mtime_ns, etag=etag, etag_mode=mode))
    return out


def _commit(repo_id: str, files: list[LinkedFile]) -> str:
    h = hashlib.sha1(f"arthur-cluster commit\0{repo_id}".encode())
    for f in sorted(files, key=lambda f: f.name):
        h.update(f"\0{f.name}\0{f.etag}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _hf_record(repo_id: str, source: Path, commit: str, files: list[LinkedFile]) -> dict:
    modes = {f.etag_mode for f in files if etags.is_lfs(f.name, f.size)} or {"true"}
    return {
        "tool": TOOL, "version": RECORD_VERSION, "kind": "hf-cache", "repo_id": repo_id, "source": str(source),
        "commit": commit, "etag_mode": "true" if modes == {"true"} else "pseudo",
        "files": [f.model_dump() for f in files],
    }


def _blob_rel(name: str, etag: str) -> str:
    return "../" * (2 + name.count("/")) + "blobs/" + etag


def _build_hf(tmp: Path, record: dict) -> None:
    source = record["source"]
    snap = tmp / "snapshots" / record["commit"]
    (tmp / "blobs").mkdir(parents=True)
    (tmp / "refs").mkdir()
    snap.mkdir(parents=True)
    for f in record["files"]:
        blob = tmp / "blobs" / f["etag"]
        if not os.path.lexists(blob):
            os.symlink(os.path.join(source, f["name"]), blob)
        link = snap / f["name"]
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(_blob_rel(f["name"], f["etag"]), link)
    (tmp / "refs" / "main").write_text(record["commit"], encoding="ascii")  # no newline: the hub does not strip
    (tmp / HF_MARKER).write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")


def check_hf_entry(repo_dir: Path, record: dict) -> list[Finding]:
    """Compare a linked repo folder with its record: links in place, sources present and unchanged."""
    rid = record.get("repo_id")
    out: list[Finding] = []
    commit = record.get("commit", "")
    try:
        ref = (repo_dir / "refs" / "main").read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        ref = None
    if ref != commit:
        out.append(Finding(kind="damaged", severity="error", path=str(repo_dir / "refs" / "main"), repo_id=rid,
                           message="refs/main is missing or does not name the linked snapshot",
                           fix=f"run `arthur-cluster link {rid}` to rebuild the entry"))
    source = record.get("source", "")
    if not os.path.isdir(source):
        out.append(Finding(kind="broken", severity="error", path=source, repo_id=rid,
                           message="the source folder was moved or deleted; every link of this entry is broken",
                           fix=f"run `arthur-cluster unlink --stale`, or link {rid} again from its new place"))
        return out
    for f in record.get("files", []):
        snap = repo_dir / "snapshots" / commit / f["name"]
        blob = repo_dir / "blobs" / f["etag"]
        want_src = os.path.join(source, f["name"])
        try:
            links_ok = (os.readlink(snap) == _blob_rel(f["name"], f["etag"])
                        and os.readlink(blob) == want_src)
        except OSError:
            links_ok = False
        if not links_ok:
            out.append(Finding(kind="damaged", severity="error", path=str(snap), repo_id=rid,
                               message="a snapshot or blob link is missing or was changed",
                               fix=f"run `arthur-cluster link {rid}` to rebuild the entry"))
            continue
        out += _source_findings(want_src, f, rid, "the cache entry points at nothing",
                                "its etag no longer describes it", "to relink it")
    return out


def _source_findings(path: str, recorded: dict, rid: str, gone: str, changed: str, relink: str) -> list[Finding]:
    """A linked source file against what the link recorded: gone (broken) or changed since (drift)."""
    try:
        st = os.stat(path)
    except OSError:
        return [Finding(kind="broken", severity="error", path=path, repo_id=rid,
                        message=f"source file moved or deleted; {gone}",
                        fix=f"restore the file, or run `arthur-cluster unlink {rid}`")]
    if st.st_size != recorded["size"] or st.st_mtime_ns != recorded["mtime_ns"]:
        return [Finding(kind="drift", severity="warning", path=path, repo_id=rid,
                        message=f"source file changed since linking (size {recorded['size']} -> {st.st_size}, "
                                f"or modified time); {changed}",
                        fix=f"run `arthur-cluster link {rid}` {relink}")]
    return []


_HF_OURS_TOP = {"blobs", "snapshots", "refs", ".no_exist", HF_MARKER}


def _hf_foreign_content(repo_dir: Path) -> list[str]:
    """Anything in a linked repo folder the linker would not have made (a real download, another ref)."""
    found: list[str] = []
    for root, dirs, files in os.walk(repo_dir):
        rel_root = Path(root).relative_to(repo_dir)
        top = rel_root.parts[0] if rel_root.parts else None
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root) / name
            rel = (rel_root / name).as_posix()
            if top is None:
                if name not in _HF_OURS_TOP:
                    found.append(rel)
            elif top == "refs":
                if rel != "refs/main":
                    found.append(rel)
            elif top in ("blobs", "snapshots"):
                if not path.is_symlink():
                    found.append(rel)  # real bytes: somebody downloaded into this entry
            elif top != ".no_exist":
                found.append(rel)
        if rel_root == Path("."):
            found += [d for d in dirs if d not in _HF_OURS_TOP]
            dirs[:] = [d for d in dirs if d in _HF_OURS_TOP]
    return found


def _hf_state(repo_dir: Path) -> tuple[Literal["absent", "ours", "foreign"], dict | None]:
    if not os.path.lexists(repo_dir):
        return "absent", None
    if repo_dir.is_symlink() or not repo_dir.is_dir():
        return "foreign", None
    marker = repo_dir / HF_MARKER
    if not marker.is_file():
        return "foreign", None
    return "ours", _read_json(marker) or {}


# --- exo -------------------------------------------------------------------------------------------


def _exo_record(repo_id: str, source: Path, mode: str, info: ModelInfo, card: Path | None,
                card_text: str | None) -> dict:
    return {
        "tool": TOOL, "version": RECORD_VERSION, "kind": "exo", "repo_id": repo_id, "source": str(source),
        "mode": mode, "files": [{"name": f.name, "size": f.size, "mtime_ns": f.mtime_ns} for f in info.files],
        "card": str(card) if card else None,
        "card_sha256": hashlib.sha256(card_text.encode()).hexdigest() if card_text else None,
    }


def _generated_index(info: ModelInfo) -> str:
    """model.safetensors.index.json for a source that has none, from its shard headers."""
    weight_map: dict[str, str] = {}
    for shard in info.shards:
        header, _, _ = read_header(info.path / shard)
        weight_map.update({name: shard for name in header})
    index = {"metadata": {"total_size": info.data_bytes, "generated_by": TOOL},
             "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(index, indent=2)


def _build_exo(tmp: Path, record: dict, index_text: str | None) -> None:
    if record["mode"] == "symlink":
        os.symlink(record["source"], tmp)
        return
    tmp.mkdir()
    for f in record["files"]:
        link = tmp / f["name"]
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.join(record["source"], f["name"]), link)
    if index_text is not None:
        (tmp / INDEX_NAME).write_text(index_text, encoding="utf-8")


def exo_complete(entry: Path) -> bool:
    """exo's rule: some *.safetensors.index.json exists and every file of its weight_map exists."""
    indexes = list(entry.glob("**/*.safetensors.index.json")) if entry.is_dir() else []
    if not indexes:
        return False
    for index in indexes:
        data = _read_json(index) or {}
        wm = data.get("weight_map")
        if not isinstance(wm, dict):
            return False
        for shard in set(wm.values()):
            if not (index.parent / shard).exists():
                return False
    return True


def check_exo_entry(entry: Path, record: dict) -> list[Finding]:
    rid = record.get("repo_id")
    out: list[Finding] = []
    source = record.get("source", "")
    if not os.path.lexists(entry):
        return [Finding(kind="stale-record", severity="warning", path=str(entry), repo_id=rid,
                        message="recorded as linked but the link is gone",
                        fix=f"run `arthur-cluster link {rid}` or `arthur-cluster unlink {rid}`")]
    if record.get("mode") == "symlink":
        if not entry.is_symlink() or os.readlink(entry) != source:
            out.append(Finding(kind="damaged", severity="error", path=str(entry), repo_id=rid,
                               message="the exo link no longer points at the recorded source",
                               fix=f"run `arthur-cluster link {rid}` to rebuild it"))
            return out
    elif entry.is_symlink() or not entry.is_dir():
        out.append(Finding(kind="damaged", severity="error", path=str(entry), repo_id=rid,
                           message="expected a folder of links", fix=f"run `arthur-cluster link {rid}`"))
        return out
    if not os.path.isdir(source):
        out.append(Finding(kind="broken", severity="error", path=source, repo_id=rid,
                           message="the source folder was moved or deleted; exo will not find the model",
                           fix=f"run `arthur-cluster unlink --stale`, or link {rid} again from its new place"))
        return out
    for f in record.get("files", []):
        out += _source_findings(os.path.join(source, f["name"]), f, rid, "exo will not find it",
                                "the card's sizes no longer describe it", "to refresh the link and card")
    if not out and not exo_complete(entry):
        out.append(Finding(kind="broken", severity="error", path=str(entry), repo_id=rid,
                           message="exo would not treat this folder as complete (index or a listed shard missing)",
                           fix=f"run `arthur-cluster link {rid} --exo-index`"))
    return out


# --- link ------------------------------------------------------------------------------------------


def _refuse_sources_in_targets(source: Path, hf_cache: Path, exo_dir: Path) -> None:
    if _inside(source, hf_cache):
        raise LinkError(f"{source} is inside the Hugging Face cache {hf_cache}: it is already usable there; "
                        "link LM Studio folders, not cache entries")
    if _inside(source, exo_dir):
        raise LinkError(f"{source} is inside the exo links directory {exo_dir}; link the original folder")
    for target in (hf_cache, exo_dir):
        if _inside(target, source):
            raise LinkError(f"{target} lies inside the model folder {source}; choose a cache or exo directory "
                            "outside it (the linker never writes into a source)")


def link(info: ModelInfo, *, repo_id: str | None = None, hf_cache: Path | None = None, exo_dir: Path | None = None,
         cards_dir: Path | None = None, hf: bool = True, exo: bool = True, true_hashes: bool = False,
         exo_index: bool = False, dry_run: bool = False, progress: Progress | None = None) -> LinkResult:
    """Link one inspected model folder. Raises ModelFileError (bad folder) or LinkError (refusal);
    either way nothing has changed."""
    require_ok(info)
    if info.format != "mlx":
        raise LinkError(f"{info.path} holds {info.format.upper()} weights; mlx-lm and exo need MLX safetensors "
                        "(GGUF models run in LM Studio or llama.cpp)")
    repo_id = check_repo_id(repo_id or info.repo_id)
    hf_cache = Path(os.path.abspath(hf_cache or paths.hf_cache()))
    exo_dir = Path(os.path.abspath(exo_dir or paths.exo_links_dir()))
    cards_dir = Path(os.path.abspath(cards_dir or paths.exo_custom_cards_dir()))
    source = _source_abs(info)
    _refuse_sources_in_targets(source, hf_cache, exo_dir)
    for f in info.files:
        _check_rel(f.name)
    res = LinkResult(repo_id=repo_id, source=source, dry_run=dry_run)

    # Every refusal comes before any work or write (hashing a large model can take minutes).
    repo_dir = hf_cache / paths.hf_repo_folder(repo_id)
    previous = None
    if hf:
        state, previous = _hf_state(repo_dir)
        _refuse_foreign_hf(repo_dir, state, repo_id)
    exo_plan = _plan_exo(info, repo_id, source, exo_dir, cards_dir, exo_index, res) if exo else None

    hf_record = None
    if hf:
        cache = etags.EtagCache()
        files = _hf_files(info, true_hashes, previous, progress, cache)
        if not dry_run:
            cache.save()
        commit = _commit(repo_id, files)
        hf_record = _hf_record(repo_id, source, commit, files)
        res.hf_repo, res.commit, res.etag_mode = repo_dir, commit, hf_record["etag_mode"]
        res.snapshot = repo_dir / "snapshots" / commit

    if dry_run:
        if hf_record:
            res.actions.append(_hf_action(res.hf_repo, hf_record, dry=True))
        if exo_plan:
            res.actions += _exo_actions(exo_plan, dry=True)
        return res

    with _lock():
        if hf_record:
            res.actions.append(_apply_hf(hf_cache, res.hf_repo, hf_record, repo_id))
        if exo_plan:
            res.actions += _apply_exo(exo_plan)
    _verify(res, hf_record, exo_plan)
    return res


def _refuse_foreign_hf(repo_dir: Path, state: str, repo_id: str) -> None:
    if state == "foreign":
        raise LinkError(f"{repo_dir} already exists and was not made by arthur-cluster (a real download?). It is "
                        f"left untouched: mlx-lm can already load {repo_id} from it. To use the LM Studio copy "
                        f"instead, delete it first (`hf cache rm model/{repo_id}`), or link under another id "
                        "with --repo-id")
    if state == "ours":
        extra = _hf_foreign_content(repo_dir)
        if extra:
            raise LinkError(f"{repo_dir} was linked by arthur-cluster but now also holds files it did not make "
                            f"({', '.join(extra[:3])}): left untouched; remove them (or the whole entry with "
                            f"`hf cache rm model/{repo_id}`) and link again")


def _hf_action(repo_dir: Path, record: dict, dry: bool) -> Action:
    state, previous = _hf_state(repo_dir)
    if state == "ours" and previous == record and not check_hf_entry(repo_dir, record):
        return Action(op="keep", target=str(repo_dir), detail="already linked, unchanged")
    n = len(record["files"])
    detail = f"{n} files, commit {record['commit'][:12]}, {record['etag_mode']} etags"
    return Action(op="replace" if state == "ours" else "create", target=str(repo_dir), detail=detail)


def _apply_hf(hf_cache: Path, repo_dir: Path, record: dict, repo_id: str) -> Action:
    staging = hf_cache / ".locks" / STAGING
    _clean_staging(staging)
    state, _ = _hf_state(repo_dir)  # again, under the lock: another run may have finished meanwhile
    _refuse_foreign_hf(repo_dir, state, repo_id)
    action = _hf_action(repo_dir, record, dry=False)
    if action.op == "keep":
        return action
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f"{repo_dir.name}.{os.getpid()}.{secrets.token_hex(4)}"
    _build_hf(tmp, record)
    _swap_in(tmp, repo_dir, staging)
    return action


class _ExoPlan(BaseModel):
    entry: Path
    record_path: Path
    record: dict
    staging: Path
    index_text: str | None = None
    card: Path | None = None
    card_text: str | None = None
    card_op: Literal["create", "replace", "keep", "skip"] = "skip"


def _exo_state(entry: Path, record_path: Path) -> tuple[Literal["absent", "ours", "foreign"], dict | None]:
    record = _read_json(record_path) if record_path.is_file() else None
    if not os.path.lexists(entry):
        return "absent", record
    return ("ours", record) if record is not None else ("foreign", None)


def _plan_exo(info: ModelInfo, repo_id: str, source: Path, exo_dir: Path, cards_dir: Path, exo_index: bool,
              res: LinkResult) -> _ExoPlan | None:
    name = _exo_name(repo_id)
    entry = exo_dir / name
    record_path = exo_dir / EXO_RECORDS / f"{name}.json"
    state, _ = _exo_state(entry, record_path)
    if state == "foreign":
        raise LinkError(f"{entry} exists and was not made by arthur-cluster: left untouched. Move it away, or "
                        "pass --exo-dir to use another links directory (or --no-exo)")
    if info.has_index:
        mode, index_text = "symlink", None
        if exo_index:
            res.warnings.append("the source has model.safetensors.index.json already; --exo-index is not needed")
    elif exo_index:
        mode, index_text = "index-dir", _generated_index(info)
    else:
        res.warnings.append(
            f"{info.path} has no model.safetensors.index.json: exo never treats such a folder as complete and "
            "would download the model again, so no exo link was made. Rerun with --exo-index to build a link "
            "folder holding a generated index (written in the links directory, never into the source)")
        return None
    res.exo_link, res.exo_mode, res.env_line = entry, mode, env_line(exo_dir)
    plan = _ExoPlan(entry=entry, record_path=record_path, record={}, staging=exo_dir / STAGING,
                    index_text=index_text)
    _plan_card(plan, info, repo_id, cards_dir, res)
    plan.record = _exo_record(repo_id, source, mode, info, plan.card if plan.card_op != "skip" else None,
                              plan.card_text if plan.card_op != "skip" else None)
    return plan


def _plan_card(plan: _ExoPlan, info: ModelInfo, repo_id: str, cards_dir: Path, res: LinkResult) -> None:
    try:
        text = exocard.card_text(info, repo_id)
    except exocard.CardError as e:
        res.warnings.append(f"no exo card written: {e}")
        return
    card = cards_dir / exocard.card_filename(repo_id)
    plan.card, plan.card_text = card, text
    try:
        current = card.read_text(encoding="utf-8")
    except FileNotFoundError:
        plan.card_op = "create"
    except (OSError, UnicodeDecodeError):
        current = ""
        plan.card_op = "skip"
    else:
        if current == text:
            plan.card_op = "keep"
        elif current.startswith(exocard.CARD_HEADER):
            plan.card_op = "replace"
        else:
            plan.card_op = "skip"
            res.warnings.append(f"{card} exists and was not written by arthur-cluster: left as it is (exo uses "
                                "it for this model id; delete it to get a card from this model's files)")
    if plan.card_op != "skip":
        res.card = card


def _exo_entry_action(plan: _ExoPlan) -> Action:
    state, record = _exo_state(plan.entry, plan.record_path)
    healthy = state == "ours" and record == plan.record and not check_exo_entry(plan.entry, plan.record)
    if healthy:
        return Action(op="keep", target=str(plan.entry), detail="already linked, unchanged")
    detail = f"-> {plan.record['source']}" if plan.record["mode"] == "symlink" else "folder of links + generated index"
    return Action(op="replace" if state == "ours" else "create", target=str(plan.entry), detail=detail)


def _exo_actions(plan: _ExoPlan, dry: bool) -> list[Action]:
    out = [_exo_entry_action(plan)]
    if plan.card:
        out.append(Action(op=plan.card_op, target=str(plan.card),
                          detail="exo custom model card" if plan.card_op != "skip" else "not ours, left as is"))
    return out


def _apply_exo(plan: _ExoPlan) -> list[Action]:
    _clean_staging(plan.staging)
    if _exo_state(plan.entry, plan.record_path)[0] == "foreign":
        raise LinkError(f"{plan.entry} appeared meanwhile and was not made by arthur-cluster: left untouched")
    actions = _exo_actions(plan, dry=False)
    if actions[0].op != "keep":
        # Record first: a run killed after it leaves a record without a matching link, which the next
        # run repairs; the reverse order would leave a link nobody claims.
        paths.write_atomic(plan.record_path, json.dumps(plan.record, indent=1, ensure_ascii=False))
        plan.staging.mkdir(parents=True, exist_ok=True)
        tmp = plan.staging / f"{plan.entry.name}.{os.getpid()}.{secrets.token_hex(4)}"
        _build_exo(tmp, plan.record, plan.index_text)
        _swap_in(tmp, plan.entry, plan.staging)
    if plan.card_op in ("create", "replace"):
        paths.write_atomic(plan.card, plan.card_text)
    return actions


def _verify(res: LinkResult, hf_record: dict | None, exo_plan: _ExoPlan | None) -> None:
    problems: list[Finding] = []
    if hf_record:
        problems += [f for f in check_hf_entry(res.hf_repo, hf_record) if f.severity == "error"]
    if exo_plan:
        problems += [f for f in check_exo_entry(exo_plan.entry, exo_plan.record) if f.severity == "error"]
    if problems:
        lines = "; ".join(f"{p.path}: {p.message}" for p in problems[:3])
        raise LinkError(f"linked, but verification failed: {lines}. Run `arthur-cluster doctor`")


# --- where linked / records ------------------------------------------------------------------------


def _hf_records(hf_cache: Path) -> list[tuple[Path, dict]]:
    out = []
    try:
        entries = sorted(os.scandir(hf_cache), key=lambda e: e.name)
    except OSError:
        return out
    for e in entries:
        if e.name.startswith("models--") and e.is_dir(follow_symlinks=False):
            marker = Path(e.path) / HF_MARKER
            if marker.is_file():
                out.append((Path(e.path), _read_json(marker) or {}))
    return out


def _exo_records(exo_dir: Path) -> list[tuple[Path, Path, dict]]:
    """(entry, record file, record) for every link recorded in the exo links dir."""
    out = []
    rec_dir = exo_dir / EXO_RECORDS
    try:
        names = sorted(n for n in os.listdir(rec_dir) if n.endswith(".json"))
    except OSError:
        return out
    for n in names:
        out.append((exo_dir / n[:-5], rec_dir / n, _read_json(rec_dir / n) or {}))
    return out


def where_linked(repo_id: str, source: Path | str | None = None, *, hf_cache: Path | None = None,
                 exo_dir: Path | None = None) -> list[str]:
    """Where the linker made this model visible: the HF cache snapshot and the exo link."""
    want = os.path.abspath(source) if source is not None else None
    hf_cache = hf_cache or paths.hf_cache()
    exo_dir = exo_dir or paths.exo_links_dir()
    out = []
    repo_dir = hf_cache / paths.hf_repo_folder(repo_id)
    record = _read_json(repo_dir / HF_MARKER)
    if record and (want is None or record.get("source") == want):
        out.append(str(repo_dir / "snapshots" / str(record.get("commit"))))
    name = _exo_name(repo_id)
    record = _read_json(exo_dir / EXO_RECORDS / f"{name}.json")
    if record and os.path.lexists(exo_dir / name) and (want is None or record.get("source") == want):
        out.append(str(exo_dir / name))
    return out


def linked_ids(*, hf_cache: Path | None = None, exo_dir: Path | None = None) -> list[str]:
    ids = {r.get("repo_id") for _, r in _hf_records(hf_cache or paths.hf_cache())}
    ids |= {r.get("repo_id") for _, _, r in _exo_records(exo_dir or paths.exo_links_dir())}
    return sorted(i for i in ids if isinstance(i, str))


# --- unlink ----------------------------------------------------------------------------------------


def _stale(findings: list[Finding]) -> bool:
    return any(f.kind in ("broken", "stale-record") for f in findings)


def unlink(repo_id: str | None = None, *, all: bool = False, stale: bool = False, hf_cache: Path | None = None,
           exo_dir: Path | None = None, dry_run: bool = False) -> UnlinkResult:
    """Remove what the linker made for one repo id, for every stale entry, or for all; nothing else."""
    if not (repo_id or all or stale):
        raise LinkError("name a model, or pass --stale or --all")
    hf_cache = Path(os.path.abspath(hf_cache or paths.hf_cache()))
    exo_dir = Path(os.path.abspath(exo_dir or paths.exo_links_dir()))
    res = UnlinkResult(dry_run=dry_run)

    def wanted(record: dict, findings: Callable[[], list[Finding]]) -> bool:
        if all:
            return True
        if repo_id and record.get("repo_id") == repo_id:
            return True
        return stale and _stale(findings())

    with _lock():
        for repo_dir, record in _hf_records(hf_cache):
            if wanted(record, lambda: check_hf_entry(repo_dir, record)):
                _unlink_hf(repo_dir, record, res, dry_run)
        for entry, rec_path, record in _exo_records(exo_dir):
            if wanted(record, lambda: check_exo_entry(entry, record)):
                _unlink_exo(entry, rec_path, record, res, dry_run)
    return res


def _unlink_hf(repo_dir: Path, record: dict, res: UnlinkResult, dry_run: bool) -> None:
    extra = _hf_foreign_content(repo_dir)
    if extra:
        res.kept.append(str(repo_dir))
        res.warnings.append(f"{repo_dir} also holds files arthur-cluster did not make ({', '.join(extra[:3])}): "
                            f"left in place; use `hf cache rm model/{record.get('repo_id')}` to delete it")
        return
    if not dry_run:
        shutil.rmtree(repo_dir)  # links and our own small files only (checked above); rmtree never follows links
    res.removed.append(str(repo_dir))


def _unlink_exo(entry: Path, rec_path: Path, record: dict, res: UnlinkResult, dry_run: bool) -> None:
    if os.path.lexists(entry):
        if not entry.is_symlink() and entry.is_dir():
            real = [str(p) for p in entry.rglob("*") if not p.is_symlink() and p.is_file() and p.name != INDEX_NAME]
            if real:
                res.kept.append(str(entry))
                res.warnings.append(f"{entry} holds files arthur-cluster did not make ({real[0]}): left in place")
                return
            if not dry_run:
                shutil.rmtree(entry)
        elif not dry_run:
            os.unlink(entry)
        res.removed.append(str(entry))
    card = record.get("card")
    if card and os.path.isfile(card):
        try:
            text = Path(card).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""
        if text.startswith(exocard.CARD_HEADER):
            if not dry_run:
                os.unlink(card)
            res.removed.append(card)
        else:
            res.kept.append(card)
            res.warnings.append(f"{card} was rewritten by someone else since linking: left in place")
    if not dry_run:
        os.unlink(rec_path)


# --- doctor ----------------------------------------------------------------------------------------


def doctor(*, hf_cache: Path | None = None, exo_dir: Path | None = None, cards_dir: Path | None = None,
           lmstudio_dir: Path | None = None) -> DoctorReport:
    """Find broken links, drift, foreign and dangerous entries; changes nothing."""
    hf_cache = Path(os.path.abspath(hf_cache or paths.hf_cache()))
    exo_dir = Path(os.path.abspath(exo_dir or paths.exo_links_dir()))
    cards_dir = Path(os.path.abspath(cards_dir or paths.exo_custom_cards_dir()))
    rep = DoctorReport(hf_cache=hf_cache, exo_dir=exo_dir, cards_dir=cards_dir)
    _doctor_hf(hf_cache, rep)
    _doctor_exo(exo_dir, rep)
    _doctor_exo_writable(exo_dir, rep)
    from .bringup import doctor_findings  # the deployment's resident ranks: gone or failed

    rep.findings += [Finding(**f) for f in doctor_findings()]
    return rep


def _doctor_hf(hf_cache: Path, rep: DoctorReport) -> None:
    ours = foreign = 0
    try:
        entries = sorted(os.scandir(hf_cache), key=lambda e: e.name)
    except OSError:
        entries = []
    for e in entries:
        if "--" not in e.name or e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
            continue
        repo_dir = Path(e.path)
        marker = repo_dir / HF_MARKER
        if marker.is_file():
            ours += 1
            record = _read_json(marker)
            if record is None:
                rep.findings.append(Finding(kind="damaged", severity="error", path=str(marker),
                                            message="the linker's record is unreadable",
                                            fix="delete the entry with `hf cache rm` and link again"))
                continue
            rep.findings += check_hf_entry(repo_dir, record)
        else:
            foreign += 1
            rep.findings += _hand_made_links(repo_dir)
    staging = hf_cache / ".locks" / STAGING
    if staging.is_dir() and any(staging.iterdir()):
        rep.findings.append(Finding(kind="leftover", severity="warning", path=str(staging),
                                    message="an interrupted link left a half-built entry here (not visible to the hub)",
                                    fix="run any `arthur-cluster link`: it cleans this up first"))
    rep.checked["hf_linked"] = ours
    rep.checked["hf_other"] = foreign


def _hand_made_links(repo_dir: Path) -> list[Finding]:
    """Entries not made by us whose snapshot files point straight outside the cache (layouts A and D):
    deleting one file or revision with the hub's tools would then delete the user's own file."""
    snaps = repo_dir / "snapshots"
    blobs = os.path.realpath(repo_dir / "blobs")
    try:
        revisions = list(os.scandir(snaps))
    except OSError:
        return []
    for rev in revisions:
        if rev.is_symlink():
            return [_dangerous(repo_dir, rev.path, "a snapshot folder is itself a link to "
                                                   f"{os.readlink(rev.path)}")]
        for root, _, files in os.walk(rev.path):
            for n in files:
                p = os.path.join(root, n)
                if not os.path.islink(p):
                    continue
                first = os.path.normpath(os.path.join(root, os.readlink(p)))
                if os.path.realpath(os.path.dirname(first)) != blobs:
                    return [_dangerous(repo_dir, p, f"a snapshot file links straight to {first}")]
    return []


def _dangerous(repo_dir: Path, path: str, what: str) -> Finding:
    repo_id = repo_dir.name.split("--", 1)[-1].replace("--", "/")
    return Finding(kind="dangerous", severity="error", path=path, repo_id=repo_id,
                   message=f"linked by hand outside the linker: {what}. `hf cache rm` of one file or revision, "
                           "or `hf cache prune`, would delete the original file",
                   fix=f"move the entry away (e.g. `mv {shlex.quote(str(repo_dir))} /tmp/`), then "
                       f"`arthur-cluster link {repo_id}`")


def _doctor_exo(exo_dir: Path, rep: DoctorReport) -> None:
    records = {entry.name: (rec_path, record) for entry, rec_path, record in _exo_records(exo_dir)}
    for name, (rec_path, record) in records.items():
        if not record:
            rep.findings.append(Finding(kind="damaged", severity="error", path=str(rec_path),
                                        message="the linker's record is unreadable",
                                        fix="delete it and link the model again"))
            continue
        rep.findings += check_exo_entry(exo_dir / name, record)
        card = record.get("card")
        if card and not os.path.isfile(card):
            rep.findings.append(Finding(kind="note", severity="note", path=card, repo_id=record.get("repo_id"),
                                        message="the custom model card was removed; exo will not list the model "
                                                "until it is back", fix=f"run `arthur-cluster link "
                                                                        f"{record.get('repo_id')}`"))
    count = 0
    try:
        entries = sorted(os.scandir(exo_dir), key=lambda e: e.name)
    except OSError:
        entries = []
    for e in entries:
        if e.name.startswith("."):
            continue
        count += 1
        if e.name not in records:
            rep.findings.append(Finding(kind="foreign", severity="warning", path=e.path,
                                        message="in the linker's exo directory but not made by arthur-cluster",
                                        fix="move it to one of exo's own model directories, or delete it"))
    staging = exo_dir / STAGING
    if staging.is_dir() and any(staging.iterdir()):
        rep.findings.append(Finding(kind="leftover", severity="warning", path=str(staging),
                                    message="an interrupted link left a half-built entry here",
                                    fix="run any `arthur-cluster link`: it cleans this up first"))
    rep.checked["exo_linked"] = len(records)
    rep.checked["exo_entries"] = count
    if records and exo_dir not in paths.exo_read_only_dirs():
        rep.findings.append(Finding(kind="note", severity="note", path=str(exo_dir),
                                    message="not in EXO_MODELS_READ_ONLY_DIRS of this shell",
                                    fix=f"start exo with {env_line(exo_dir)}"))


def _doctor_exo_writable(exo_dir: Path, rep: DoctorReport) -> None:
    """A link in a writable exo directory lets exo download into, or try to delete, the source."""
    read_only = set(paths.exo_read_only_dirs()) | {exo_dir}
    for d in paths.exo_models_dirs():
        if d in read_only:
            continue
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.is_symlink() and "--" in e.name:
                rep.findings.append(Finding(
                    kind="dangerous", severity="error", path=e.path,
                    message=f"a link in exo's writable models directory {d} (to {os.readlink(e.path)}): exo may "
                            "write downloads through it into the source folder",
                    fix=f"remove the link and use `arthur-cluster link {e.name.replace('--', '/', 1)}` "
                        "(a read-only links directory)"))


__all__ = [
    "Action", "DoctorReport", "Finding", "LinkError", "LinkResult", "LinkedFile", "ModelFileError", "UnlinkResult",
    "check_repo_id", "doctor", "env_line", "exo_complete", "link", "linked_ids", "unlink", "where_linked",
]
