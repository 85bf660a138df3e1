"""Every location arthur-cluster reads or writes, derived from the environment in one place.

Precedence rules follow the tools that own each directory (huggingface_hub, LM Studio, exo);
see docs in the README. Functions, not constants: tests and the demo change the environment.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from . import safeio
from .errors import ArthurError

ENV_LMSTUDIO_HOME = "ARTHUR_LMSTUDIO_HOME"
ENV_LMSTUDIO_MODELS = "ARTHUR_LMSTUDIO_MODELS"
ENV_STATE_DIR = "ARTHUR_CLUSTER_HOME"
ENV_CATALOG = "ARTHUR_CLUSTER_MODELS"

_TRUE = {"1", "on", "yes", "true"}

# The record the linker leaves in every HF-cache repo folder and exo link it made: what it linked,
# from where, with each file's size and mtime. Only entries carrying it are ever changed or removed.
LINK_MARKER = ".arthur-cluster.json"


class LocationError(ArthurError):
    """A file that says where something lives cannot be read; the message names it and the fix."""


def home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


# --- Hugging Face hub cache ---------------------------------------------------------------


def hf_cache() -> Path:
    """Same precedence as huggingface_hub: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return home() / ".cache" / "huggingface" / "hub"


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hf_repo_folder(repo_id: str) -> str:
    """models--org--name, the folder name huggingface_hub uses for a model repo."""
    return "models--" + repo_id.replace("/", "--")


# --- LM Studio ------------------------------------------------------------------------------


def lmstudio_home() -> Path:
    """LM Studio's home: our override, then ~/.lmstudio-home-pointer, ~/.cache/lm-studio, ~/.lmstudio."""
    if os.environ.get(ENV_LMSTUDIO_HOME):
        return Path(os.environ[ENV_LMSTUDIO_HOME]).expanduser()
    pointer = home() / ".lmstudio-home-pointer"
    try:
        text = safeio.read_regular(pointer, 64 * 1024).decode("utf-8").strip()
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as e:
        raise LocationError(f"{pointer}: LM Studio's home pointer cannot be read ({e}); write the path of LM "
                            f"Studio's home folder in it as UTF-8 text, or set {ENV_LMSTUDIO_HOME}") from None
    if "\0" in text or len(text) > 4096:
        raise LocationError(f"{pointer}: LM Studio's home pointer does not hold a path; write the path of LM "
                            f"Studio's home folder in it, or set {ENV_LMSTUDIO_HOME}")
    if text:
        return Path(text).expanduser()
    legacy = home() / ".cache" / "lm-studio"
    if legacy.is_dir():
        return legacy
    return home() / ".lmstudio"


def lmstudio_models(lms_home: Path | None = None) -> Path:
    """The models folder: our override, then settings.json "downloadsFolder", then <home>/models."""
    if os.environ.get(ENV_LMSTUDIO_MODELS):
        return Path(os.environ[ENV_LMSTUDIO_MODELS]).expanduser()
    base = lms_home or lmstudio_home()
    try:
        settings = safeio.read_json(base / "settings.json")
    except (OSError, ValueError):
        settings = {}  # LM Studio's own file: unreadable means its default folder
    folder = settings.get("downloadsFolder") if isinstance(settings, dict) else None
    if isinstance(folder, str) and folder.strip():
        return Path(folder).expanduser()
    return base / "models"


# --- exo --------------------------------------------------------------------------------------


def exo_home() -> Path:
    """EXO_HOME is joined to $HOME by exo; absolute values therefore stay absolute."""
    sub = os.environ.get("EXO_HOME")
    if sub:
        return home() / sub
    if sys.platform == "darwin":
        return home() / ".exo"
    return home() / ".local" / "share" / "exo"


def exo_default_models_dir() -> Path:
    if os.environ.get("EXO_DEFAULT_MODELS_DIR"):
        return Path(os.environ["EXO_DEFAULT_MODELS_DIR"]).expanduser()
    if os.environ.get("EXO_HOME") or sys.platform != "darwin":
        return exo_home() / "models"
    return home() / ".exo" / "models"


def _split(var: str) -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get(var, "").split(":") if p.strip()]


def exo_read_only_dirs() -> list[Path]:
    return _split("EXO_MODELS_READ_ONLY_DIRS")


def exo_models_dirs() -> list[Path]:
    """Every directory exo searches, read-only ones first (exo's own order)."""
    dirs = exo_read_only_dirs() + _split("EXO_MODELS_DIRS") + [exo_default_models_dir()]
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def exo_custom_cards_dir() -> Path:
    return exo_home() / "custom_model_cards"


def exo_model_dirname(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def exo_api() -> str:
    """exo's HTTP API: EXO_API, else exo's default port on this machine."""
    return (os.environ.get("EXO_API") or "http://localhost:52415").strip().rstrip("/")


# --- arthur-cluster's own state ----------------------------------------------------------------


def state_dir() -> Path:
    """Where arthur-cluster keeps its own files (exo link dir, hash cache, deployments, jobs)."""
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR]).expanduser()
    if sys.platform == "darwin":
        return home() / "Library" / "Application Support" / "arthur-cluster"
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else home() / ".local" / "share") / "arthur-cluster"


def exo_links_dir() -> Path:
    """The read-only directory the linker fills; the user adds it to EXO_MODELS_READ_ONLY_DIRS."""
    return state_dir() / "exo-models"


def deployment_file() -> Path:
    return state_dir() / "deployment.json"


def jobs_dir() -> Path:
    return state_dir() / "jobs"


def prompt_cache_dir() -> Path:
    return state_dir() / "prompt-cache"


def private_dir(path: Path) -> Path:
    """A folder only this user can enter (0700): records, tokens and rank locks live in it. One we own that is
    wider is narrowed; one another user owns is refused, since they could read or swap what we write."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise LocationError(f"{path} belongs to another user (uid {st.st_uid}); set {ENV_STATE_DIR} to a folder "
                            "of your own")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Write beside the target, then rename: readers see the old file or the new one, never half of one.
    With `mode` (0o600 for records and tokens) the file has that mode from its creation on, never wider."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        if mode is None:
            tmp.write_text(text, encoding="utf-8")
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), mode)  # the umask may have narrowed it; never wider than asked
                f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write or the rename failed
