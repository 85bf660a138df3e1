"""Zero-copy links from a model folder into the Hugging Face cache and exo: plan -> apply -> verify.

HF cache (layout B of the facts file): models--org--name/blobs/<etag> are absolute symlinks to the source
files, snapshots/<commit>/<file> are relative links to ../../blobs/<etag>, refs/main holds the commit with
no newline. Every deletion the hub offers then removes a link, never a source file.

exo: a read-only links directory holds <org>--<name>/, a real folder of per-file links to the source files,
plus a generated model.safetensors.index.json (a real file) where the source has none or its index lacks
metadata.total_size (exo needs the size to build a card without asking Hugging Face). Never a directory
symlink: whatever exo deletes or downloads in that folder replaces a link, never a source file. No card file
is written (exo deletes card files it did not put in its state): `up` registers the model through exo's API.

Every entry is built in a staging folder beside its target and renamed into place, under a lock, so a
killed run leaves no half-made entry and the next run cleans up and repairs. Removal is the reverse: one
rename moves the entry into staging, then its links go, its record last. Only entries carrying the
linker's record (or recognisably left by an interrupted unlink) are ever replaced or removed, and of
those only links and the linker's own small files are deleted; source folders are only read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal

from pydantic import BaseModel, Field

from . import etags, exocard, paths, safeio
from .errors import ArthurError
from .modelfiles import INDEX_NAME, ModelFileError, ModelInfo, read_header, require_ok

TOOL = "arthur-cluster"
RECORD_VERSION = 1
EXO_MODE = "file-links"  # older records say "symlink" (a directory symlink) or "index-dir"
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
    kind: Literal["broken", "drift", "damaged", "foreign", "dangerous", "stale-record", "leftover", "unusable",
                  "note"]
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
    try:
        state.mkdir(parents=True, exist_ok=True)
        f = open(state / LOCK_NAME, "a+")
    except OSError as e:
        raise LinkError(f"cannot use the state folder {state} ({e.strerror}); nothing was changed. Make it "
                        f"writable, or set {paths.ENV_STATE_DIR} to a writable folder") from None
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_json(path: Path) -> dict | None:
    try:
        data = safeio.read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# Regular files the linker writes inside an HF entry (relative paths); everything else there is a link.
OWN_FILES = frozenset({HF_MARKER, "refs/main"})
# Staging holds only what the linker builds: HF entries and exo link folders with a generated index.
STAGING_FILES = OWN_FILES | {INDEX_NAME}
_OWN_FILE_CAP = safeio.MAX_SMALL_FILE


def remove_own(top: Path, own_files: frozenset[str] = OWN_FILES, *, last: str | None = HF_MARKER) -> list[str]:
    """Delete what the linker makes under top: links, its own small files (relative names in own_files) and
    the folders holding them, never following a link. Anything else is left in place and returned, so a
    file the linker did not make is never deleted. `last` (the record) goes last: a run killed midway
    leaves an entry that still says whose it is."""
    if os.path.islink(top) or not os.path.isdir(top):
        if os.path.islink(top):
            os.unlink(top)
            return []
        return [str(top)] if os.path.lexists(top) else []
    kept: list[str] = []
    for root, dirs, files in os.walk(top, topdown=False):
        rel_root = os.path.relpath(root, top)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if rel == last:
                continue
            if os.path.islink(path):
                os.unlink(path)
            elif rel in own_files and os.path.isfile(path) and os.lstat(path).st_size <= _OWN_FILE_CAP:
                os.unlink(path)
            else:
                kept.append(path)
        if root != str(top):
            try:
                os.rmdir(root)
            except OSError:
                pass  # still holds something kept
    if last and os.path.lexists(top / last):
        if kept:
            return kept  # the record stays with what is left, so the tools still recognise the entry
        os.unlink(top / last)
    try:
        os.rmdir(top)
    except OSError:
        kept = kept or [str(top)]
    return kept


def _clean_staging(staging: Path) -> list[str]:
    """Remove what a killed run left (half-built entries, entries moved aside to be deleted). Called under
    the lock, so nothing in there is in use. Returns what was not ours and so was left."""
    kept: list[str] = []
    try:
        entries = list(os.scandir(staging))
    except OSError:
        return kept
    for entry in entries:
        kept += remove_own(Path(entry.path), STAGING_FILES)
    return kept


def _trash(target: Path, staging: Path) -> Path:
    """Move an entry out of sight in one rename: it is then either whole where it was, or in staging,
    which every later run empties."""
    staging.mkdir(parents=True, exist_ok=True)
    trash = staging / f"{target.name}.trash.{os.getpid()}.{secrets.token_hex(4)}"
    os.rename(target, trash)
    return trash


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
        old = _trash(target, staging)  # the caller checked it is ours
        os.rename(tmp, target)
        remove_own(old, STAGING_FILES)
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
        out.append(_damaged(str(repo_dir / "refs" / "main"), rid,
                            "refs/main is missing or does not name the linked snapshot"))
    source = record.get("source", "")
    if not os.path.isdir(source):
        out.append(Finding(kind="broken", severity="error", path=source, repo_id=rid,
                           message="the source folder was moved or deleted; every link of this entry is broken",
                           fix=f"run `arthur-cluster unlink --stale`, or link {rid} again from its new place"))
        return out
    first: dict[str, str] = {}  # files with equal contents share one blob, made for the first of them
    for f in record.get("files", []):
        first.setdefault(f["etag"], f["name"])
    for f in record.get("files", []):
        snap = repo_dir / "snapshots" / commit / f["name"]
        blob = repo_dir / "blobs" / f["etag"]
        want_src = os.path.join(source, f["name"])
        try:
            links_ok = (os.readlink(snap) == _blob_rel(f["name"], f["etag"])
                        and os.readlink(blob) == os.path.join(source, first[f["etag"]]))
        except OSError:
            links_ok = False
        if not links_ok:
            out.append(_damaged(str(snap), rid, "a snapshot or blob link is missing or was changed"))
            continue
        out += _source_findings(want_src, f, rid, "the cache entry points at nothing",
                                "its etag no longer describes it", "to relink it")
    return out


def _damaged(path: str, rid: str, message: str) -> Finding:
    """Part of an entry the linker made is missing or changed: relinking rebuilds it."""
    return Finding(kind="damaged", severity="error", path=path, repo_id=rid, message=message,
                   fix=f"run `arthur-cluster link {rid}` to rebuild the entry")


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


def _hf_state(repo_dir: Path) -> tuple[Literal["absent", "ours", "debris", "foreign"], dict | None]:
    if not os.path.lexists(repo_dir):
        return "absent", None
    if repo_dir.is_symlink() or not repo_dir.is_dir():
        return "foreign", None
    marker = repo_dir / HF_MARKER
    if not marker.is_file():
        return ("debris", None) if hf_debris(repo_dir) else ("foreign", None)
    return "ours", _read_json(marker) or {}


_DEBRIS_WALK_CAP = 200_000  # entries looked at before giving up on recognising one


def hf_debris(repo_dir: Path) -> bool:
    """A cache entry without the linker's record that only the linker can have made: nothing but empty
    folders, refs/main, snapshot links of the linker's relative form and blob links whose names are the
    etags the linker gives the files they point at. An unlink killed by an earlier version, which deleted
    the record first, leaves these; the hub cannot list or delete them."""
    if repo_dir.is_symlink() or not repo_dir.is_dir() or os.path.lexists(repo_dir / HF_MARKER):
        return False
    seen = links = 0
    ref = False
    cache = etags.EtagCache()
    for root, dirs, files in os.walk(repo_dir):
        rel_root = os.path.relpath(root, repo_dir)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            seen += 1
            path = os.path.join(root, name)
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if seen > _DEBRIS_WALK_CAP:
                return False
            if rel == "refs/main" and _looks_like_commit(path):
                ref = True
                continue
            if not os.path.islink(path) or not _our_link(rel, os.readlink(path), cache):
                return False
            links += 1
        if rel_root == ".":
            if any(d not in ("blobs", "snapshots", "refs", ".no_exist") for d in dirs):
                return False
    return links > 0 or not ref


def _looks_like_commit(path: str) -> bool:
    try:
        if os.path.islink(path) or os.lstat(path).st_size != 40:
            return False
        return etags.is_etag(safeio.read_regular(path, 40).decode("ascii"))
    except (OSError, ValueError):
        return False


def _our_link(rel: str, target: str, cache: etags.EtagCache | None) -> bool:
    parts = rel.split("/")
    if parts[0] == "snapshots" and len(parts) >= 3:
        etag = target.rsplit("/", 1)[-1]
        return etags.is_etag(etag) and target == _blob_rel("/".join(parts[2:]), etag)
    if parts[0] == "blobs" and len(parts) == 2 and etags.is_etag(parts[1]) and os.path.isabs(target) and cache:
        return _blob_is_ours(parts[1], target, cache)
    return False


def _blob_is_ours(etag: str, target: str, cache: etags.EtagCache) -> bool:
    """The blob name is the etag the linker gives this file: pseudo (from where the file is, its size and
    time), or true (from the hash cache, or hashed here when small)."""
    try:
        st = os.stat(target)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    comps = target.strip("/").split("/")
    names = ["/".join(comps[-k:]) for k in range(1, min(len(comps), 17))]
    if any(etags.pseudo_etag(Path(target), n, st.st_size, st.st_mtime_ns) == etag for n in names):
        return True
    if cache.get(Path(target), st.st_size, st.st_mtime_ns) == etag:
        return True
    if st.st_size > etags.LFS_MIN_BYTES:
        return False  # too large to hash just to recognise it
    try:
        return etag in (etags.sha256_file(Path(target)), etags.git_blob_sha1(Path(target), st.st_size))
    except OSError:
        return False


def _dead_links_only(repo_dir: Path) -> bool:
    """A record-less entry of the linker's shape whose blob links all point at files that are gone: it cannot
    be told apart from a hand-made one, so it is reported, never removed."""
    blobs = 0
    for root, dirs, files in os.walk(repo_dir):
        rel_root = os.path.relpath(root, repo_dir)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if rel == "refs/main" and _looks_like_commit(path):
                continue
            if not os.path.islink(path):
                return False
            target, parts = os.readlink(path), rel.split("/")
            if parts[0] == "blobs" and len(parts) == 2 and os.path.isabs(target) and not os.path.lexists(target):
                blobs += 1
            elif not (parts[0] == "snapshots" and len(parts) >= 3 and _our_link(rel, target, None)):
                return False
    return blobs > 0


def _hf_debris_entries(hf_cache: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(hf_cache), key=lambda e: e.name)
    except OSError:
        return []
    return [Path(e.path) for e in entries if e.name.startswith("models--") and e.is_dir(follow_symlinks=False)
            and not os.path.lexists(os.path.join(e.path, HF_MARKER)) and hf_debris(Path(e.path))]


def _repo_id_of_folder(name: str) -> str:
    return name[len("models--"):].replace("--", "/", 1)


# --- exo -------------------------------------------------------------------------------------------


def _exo_record(repo_id: str, source: Path, info: ModelInfo, index_text: str | None) -> dict:
    return {
        "tool": TOOL, "version": RECORD_VERSION, "kind": "exo", "repo_id": repo_id, "source": str(source),
        "mode": EXO_MODE, "files": [{"name": f.name, "size": f.size, "mtime_ns": f.mtime_ns} for f in info.files],
        # the one real file the entry may hold: the generated index (its hash proves it is ours at unlink)
        "index_sha256": hashlib.sha256(index_text.encode()).hexdigest() if index_text is not None else None,
    }


def _source_index_total(info: ModelInfo) -> tuple[dict | None, bool]:
    """(the source's index, whether it carries a usable metadata.total_size)."""
    if not info.has_index:
        return None, False
    data = _read_json(info.path / INDEX_NAME)
    total = ((data or {}).get("metadata") or {}).get("total_size") if isinstance((data or {}).get("metadata"),
                                                                               dict) else None
    return data, isinstance(total, int) and not isinstance(total, bool) and total > 0


def _generated_index(info: ModelInfo, source_index: dict | None) -> str:
    """model.safetensors.index.json with metadata.total_size: the source's weight_map when it has an index,
    else one built from the shard headers."""
    weight_map: dict[str, str] = {}
    if source_index and isinstance(source_index.get("weight_map"), dict):
        weight_map = dict(source_index["weight_map"])
    else:
        for shard in info.shards:
            header, _, _ = read_header(info.path / shard)
            weight_map.update({name: shard for name in header})
    index = {"metadata": {"total_size": info.data_bytes, "generated_by": TOOL},
             "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(index, indent=2)


def _build_exo(tmp: Path, record: dict, index_text: str | None) -> None:
    tmp.mkdir()
    for f in record["files"]:
        if index_text is not None and f["name"] == INDEX_NAME:
            continue  # replaced by the generated one
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


def _exo_ownership(entry: Path, record: dict) -> tuple[list[Path], list[str]]:
    """(paths the linker made inside an entry folder, deepest first; what it did not make, relative)."""
    source = record.get("source", "")
    names = {f.get("name") for f in record.get("files", []) if isinstance(f, dict)}
    ours: list[Path] = []
    foreign: list[str] = []
    for root, dirs, files in os.walk(entry, topdown=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root) / name
            rel = path.relative_to(entry).as_posix()
            if path.is_symlink():
                ok = rel in names and os.readlink(path) == os.path.join(source, rel)
            else:
                ok = rel == INDEX_NAME and record.get("index_sha256") == _sha256_of(path)
            (ours.append(path) if ok else foreign.append(rel))
        for d in dirs:
            if not os.path.islink(os.path.join(root, d)):
                ours.append(Path(root) / d)  # removed only when empty (rmdir)
    return ours, foreign


def _sha256_of(path: Path, cap: int = 64 << 20) -> str | None:
    try:
        if path.stat().st_size > cap:
            return None
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def check_exo_entry(entry: Path, record: dict) -> list[Finding]:
    rid = record.get("repo_id")
    out: list[Finding] = []
    source = record.get("source", "")
    if not os.path.lexists(entry):
        return [Finding(kind="stale-record", severity="warning", path=str(entry), repo_id=rid,
                        message="recorded as linked but the link is gone",
                        fix=f"run `arthur-cluster link {rid}` or `arthur-cluster unlink {rid}`")]
    if record.get("mode") == "symlink" or entry.is_symlink():
        return [Finding(kind="dangerous", severity="error", path=str(entry), repo_id=rid,
                        message="an older directory-symlink entry: exo's downloader would delete and replace files "
                                "inside the source folder through it",
                        fix=f"run `arthur-cluster link {rid}` to convert it to a folder of file links")]
    if not entry.is_dir():
        return [Finding(kind="damaged", severity="error", path=str(entry), repo_id=rid,
                        message="expected a folder of links", fix=f"run `arthur-cluster link {rid}`")]
    if not os.path.isdir(source):
        return [Finding(kind="broken", severity="error", path=source, repo_id=rid,
                        message="the source folder was moved or deleted; exo will not find the model",
                        fix=f"run `arthur-cluster unlink --stale`, or link {rid} again from its new place")]
    _, foreign = _exo_ownership(entry, record)
    if foreign:
        out.append(Finding(kind="foreign", severity="warning", path=str(entry / foreign[0]), repo_id=rid,
                           message=f"{len(foreign)} file(s) here were not made by arthur-cluster (exo downloaded "
                                   "them in place of links, or someone put them here); the source is untouched",
                           fix=f"move them away, then run `arthur-cluster link {rid}`"))
    generated = record.get("index_sha256") is not None
    for f in record.get("files", []):
        if generated and f["name"] == INDEX_NAME:
            continue
        link = entry / f["name"]
        want = os.path.join(source, f["name"])
        if link.is_symlink() and os.readlink(link) != want or not os.path.lexists(link):
            out.append(_damaged(str(link), rid, "a file link is missing or points elsewhere"))
            continue
        out += _source_findings(want, f, rid, "exo will not find it",
                                "exo's card sizes no longer describe it", "to refresh the link")
    if not out and not exo_complete(entry):
        out.append(Finding(kind="broken", severity="error", path=str(entry), repo_id=rid,
                           message="exo would not treat this folder as complete (index or a listed shard missing)",
                           fix=f"run `arthur-cluster link {rid}`"))
    return out


# --- link ------------------------------------------------------------------------------------------


def _refuse_sources_in_targets(source: Path, hf_cache: Path, exo_dir: Path, cards_dir: Path | None = None) -> None:
    if _inside(source, hf_cache):
        raise LinkError(f"{source} is inside the Hugging Face cache {hf_cache}: it is already usable there; "
                        "link LM Studio folders, not cache entries")
    if _inside(source, exo_dir):
        raise LinkError(f"{source} is inside the exo links directory {exo_dir}; link the original folder")
    targets = [("the Hugging Face cache", hf_cache, "--hf-cache or HF_HUB_CACHE"),
               ("the exo links directory", exo_dir, "--exo-dir"),
               ("the exo cards folder", cards_dir, "--cards-dir or EXO_HOME"),
               ("arthur-cluster's state folder", paths.state_dir(), paths.ENV_STATE_DIR)]
    for what, target, option in targets:
        if target is not None and _inside(target, source):
            raise LinkError(f"{what} {target} lies inside the model folder {source}; choose one outside it with "
                            f"{option} (the linker never writes into a source)")


def _writable_targets(folders: list[Path]) -> None:
    """Every folder the link will write, checked before anything is made, so a refusal leaves nothing."""
    for folder in folders:
        bad = _unusable_dir(folder, "the target", "")
        if bad:
            raise LinkError(f"{bad.message}; nothing was changed. Make it writable, or choose another folder")


def _model_files_only(info: ModelInfo) -> tuple[ModelInfo, list[str]]:
    """Links in a source that lead out of it are linked only when they are model files (weights kept on
    another disk); anything else (`notes.txt -> ~/private.txt`) is not the model's to publish."""
    skip = [f.name for f in info.files if f.outside and f.kind == "other"]
    if not skip:
        return info, []
    kept = [f for f in info.files if f.name not in skip]
    warnings = [f"{n}: a link to {os.path.realpath(info.path / n)}, outside the model folder and no model file: "
                "not linked" for n in skip]
    return info.model_copy(update={"files": kept, "total_bytes": sum(f.size for f in kept)}), warnings


def link(info: ModelInfo, *, repo_id: str | None = None, hf_cache: Path | None = None, exo_dir: Path | None = None,
         cards_dir: Path | None = None, hf: bool = True, exo: bool = True, true_hashes: bool = False,
         exo_index: bool = False, dry_run: bool = False, progress: Progress | None = None) -> LinkResult:
    """Link one inspected model folder. Raises ModelFileError (bad folder) or LinkError (refusal);
    either way nothing has changed. exo's entry always gets an index with metadata.total_size (generated when
    the source's lacks it): `exo_index` is kept for older callers and changes nothing; no card is written to
    `cards_dir` any more (a card file of an older link is removed)."""
    require_ok(info)
    info, skipped = _model_files_only(info)
    if info.format != "mlx":
        raise LinkError(f"{info.path} holds {info.format.upper()} weights; mlx-lm and exo need MLX safetensors "
                        "(GGUF models run in LM Studio or llama.cpp)")
    repo_id = check_repo_id(repo_id or info.repo_id)
    hf_cache = Path(os.path.abspath(hf_cache or paths.hf_cache()))
    exo_dir = Path(os.path.abspath(exo_dir or paths.exo_links_dir()))
    cards_dir = Path(os.path.abspath(cards_dir or paths.exo_custom_cards_dir()))
    source = _source_abs(info)
    try:
        str(source).encode("utf-8")
    except UnicodeEncodeError:
        raise LinkError(f"{str(source).encode('utf-8', 'backslashreplace').decode()}: the folder's path is not "
                        "valid UTF-8, which the cache records and exo cannot hold; rename the folder") from None
    _refuse_sources_in_targets(source, hf_cache, exo_dir, cards_dir)
    for f in info.files:
        _check_rel(f.name)
    res = LinkResult(repo_id=repo_id, source=source, dry_run=dry_run)

    # Every refusal comes before any work or write (hashing a large model can take minutes).
    repo_dir = hf_cache / paths.hf_repo_folder(repo_id)
    previous = None
    if hf:
        state, previous = _hf_state(repo_dir)
        _refuse_foreign_hf(repo_dir, state, repo_id)
    exo_plan = _plan_exo(info, repo_id, source, exo_dir, res) if exo else None
    res.warnings += [str(p) for p in info.problems if p.severity == "warning"] + skipped
    targets = [paths.state_dir()] + ([hf_cache / ".locks"] if hf else [])
    if exo_plan:
        targets.append(exo_dir)
    _writable_targets(targets)

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
            try:
                res.actions += _apply_exo(exo_plan)
            except OSError as e:
                if not hf_record:
                    raise
                # Say what is in place: the HF entry is whole and usable, exo's part is not made.
                raise LinkError(f"the Hugging Face cache entry {res.hf_repo} was made, but the exo link failed "
                                f"({e.filename or exo_plan.entry}: {e.strerror}); fix that and run link again "
                                "(it keeps the cache entry), or pass --no-exo") from None
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
    try:
        _build_hf(tmp, record)
        _swap_in(tmp, repo_dir, staging)
    except BaseException:
        if os.path.lexists(tmp):
            remove_own(tmp, STAGING_FILES)  # a failed build leaves nothing behind (a kill leaves it to the next run)
        raise
    return action


class _ExoPlan(BaseModel):
    entry: Path
    record_path: Path
    record: dict
    staging: Path
    index_text: str | None = None


def _exo_state(entry: Path, record_path: Path) -> tuple[Literal["absent", "ours", "foreign"], dict | None]:
    record = _read_json(record_path) if record_path.is_file() else None
    if not os.path.lexists(entry):
        return "absent", record
    return ("ours", record) if record is not None else ("foreign", None)


def _plan_exo(info: ModelInfo, repo_id: str, source: Path, exo_dir: Path, res: LinkResult) -> _ExoPlan:
    name = _exo_name(repo_id)
    entry = exo_dir / name
    record_path = exo_dir / EXO_RECORDS / f"{name}.json"
    state, _ = _exo_state(entry, record_path)
    if state == "foreign":
        raise LinkError(f"{entry} exists and was not made by arthur-cluster: left untouched. Move it away, or "
                        "pass --exo-dir to use another links directory (or --no-exo)")
    source_index, has_total = _source_index_total(info)
    index_text = None if has_total else _generated_index(info, source_index)
    res.exo_link, res.exo_mode, res.env_line = entry, "index-dir", env_line(exo_dir)
    return _ExoPlan(entry=entry, record_path=record_path, record=_exo_record(repo_id, source, info, index_text),
                    staging=exo_dir / STAGING, index_text=index_text)


def _exo_entry_action(plan: _ExoPlan) -> Action:
    state, record = _exo_state(plan.entry, plan.record_path)
    findings = check_exo_entry(plan.entry, plan.record) if state == "ours" and record == plan.record else None
    if findings == []:
        return Action(op="keep", target=str(plan.entry), detail="already linked, unchanged")
    if findings and all(f.kind == "foreign" for f in findings) and exo_complete(plan.entry):
        # exo downloaded some files in place of links (a size check against Hugging Face): the entry still
        # works, and those files are not the linker's to delete
        return Action(op="keep", target=str(plan.entry), detail=f"already linked; {findings[0].message}")
    if state == "ours" and (record or {}).get("mode") == "symlink":
        detail = "converts the old directory symlink into a folder of file links"
    else:
        detail = "folder of file links" + (" + generated index" if plan.index_text is not None else "")
    return Action(op="replace" if state == "ours" else "create", target=str(plan.entry), detail=detail)


def _exo_actions(plan: _ExoPlan, dry: bool) -> list[Action]:
    out = [_exo_entry_action(plan)]
    _, old = _exo_state(plan.entry, plan.record_path)
    card = _old_card(old)
    if card:
        out.append(Action(op="remove", target=card, detail="card file of an older link (exo deletes it anyway)"))
    return out


def _old_card(record: dict | None) -> str | None:
    """The card file an older link wrote, while it still holds what the linker wrote."""
    card = (record or {}).get("card")
    if not card or not os.path.isfile(card) or os.path.islink(card):
        return None
    try:
        text = Path(card).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return card if text.startswith(exocard.CARD_HEADER) else None


def _apply_exo(plan: _ExoPlan) -> list[Action]:
    _clean_staging(plan.staging)
    if _exo_state(plan.entry, plan.record_path)[0] == "foreign":
        raise LinkError(f"{plan.entry} appeared meanwhile and was not made by arthur-cluster: left untouched")
    actions = _exo_actions(plan, dry=False)
    if actions[0].op != "keep":
        if os.path.lexists(plan.entry) and not plan.entry.is_symlink() and plan.entry.is_dir():
            _, old = _exo_state(plan.entry, plan.record_path)
            foreign = _exo_ownership(plan.entry, old or {})[1]
            if foreign:
                raise LinkError(f"{plan.entry} holds files arthur-cluster did not make ({', '.join(foreign[:3])}; "
                                "exo may have downloaded them in place of links): left untouched. Move them away "
                                "and link again")
        old_card = _old_card(_exo_state(plan.entry, plan.record_path)[1])
        if old_card:  # before the new record forgets it (exo deletes such files anyway)
            os.unlink(old_card)
        # Record first: a run killed after it leaves a record without a matching entry, which the next run
        # repairs; the reverse order would leave an entry nobody claims.
        paths.write_atomic(plan.record_path, json.dumps(plan.record, indent=1, ensure_ascii=False))
        plan.staging.mkdir(parents=True, exist_ok=True)
        tmp = plan.staging / f"{plan.entry.name}.{os.getpid()}.{secrets.token_hex(4)}"
        _build_exo(tmp, plan.record, plan.index_text)
        _swap_in(tmp, plan.entry, plan.staging)
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
    """Repo ids the linker made something for, including entries an interrupted unlink left."""
    ids = {r.get("repo_id") for _, r in _hf_records(hf_cache or paths.hf_cache())}
    ids |= {_repo_id_of_folder(p.name) for p in _hf_debris_entries(hf_cache or paths.hf_cache())}
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
        if not dry_run:
            left = _clean_staging(hf_cache / ".locks" / STAGING)
            if left:
                res.kept += left
                res.warnings.append(f"the linker's staging folder holds files it did not make ({left[0]}): left "
                                    "in place; move them out")
        for repo_dir, record in _hf_records(hf_cache):
            if wanted(record, lambda: check_hf_entry(repo_dir, record)):
                _unlink_hf(repo_dir, record, res, dry_run)
        for repo_dir in _hf_debris_entries(hf_cache):
            if all or stale or _repo_id_of_folder(repo_dir.name) == repo_id:
                _unlink_hf(repo_dir, {"repo_id": _repo_id_of_folder(repo_dir.name)}, res, dry_run)
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
        # One rename takes the entry out of the hub's sight; a kill after it leaves only staging, which
        # every later link, unlink or `unlink --stale` empties. Deleting in place would leave a half entry.
        left = remove_own(_trash(repo_dir, repo_dir.parent / ".locks" / STAGING))
        if left:
            res.kept.append(str(repo_dir))
            res.warnings.append(f"{repo_dir}: {', '.join(left[:3])} appeared meanwhile and were not made by "
                                "arthur-cluster: left in the linker's staging folder; move them out")
            return
    res.removed.append(str(repo_dir))


def _unlink_exo(entry: Path, rec_path: Path, record: dict, res: UnlinkResult, dry_run: bool) -> None:
    """Remove only what the linker made, the record last: a run killed at any point leaves the record, so
    `unlink`, `link` and `doctor` still know the rest as ours."""
    source = record.get("source", "")
    if entry.is_symlink():  # an older directory-symlink entry, or something put in its place
        if os.readlink(entry) != source:
            res.kept.append(str(entry))
            res.warnings.append(f"{entry} is a link to {os.readlink(entry)}, not the one arthur-cluster made "
                                f"(to {source}): left in place; remove it yourself if it is not needed")
            return
        if not dry_run:
            os.unlink(entry)  # removes the link only, never what it points at
        res.removed.append(str(entry))
    elif os.path.lexists(entry):
        if not entry.is_dir():
            res.kept.append(str(entry))
            res.warnings.append(f"{entry} is a file arthur-cluster did not make: left in place, and its record too")
            return
        ours, foreign = _exo_ownership(entry, record)
        if foreign:
            res.kept.append(str(entry))
            res.warnings.append(f"{entry} holds files arthur-cluster did not make ({', '.join(foreign[:3])}; exo "
                                "may have downloaded them in place of links): nothing removed. Move them away, then "
                                "unlink again")
            return
        if not dry_run:
            for path in ours:  # deepest first: links and our index, then the folders they were in
                if path.is_symlink() or not path.is_dir():
                    os.unlink(path)
                else:
                    os.rmdir(path)
            os.rmdir(entry)
        res.removed.append(str(entry))
    card = _old_card(record)
    if card:
        if not dry_run:
            os.unlink(card)
        res.removed.append(card)
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
    for folder, what in ((exo_dir, "the exo links directory"), (cards_dir, "exo's custom model cards folder"),
                         (paths.state_dir(), "arthur-cluster's state folder")):
        bad = _unusable_dir(folder, what, "move what is in the way, or choose another folder (--exo-dir, "
                                          f"--cards-dir, {paths.ENV_STATE_DIR})")
        if bad:
            rep.findings.append(bad)
    _doctor_hf(hf_cache, rep)
    _doctor_exo(exo_dir, rep)
    _doctor_exo_writable(exo_dir, rep)
    return rep


def _unusable_dir(path: Path, what: str, fix: str) -> Finding | None:
    """A configured folder that exists but cannot hold anything (a file, or a folder we cannot write)."""
    probe = path
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if not os.path.isdir(probe):
        return Finding(kind="unusable", severity="error", path=str(probe),
                       message=f"{what} {path} cannot be created or used: {probe} is not a folder", fix=fix)
    if not os.access(probe, os.W_OK | os.X_OK):
        return Finding(kind="unusable", severity="warning", path=str(probe),
                       message=f"{what} {path} is not writable here ({probe})", fix=fix)
    return None


def _doctor_hf(hf_cache: Path, rep: DoctorReport) -> None:
    ours = foreign = 0
    bad = _unusable_dir(hf_cache, "the Hugging Face cache",
                        "point HF_HUB_CACHE (or HF_HOME) at a folder, or move the file away")
    if bad:
        rep.findings.append(bad)
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
        elif hf_debris(repo_dir):
            ours += 1
            rid = _repo_id_of_folder(e.name)
            rep.findings.append(Finding(kind="leftover", severity="warning", path=str(repo_dir), repo_id=rid,
                                        message="what an interrupted unlink left of a linked entry (its record is "
                                                "gone; the hub can neither list nor delete it)",
                                        fix=f"run `arthur-cluster unlink --stale` (or `arthur-cluster link {rid}` "
                                            "to rebuild it)"))
        elif _dead_links_only(repo_dir):
            foreign += 1
            rep.findings.append(Finding(kind="broken", severity="warning", path=str(repo_dir),
                                        repo_id=_repo_id_of_folder(e.name),
                                        message="an entry without a record that holds only links to files that "
                                                "are gone (left by an interrupted unlink, or made by hand)",
                                        fix=f"delete it (it holds only links): `rm -r {shlex.quote(str(repo_dir))}`"))
        else:
            foreign += 1
            rep.findings += _hand_made_links(repo_dir)
    staging = hf_cache / ".locks" / STAGING
    if staging.is_dir() and any(staging.iterdir()):
        rep.findings.append(Finding(kind="leftover", severity="warning", path=str(staging),
                                    message="an interrupted link or unlink left an entry here (not visible to the "
                                            "hub)",
                                    fix="run `arthur-cluster unlink --stale` or any `arthur-cluster link`: both "
                                        "clean this up first"))
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
