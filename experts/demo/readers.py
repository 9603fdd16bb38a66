"""Find and read the on-disk sources of each demo domain (Python code, prose, JSON, math text).

Each reader returns `Doc`s (text + provenance) in a deterministic order; budgets and splits are corpora.py's job.
"""

from __future__ import annotations

import gzip
import inspect
import itertools
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from experts.demo import textutil

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SITE = Path(sysconfig.get_paths()["purelib"])


@dataclass(frozen=True)
class Doc:
    text: str
    domain: str
    source: str  # human-readable provenance, e.g. "stdlib:json/decoder.py"
    origin: str  # licence key: "python-stdlib", "pkg:numpy", "debian-handbook", "generated:math"
    group: str  # split unit: every Doc of one group lands in the same split


def _walk(root: Path, suffixes: tuple[str, ...], skip_dirs: set[str]) -> list[Path]:
    """All files under root with one of the suffixes, sorted, skipping named directories."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.endswith(".dist-info"))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(suffixes))
    return found


def _read(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def python_files() -> list[tuple[str, Path]]:
    """(origin, path) for the stdlib and every installed package's Python source, sorted."""
    out = [("python-stdlib", p) for p in _walk(STDLIB, (".py",), {"site-packages", "__pycache__", "idlelib"})]
    for top in sorted(p for p in SITE.iterdir() if p.is_dir() and "." not in p.name and p.name != "__pycache__"):
        out.extend((f"pkg:{top.name}", p) for p in _walk(top, (".py",), {"__pycache__"}))
    return out


def looks_generated(text: str) -> bool:
    """Machine-written tables and blobs teach nothing about Python; real code has short lines."""
    lines = text.splitlines() or [""]
    longest = max(len(line) for line in lines)
    mean = len(text) / len(lines)
    letters = sum(c.isalpha() for c in text) / max(1, len(text))
    return longest > 400 or mean > 90 or letters < 0.45


def code_doc(origin: str, path: Path, max_chars: int) -> Doc | None:
    text = textutil.cut_lines(_read(path), max_chars)
    if len(text) < 400 or looks_generated(text):
        return None
    rel = path.relative_to(STDLIB if origin == "python-stdlib" else SITE)
    return Doc(text, "code", f"{origin.split(':')[-1]}:{rel}", origin, f"code:{origin}:{rel}")


# ---------------------------------------------------------------- prose
DOC = Path("/usr/share/doc")
PROSE_FILES: dict[str, list[tuple[str, str]]] = {
    # origin -> [(glob under /, format)]; format picks the text extractor
    "debian-handbook": [("usr/share/doc/debian-handbook/html/en-US/*.html", "html")],
    "debian-reference-en": [("usr/share/debian-reference/*.en.html", "html")],
    "debian-faq": [("usr/share/doc/debian/FAQ/*.en.html", "html")],
    "maint-guide": [("usr/share/doc/maint-guide/html/*.en.html", "html")],
    "developers-reference": [("usr/share/developers-reference/_sources/*.rst.txt", "rst")],
    "python3-doc": [(f"usr/share/doc/python3.11-doc/html/_sources/{d}/*.rst.txt", "rst")
                    for d in ("tutorial", "howto", "faq", "whatsnew", "reference", "library", "using",
                              "extending", "installing", "distributing")],
    "gnu-standards": [("usr/share/doc/gnu-standards/*.text.gz", "text")],
    "jargon-text": [("usr/share/doc/jargon-text/jargon.txt.gz", "text")],
    "common-licenses": [("usr/share/common-licenses/*", "text")],
    "fortunes": [("usr/share/games/fortunes/*", "fortune")],
}
# ASCII art and non-English fortune files are not prose.
_FORTUNE_SKIP = {"art", "ascii-art", "translate-me", "perl", "knghtbrd", "linux", "debian", "zippy"}


def _fortune_docs(path: Path, origin: str, max_chars: int) -> list[tuple[str, str]]:
    """Fortunes keep their line breaks (poems, dialogue); 20-odd consecutive ones make one document."""
    items = [f.strip("\n") for f in _read(path).split("\n%\n")]
    items = [f for f in items if f.strip() and sum(c.isalpha() for c in f) > 0.6 * len(f)]
    return [(d, f"{origin}:{path.name}#{i}") for i, d in enumerate(textutil.pack(items, max_chars))]


def prose_docs(max_chars: int) -> Iterator[Doc]:
    """Prose paragraphs (code, tables and navigation removed) packed into documents of <= max_chars."""
    for origin, patterns in PROSE_FILES.items():
        for pattern, fmt in patterns:
            for path in sorted(Path("/").glob(pattern)):
                if not path.is_file() or path.is_symlink() or path.name.endswith((".dat", ".u8")):
                    continue
                if fmt == "fortune":
                    if path.name in _FORTUNE_SKIP:
                        continue
                    pieces = _fortune_docs(path, origin, max_chars)
                else:
                    raw = _read(path)
                    text = {"html": textutil.html_to_text, "rst": textutil.rst_to_text}.get(fmt, str)(raw)
                    paras = [p for p in textutil.paragraphs(text) if textutil.is_prose(p)]
                    pieces = [(d, f"{origin}:{path.parent.name}/{path.name}#{i}")
                              for i, d in enumerate(textutil.pack(paras, max_chars))]
                for text, source in pieces:
                    # a few neighbouring chunks form one split group: big single files still spread over splits
                    group = source.rsplit("#", 1)[0] + f"#{int(source.rsplit('#', 1)[1]) // 3}"
                    yield Doc(text, "prose", source, origin, group)


