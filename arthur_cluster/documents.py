"""Document inputs and chunking: text, Markdown, PDF and stdin become one document; long ones are cut into
chunks at paragraph or heading boundaries, with overlap, so that each fits a token budget.

No mlx or transformers here: token counts come from a function the caller passes in.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from .errors import ArthurError

Counter = Callable[[str], int]

PDF_SUFFIXES = {".pdf"}
PAGE_BREAK = "\f"
# The cap on one input: 16 MB of text is about 4M tokens, 15x the longest context of the models this runs;
# planning reads and tokenizes every byte, so the cap bounds its time and memory.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024


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


def _regular_size(path: Path) -> int:
    """The size of a regular file; FIFOs, devices and sockets would block or never end."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DocumentError(f"{path}: no such file") from None
    except OSError as e:
        raise DocumentError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DocumentError(f"{path}: is a directory; pass the files inside it")
    if not stat.S_ISREG(st.st_mode):
        raise DocumentError(f"{path}: not a regular file (a pipe, device or socket); save it to a file, or pipe "
                            "it to stdin with '-'")
    if st.st_size > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"{path}: {st.st_size:,} bytes is past the cap of {MAX_DOCUMENT_BYTES:,} bytes per "
                            "document; split it into parts and run one job per part")
    return st.st_size


def decode(name: str, raw: bytes, kind: str = "text") -> Source:
    if b"\0" in raw[:8192]:
        raise DocumentError(f"{name}: looks binary, not text; pass text, Markdown or PDF files")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{name}: not UTF-8 text (byte {e.start}); convert it with iconv -t UTF-8") from None
    return Source(name, text, kind)


def read_text(path: Path) -> Source:
    _regular_size(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DOCUMENT_BYTES + 1)  # bounded even if the file grows while it is read
    except OSError as e:
        raise DocumentError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"{path}: past the cap of {MAX_DOCUMENT_BYTES:,} bytes per document; split it")
    return decode(str(path), raw)


def read_stdin(stdin: TextIO | None = None) -> Source:
    """stdin as bytes (binary input is refused, not a traceback), read up to the cap."""
    stream = stdin or sys.stdin
    buf = getattr(stream, "buffer", None)
    raw = buf.read(MAX_DOCUMENT_BYTES + 1) if buf is not None else stream.read(MAX_DOCUMENT_BYTES + 1).encode()
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"stdin: past the cap of {MAX_DOCUMENT_BYTES:,} bytes per document; split the input")
    return decode("stdin", raw, "stdin")


def read_one(name: str, stdin: TextIO | None = None) -> Source:
    if name == "-":
        return read_stdin(stdin)
    path = Path(name).expanduser()
    if path.suffix.lower() in PDF_SUFFIXES and path.is_file():
        _regular_size(path)
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


def _cut(text: str, a: int, b: int, size: int) -> list[tuple[int, int]]:
    """[a, b) in pieces of at most `size` characters, each ending after a line end, else a space, in its
    second half when there is one (else anywhere). One pass: rfind looks at each window once."""
    out = []
    while b - a > size:
        end = a + size
        for sep in ("\n", " "):
            k = text.rfind(sep, a + size // 2, end)
            if k != -1:
                end = k + 1
                break
        out.append((a, end))
        a = end
    out.append((a, b))
    return out


def _split_long(text: str, span: tuple[int, int], count: Counter, budget: int,
                known: int | None = None) -> list[tuple[int, int, int]]:
    """A span as (start, end, tokens) pieces of at most `budget` tokens. A span over the budget is cut by
    characters in proportion to its own tokens per character (90%, for uneven text), and only the pieces
    still over are cut again: each level counts the text once, so the work stays linear in practice."""
    a, b = span
    n = count(text[a:b]) if known is None else known
    if n <= budget or b - a <= 1:
        return [(a, b, n)]
    size = max(1, int((b - a) * budget / n * 0.9))
    out = []
    for x, y in _cut(text, a, b, size):
        out += _split_long(text, (x, y), count, budget)
    return out


def _pieces(text: str, count: Counter, budget: int) -> list[tuple[int, int, int]]:
    """Blocks, with long ones pre-cut so that no single count call sees more than a few budgets of text."""
    window = max(256, budget * 4)  # characters: most tokenizers give 1-6 characters per token
    out = []
    for a, b in blocks(text):
        for x, y in _cut(text, a, b, window):
            out += _split_long(text, (x, y), count, budget)
    return out


def chunk(text: str, count: Counter, budget: int, overlap: int = 0) -> list[Chunk]:
    """Pack whole blocks into chunks of at most `budget` tokens; each chunk after the first starts with the
    last blocks of the one before, up to `overlap` tokens, so that nothing is cut off from its context."""
    if budget <= 0:
        raise ValueError("chunk budget must be positive")
    overlap = max(0, min(overlap, budget // 2))
    pieces = _pieces(text, count, budget)
    spans = [(a, b) for a, b, _ in pieces]
    sizes = [n for _, _, n in pieces]
    chunks: list[Chunk] = []
    i = 0
    while i < len(spans):
        j, est = i + 1, sizes[i]
        while j < len(spans) and est + sizes[j] + 1 <= budget:  # +1: the blank line between blocks
            est += sizes[j] + 1
            j += 1
        a = spans[i][0]
        n = count(text[a:spans[j - 1][1]]) if j > i + 1 else sizes[i]
        while n > budget and j > i + 1:  # merges at block joins can add a token or two: give back blocks
            j -= 1
            n = count(text[a:spans[j - 1][1]]) if j > i + 1 else sizes[i]
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
