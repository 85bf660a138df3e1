"""Document inputs (text, Markdown, PDF, stdin, several files) and chunking at block boundaries."""

from __future__ import annotations

import io

import pytest

from arthur_cluster import documents
from arthur_cluster.documents import DocumentError


def words(text: str) -> int:
    """A stand-in token counter: chunking only needs a monotone count."""
    return len(text.split())


def write_pdf(path, pages: list[str]) -> None:
    """A minimal PDF (Helvetica text, one content stream per page) written by hand, xref offsets included."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        lines = "".join(f"({line}) Tj 0 -14 Td " for line in text.split("\n"))
        stream = f"BT /F1 12 Tf 72 720 Td {lines}ET"
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        content = len(objs)
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
                    "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)


def test_text_markdown_and_crlf_normalised(tmp_path):
    f = tmp_path / "notes.md"
    f.write_bytes(b"# Title  \r\n\r\nFirst paragraph.\r\n")
    doc = documents.load([str(f)])
    assert doc.text == "# Title\n\nFirst paragraph."
    assert doc.names == [str(f)] and len(doc.sha256) == 64


def test_several_files_become_one_document_with_markers(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.md"
    a.write_text("Alpha text.")
    b.write_text("# B\n\nBeta text.")
    doc = documents.load([str(a), str(b)])
    assert doc.text.index(documents.marker(str(a))) < doc.text.index("Alpha") < doc.text.index(
        documents.marker(str(b))) < doc.text.index("Beta")


def test_stdin(tmp_path):
    doc = documents.load(["-"], stdin=io.StringIO("from a pipe\n"))
    assert doc.text == "from a pipe" and doc.sources[0].kind == "stdin"


def test_pdf_pages_are_read_with_page_breaks(tmp_path):
    pdf = tmp_path / "spec.pdf"
    write_pdf(pdf, ["Page one says hello.", "Page two says goodbye."])
    src = documents.read_one(str(pdf))
    assert src.kind == "pdf" and src.pages == 2
    assert "hello" in src.text and "goodbye" in src.text and documents.PAGE_BREAK in src.text
    # In the document, a page break cuts a block, like a blank line.
    doc = documents.load([str(pdf)])
    assert [doc.text[a:b] for a, b in documents.blocks(doc.text)] == ["Page one says hello.",
                                                                       "Page two says goodbye."]


@pytest.mark.parametrize("content,match", [
    (None, "no such file"),
    (b"\x00\x01binary", "looks binary"),
    (b"\xff\xfe\xfa not utf8", "not UTF-8"),
    (b"  \n\n", "empty"),
])
def test_bad_inputs_name_the_file_and_the_fix(tmp_path, content, match):
    f = tmp_path / "input.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(DocumentError, match=match) as e:
        documents.load([str(f)])
    assert str(f) in str(e.value)


def test_broken_pdf_is_a_clear_error(tmp_path):
    f = tmp_path / "broken.pdf"
    f.write_bytes(b"%PDF-1.4\nthis is not a pdf body")
    with pytest.raises(DocumentError, match="broken.pdf"):
        documents.load([str(f)])


def _doc(n: int) -> str:
    parts = []
    for i in range(n):
        parts.append(f"## Heading {i}\nParagraph {i} " + "word " * (5 + i % 7))
    return "\n\n".join(parts)


def test_chunks_fit_the_budget_start_at_blocks_and_overlap():
    text = _doc(40)
    starts = {a for a, _ in documents.blocks(text)}
    chunks = documents.chunk(text, words, budget=60, overlap=20)
    assert len(chunks) > 3
    for c in chunks:
        assert c.tokens == words(c.text) <= 60
        assert c.start in starts  # cut at a heading/paragraph boundary
        assert text[c.start:c.end] == c.text
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.start < prev.end  # overlap: the next chunk repeats the end of the previous one
        assert nxt.start > prev.start  # and always moves forward
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for a, b in documents.blocks(text) for i in range(a, b))


def test_headings_start_new_blocks_even_without_blank_lines():
    spans = documents.blocks("intro line\n# Head\nbody\n## Sub\nmore")
    assert len(spans) == 3


def test_a_block_over_the_budget_is_cut_at_lines_then_words():
    text = "\n".join(f"line {i} " + "x " * 10 for i in range(20))  # one block of 20 lines
    chunks = documents.chunk(text, words, budget=30, overlap=0)
    assert len(chunks) > 1 and all(c.tokens <= 30 for c in chunks)
    assert "".join(c.text for c in chunks).replace("\n", "") == text.replace("\n", "")
    one_line = "y " * 100
    pieces = documents.chunk(one_line, words, budget=16)
    assert all(p.tokens <= 16 for p in pieces) and sum(p.tokens for p in pieces) == 100