# ---------------------------------------------------------------- JSON
def json_files() -> list[tuple[str, Path]]:
    """(origin, path) of every .json / .json.gz shipped by installed packages, sorted."""
    out = []
    for top in sorted(p for p in SITE.iterdir() if p.is_dir() and "." not in p.name):
        out.extend((f"pkg:{top.name}", p) for p in _walk(top, (".json", ".json.gz"), {"__pycache__"}))
    return out


def _json_style(text: str) -> dict:
    """Re-serialise pieces in the file's own layout (indent width, compact colons)."""
    m = re.search(r"\n( +)\S", text[:4000])
    indent = len(m.group(1)) if m else None
    compact = '":"' in text[:4000] or '":[' in text[:4000] or '":{' in text[:4000]
    return {"indent": indent, "separators": (",", ":") if compact else (",", ": "), "ensure_ascii": False}


def _size(obj: object) -> int:
    """Compact length via the C encoder; indented output (pure-Python encoder) is too slow to measure with."""
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


def json_pieces(obj: object, max_chars: int, style: dict) -> Iterator[str]:
    """Split a large JSON value into valid JSON documents of about <= max_chars by grouping its members."""
    budget = max_chars * 2 // 3 if style.get("indent") else max_chars  # indentation adds about half again
    if _size(obj) <= budget:
        yield json.dumps(obj, **style)
        return
    if not isinstance(obj, (dict, list)) or not obj:
        return  # one oversized string: not worth a document
    items = list(obj.items()) if isinstance(obj, dict) else list(enumerate(obj))
    if len(items) == 1:
        key, inner = items[0]
        for piece in json_pieces(inner, max_chars, style):
            yield json.dumps(_rebuild(obj, [(key, json.loads(piece))]), **style)
        return
    batches: list[list] = [[]]
    size = 0
    for key, value in items:
        n = _size(value) + len(str(key)) + 4
        if batches[-1] and size + n > budget:
            batches.append([])
            size = 0
        batches[-1].append((key, value))
        size += n
    if len(batches) == 1:  # separators pushed it over: halve so recursion always shrinks
        batches = [items[: len(items) // 2], items[len(items) // 2 :]]
    for batch in batches:
        yield from json_pieces(_rebuild(obj, batch), max_chars, style)


def _rebuild(obj: object, items: list) -> object:
    return dict(items) if isinstance(obj, dict) else [v for _, v in items]


def json_docs(origin: str, path: Path, max_chars: int, max_pieces: int) -> list[Doc]:
    """A JSON file as-is if small, else up to max_pieces valid sub-documents spread through the file."""
    try:
        text = _read(path)
        if len(text) <= max_chars:
            json.loads(text)
            pieces = [text]
        else:
            # the first few dozen pieces are enough to spread max_pieces over; piecing a whole 5 MB API model is slow
            all_pieces = list(itertools.islice(json_pieces(json.loads(text), max_chars, _json_style(text)), 8 * max_pieces))
            step = max(1, len(all_pieces) // max_pieces)
            pieces = all_pieces[::step][:max_pieces]
    except (ValueError, RecursionError):
        return []  # JSON with comments or other dialects: not the format we teach
    rel = path.relative_to(SITE)
    group = f"json:{rel.parent}" if origin == "pkg:botocore" else f"json:{rel}"
    return [Doc(p, "json", f"{rel}#{i}", origin, group) for i, p in enumerate(pieces) if len(p) > 200]


# ---------------------------------------------------------------- math text
MATH_PACKAGES = ("sympy", "mpmath", "numpy", "scipy")
_MATH_WORDS = re.compile(
    r"\b(integer|integral|polynomial|matrix|equation|derivative|prime|sqrt|root|series|sum|product|"
    r"logarithm|exponential|fraction|rational|theorem|sine|cosine|factor|divisor|modulo|limit|"
    r"eigen\w*|determinant|vector|probability|distribution|function|zeta|gamma|bessel|coefficient)s?\b", re.IGNORECASE)
_DOCSTRING = re.compile(r'(?s)[ \t]*(?:r|R)?("""|\'\'\')(.*?)\1')


def math_files() -> list[tuple[str, Path]]:
    skip = {"__pycache__", "tests", "testing", "benchmarks", "_vendor", "f2py", "distutils", "_build_utils"}
    return [(f"pkg:{pkg}", p) for pkg in MATH_PACKAGES if (SITE / pkg).is_dir()
            for p in _walk(SITE / pkg, (".py",), skip)]


def math_docstring_docs(origin: str, path: Path, max_chars: int) -> list[Doc]:
    """Math-heavy docstrings of one module (definitions, formulas, worked examples)."""
    rel = path.relative_to(SITE)
    docs = []
    for m in _DOCSTRING.finditer(_read(path)):
        doc = inspect.cleandoc(m.group(2))
        hits = len(_MATH_WORDS.findall(doc))
        if len(doc) >= 300 and hits >= 3 and hits * 120 >= len(doc) // 4:
            docs.append(textutil.cut_lines(doc, max_chars))
    return [Doc(d, "math", f"{rel}#{i}", origin, f"math:{rel}") for i, d in enumerate(docs)]


def package_licences() -> dict[str, str]:
    """Top-level import name -> licence string from the installed distribution's metadata."""
    from importlib import metadata

    by_dist: dict[str, str] = {}
    for dist in metadata.distributions():
        meta = dist.metadata
        lic = meta.get("License-Expression") or ""
        if not lic:
            classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")]
            lic = ", ".join(classifiers) or (meta.get("License") or "see package metadata").splitlines()[0][:60]
        by_dist[(meta.get("Name") or "").lower().replace("-", "_")] = lic
    out = {}
    for top, dists in metadata.packages_distributions().items():
        out[top] = by_dist.get(dists[0].lower().replace("-", "_"), "see package metadata")
    return out
