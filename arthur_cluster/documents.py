"""Document inputs and chunking: text, Markdown, PDF and stdin become one document; long ones are cut into
chunks at paragraph or heading boundaries, with overlap, so that each fits a token budget.

No mlx or transformers here: token counts come from a function the caller passes in.
"""

from __future__ import annotations

from .errors import ArthurError

import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

Counter = Callable[[str], int]

PDF_SUFFIXES = {".pdf"}
PAGE_BREAK = "\f"


class DocumentError(ArthurError, ValueError):
    """An input cannot be read as a document; the message names the file and the fix."""


@dataclass(frozen=True)
class Source:
    name: str  # the path as given, or "stdin"
    text: str
    kind: str  # text | pdf | stdin
    pages: int = 0


@dataclass(frozen=True)
class Document:
    text: str
    sources: list[Source] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    start: int  # character offsets in the document text
    end: int
    tokens: int


# --- reading ---------------------------------------------------------------------------------------


def read_pdf(path: Path) -> Source:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, PyPdfError

    try:
        reader = PdfReader(str(path))
        pages = [(p.extract_text() or "").strip() for p in reader.pages]
    except (PyPdfError, DependencyError, OSError, ValueError, KeyError) as e:  # encrypted, damaged, too large
        raise DocumentError(f"{path}: cannot read this PDF ({e}); convert it to text and pass the .txt file") from None
    if not any(pages):
        raise DocumentError(f"{path}: the PDF holds no extractable text (a scan?); run OCR on it first")
    return Source(str(path), f"\n{PAGE_BREAK}\n".join(pages), "pdf", pages=len(pages))


def read_text(path: Path) -> Source:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DocumentError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DocumentError(f"{path}: is a directory; pass the files inside it") from None
    except OSError as e:
        raise DocumentError(f"{path}: cannot read ({e.strerror})") from None
    if b"\0" in raw[:8192]:
        raise DocumentError(f"{path}: looks binary, not text; pass text, Markdown or PDF files")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{path}: not UTF-8 text (byte {e.start}); convert it with iconv -t UTF-8") from None
    return Source(str(path), text, "text")


def read_one(name: str, stdin: TextIO | None = None) -> Source:
    if name == "-":
        return Source("stdin", (stdin or sys.stdin).read(), "stdin")
    path = Path(name).expanduser()
    if path.suffix.lower() in PDF_SUFFIXES and path.is_file():
        return read_pdf(path)
    return read_text(path)


def normalize(text: str) -> str:
    """Unix line ends and no trailing spaces, so the same text always hashes (and tokenizes) the same."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def marker(name: str) -> str:
    return f"===== file: {name} ====="


def combine(sources: list[Source]) -> Document:
    """One source stays as it is; several are joined in order, each under a file marker."""
    if not sources:
        raise DocumentError("no input: pass one or more files, or '-' for stdin")
    for s in sources:
        if not normalize(s.text).strip():
            raise DocumentError(f"{s.name}: empty; remove it from the command")
    if len(sources) == 1:
        return Document(normalize(sources[0].text), sources)
    parts = [f"{marker(s.name)}\n\n{normalize(s.text)}" for s in sources]
    return Document("\n\n".join(parts), sources)


def load(names: list[str], stdin: TextIO | None = None) -> Document:
    if names.count("-") > 1:
        raise DocumentError("'-' (stdin) given more than once")
    return combine([read_one(n, stdin) for n in names])


# --- chunking --------------------------------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6} |===== file: )")


def blocks(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of paragraphs of a normalized text: cut at blank lines (a PDF's page
    breaks become blank lines when normalized) and before headings."""
    spans: list[tuple[int, int]] = []
    start = None
    pos = 0
    for line in text.splitlines(keepends=True):
        bare = line.strip()
        if start is not None and (not bare or _HEADING.match(line)):
            spans.append((start, pos))
            start = None
        if bare and start is None:
            start = pos
        pos += len(line)
    if start is not None:
        spans.append((start, pos))
    return [(a, b) for a, b in (_trim(text, s) for s in spans) if b > a]


def _trim(text: str, span: tuple[int, int]) -> tuple[int, int]:
    a, b = span
    while b > a and text[b - 1] == "\n":
        b -= 1
    return a, b


def _split_long(text: str, span: tuple[int, int], count: Counter, budget: int) -> list[tuple[int, int]]:
    """A block over the budget is cut at line ends, then at spaces, then anywhere."""
    a, b = span
    if count(text[a:b]) <= budget:
        return [span]
    for sep in ("\n", " "):
        cuts = [a] + [i + 1 for i in range(a, b - 1) if text[i] == sep] + [b]
        if len(cuts) > 2:
            return _pack_cuts(text, cuts, count, budget)
    return _pack_cuts(text, list(range(a, b + 1)), count, budget)


def _pack_cuts(text: str, cuts: list[int], count: Counter, budget: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(cuts) - 1:
        lo, hi = i + 1, len(cuts) - 1
        while lo < hi:  # the furthest cut whose piece still fits
            mid = (lo + hi + 1) // 2
            if count(text[cuts[i]:cuts[mid]]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo == i + 1 and count(text[cuts[i]:cuts[lo]]) > budget and cuts[lo] - cuts[i] > 1:
            out += _pack_cuts(text, list(range(cuts[i], cuts[lo] + 1)), count, budget)
        else:
            out.append((cuts[i], cuts[lo]))
        i = lo
    return out


def chunk(text: str, count: Counter, budget: int, overlap: int = 0) -> list[Chunk]:
    """Pack whole blocks into chunks of at most `budget` tokens; each chunk after the first starts with the
    last blocks of the one before, up to `overlap` tokens, so that nothing is cut off from its context."""
    if budget <= 0:
        raise ValueError("chunk budget must be positive")
    overlap = max(0, min(overlap, budget // 2))
    spans: list[tuple[int, int]] = []
    for span in blocks(text):
        spans += _split_long(text, span, count, budget)
    sizes = [count(text[a:b]) for a, b in spans]
    chunks: list[Chunk] = []
    i = 0
    while i < len(spans):
        j, est = i + 1, sizes[i]
        while j < len(spans) and est + sizes[j] + 1 <= budget:  # +1: the blank line between blocks
            est += sizes[j] + 1
            j += 1
        a = spans[i][0]
        n = count(text[a:spans[j - 1][1]])
        while n > budget and j > i + 1:  # merges at block joins can add a token or two: give back blocks
            j -= 1
            n = count(text[a:spans[j - 1][1]])
        b = spans[j - 1][1]
        chunks.append(Chunk(len(chunks), text[a:b], a, b, n))
        if j >= len(spans):
            break
        k, kept = j, 0  # step back over trailing blocks that fit in the overlap, keeping progress
        while k - 1 > i and kept + sizes[k - 1] <= overlap:
            k -= 1
            kept += sizes[k]
        i = k
    return chunks
