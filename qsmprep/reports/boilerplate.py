"""The methods boilerplate: citations resolved against qsmprep's bibliography.

The workflows' ``__desc__`` paragraphs (:mod:`qsmprep.workflows.boilerplate`) cite as
``[@key]`` or ``[@key1; @key2]``. :func:`render` numbers the citations in order of first
appearance and gives the text as markdown and HTML plus the reference list;
:func:`write_citation_files` writes ``CITATION.md``, ``CITATION.html`` and
``CITATION.bib`` (only the cited entries) into a folder.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

_CITE_RE = re.compile(r"\[(@[\w:-]+(?:\s*;\s*@[\w:-]+)*)\]")
_ENTRY_RE = re.compile(r"@(\w+)\s*\{\s*([^,\s]+)\s*,", re.MULTILINE)
_LATEX_ACCENTS = {
    "\\'": "\u0301",
    '\\"': "\u0308",
    "\\^": "\u0302",
    "\\`": "\u0300",
    "\\~": "\u0303",
    "\\.": "\u0307",
}


@dataclass(frozen=True)
class BibEntry:
    """One BibTeX entry: its type, key, fields (braces kept) and source text."""

    kind: str
    key: str
    fields: dict[str, str] = field(compare=False)
    source: str = field(compare=False)

    def text(self, name: str) -> str:
        """Field ``name`` as plain text (LaTeX braces and accents resolved)."""
        return latex_to_text(self.fields.get(name, ""))

    def formatted(self, max_authors: int = 6) -> str:
        """``Authors (year). Title. Venue, volume(number), pages. doi:...`` as plain text."""
        authors = [a.strip() for a in self.text("author").split(" and ") if a.strip()]
        names = []
        for a in authors:
            last, _, first = a.partition(",")
            initials = "".join(p[0] for p in re.split(r"[\s.-]+", first.strip()) if p)
            names.append(f"{last.strip()} {initials}".strip())
        if len(names) > max_authors:
            names = names[:max_authors] + ["et al."]
        venue = self.text("journal") or self.text("booktitle")
        volume = self.text("volume")
        number = self.text("number")
        pages = self.text("pages").replace("--", "-")
        where = venue
        if volume:
            where += f", {volume}" + (f"({number})" if number else "")
        if pages:
            where += f", {pages}"
        doi = self.text("doi")
        out = f"{', '.join(names)} ({self.text('year')}). {self.text('title')}. {where}."
        return out + (f" doi:{doi}" if doi else "")


def latex_to_text(value: str) -> str:
    """Plain text from a BibTeX field: accents (``{\\'e}``), ``\\&`` and braces resolved."""
    import unicodedata

    out = value
    for cmd, mark in _LATEX_ACCENTS.items():
        out = re.sub(
            r"\{?" + re.escape(cmd) + r"\{?([A-Za-z])\}?\}?",
            lambda m, mk=mark: m.group(1) + mk,
            out,
        )
    out = out.replace("{\\.I}", "I\u0307").replace("\\&", "&")
    out = out.replace("{", "").replace("}", "")
    return unicodedata.normalize("NFC", re.sub(r"\s+", " ", out)).strip()


def parse_bibtex(text: str) -> dict[str, BibEntry]:
    """Entries of a BibTeX file by key (``ValueError`` on unbalanced braces or duplicates)."""
    entries: dict[str, BibEntry] = {}
    for m in _ENTRY_RE.finditer(text):
        start = text.index("{", m.start())
        depth, i = 0, start
        while i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        else:
            raise ValueError(f"unbalanced braces in BibTeX entry {m.group(2)}")
        body = text[m.end() : i]
        key = m.group(2)
        if key in entries:
            raise ValueError(f"duplicate BibTeX key {key}")
        entries[key] = BibEntry(m.group(1).lower(), key, _fields(body), text[m.start() : i + 1])
    return entries


def _fields(body: str) -> dict[str, str]:
    out, i = {}, 0
    while True:
        m = re.compile(r"\s*(\w+)\s*=\s*").match(body, i)
        if not m:
            break
        i = m.end()
        if body[i] == "{":
            depth, j = 0, i
            while True:
                depth += {"{": 1, "}": -1}.get(body[j], 0)
                if depth == 0:
                    break
                j += 1
            out[m.group(1).lower()] = body[i + 1 : j]
            i = j + 1
        else:
            j = body.find(",", i)
            j = len(body) if j < 0 else j
            out[m.group(1).lower()] = body[i:j].strip().strip('"')
            i = j
        i = body.find(",", i)
        if i < 0:
            break
        i += 1
    return out


@lru_cache(maxsize=1)
def bibliography() -> dict[str, BibEntry]:
    """qsmprep's bibliography (``qsmprep/data/qsmprep.bib``)."""
    return parse_bibtex(resources.files("qsmprep").joinpath("data/qsmprep.bib").read_text())


def cited_keys(text: str) -> list[str]:
    """The keys cited in ``text``, in order of first appearance."""
    keys: list[str] = []
    for m in _CITE_RE.finditer(text):
        for k in m.group(1).split(";"):
            k = k.strip().lstrip("@")
            if k not in keys:
                keys.append(k)
    return keys


@dataclass(frozen=True)
class Boilerplate:
    """Rendered boilerplate: markdown and HTML text, and the cited entries in order."""

    markdown: str
    html: str
    references: tuple[BibEntry, ...]

    @property
    def bibtex(self) -> str:
        return "\n\n".join(e.source for e in self.references) + "\n"


def render(text: str, bib: dict[str, BibEntry] | None = None) -> Boilerplate:
    """Number the ``[@key]`` citations of ``text`` (paragraphs separated by blank lines).

    ``KeyError`` names a cited key that is not in the bibliography.
    """
    bib = bibliography() if bib is None else bib
    keys = cited_keys(text)
    missing = [k for k in keys if k not in bib]
    if missing:
        raise KeyError(f"cited but not in qsmprep.bib: {', '.join(missing)}")
    number = {k: i + 1 for i, k in enumerate(keys)}

    def numbers(m: re.Match) -> list[int]:
        return [number[k.strip().lstrip("@")] for k in m.group(1).split(";")]

    md = _CITE_RE.sub(lambda m: "[" + ", ".join(map(str, numbers(m))) + "]", text)
    refs = tuple(bib[k] for k in keys)
    md += "\n\n### References\n\n" + "\n".join(
        f"{i}. {e.formatted()}" for i, e in enumerate(refs, 1)
    )
    paragraphs = []
    for para in re.split(r"\n\s*\n", text.strip()):
        pieces, last = [], 0
        for m in _CITE_RE.finditer(para):
            pieces.append(html.escape(para[last : m.start()]))
            links = ", ".join(f'<a href="#ref-{n}">{n}</a>' for n in numbers(m))
            pieces.append(f"[{links}]")
            last = m.end()
        pieces.append(html.escape(para[last:]))
        paragraphs.append(f"<p>{''.join(pieces)}</p>")
    items = "\n".join(f'<li id="ref-{i}">{_html_reference(e)}</li>' for i, e in enumerate(refs, 1))
    body = (
        "\n".join(paragraphs) + f'\n<h4>References</h4>\n<ol class="references">\n{items}\n</ol>'
    )
    return Boilerplate(md, body, refs)


def _html_reference(entry: BibEntry) -> str:
    text = html.escape(entry.formatted())
    doi = entry.text("doi")
    if doi:
        esc = html.escape(doi)
        text = text.replace(f"doi:{esc}", f'doi:<a href="https://doi.org/{esc}">{esc}</a>')
    return text


CITATION_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qsmprep: methods and citations</title>
<style>body{{font-family:sans-serif;max-width:52em;margin:2em auto;line-height:1.45}}</style>
</head><body><h1>Methods</h1>
{body}
</body></html>
"""


def write_citation_files(text: str, folder: Path) -> Boilerplate:
    """Write ``CITATION.md``, ``CITATION.html`` and ``CITATION.bib`` for ``text`` into
    ``folder`` (atomically); return the rendered boilerplate."""
    from ..interfaces._io import atomic_write_bytes

    rendered = render(text)
    folder = Path(folder)
    header = "# Methods\n\n"
    atomic_write_bytes((header + rendered.markdown + "\n").encode(), folder / "CITATION.md")
    page = CITATION_HTML.format(body=rendered.html)
    atomic_write_bytes(page.encode(), folder / "CITATION.html")
    atomic_write_bytes(rendered.bibtex.encode(), folder / "CITATION.bib")
    return rendered
