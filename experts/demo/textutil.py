"""Text clean-up for the demo corpora: HTML/reST to prose, prose-paragraph filtering, chunking.

Pure functions over strings; nothing here touches the file system or knows which domain it serves.
"""

from __future__ import annotations

import hashlib
import re
from html.parser import HTMLParser

# Block-level tags end a paragraph; <pre>/<code> blocks are dropped because prose must stay code-free.
_BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "dd", "dt", "dl", "h1", "h2", "h3", "h4", "h5", "h6",
               "tr", "td", "th", "section", "blockquote", "title", "hr", "article", "header"}
_SKIP_TAGS = {"script", "style", "pre", "head", "nav", "footer", "table"}
_CODE_CHARS = set("{}[]()<>=_/\\$`|#@;*&^~%")


class _ProseHTML(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in _SKIP_TAGS:
            self.skip += 1
            self.parts.append("\n\n")
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page with paragraphs separated by blank lines; code blocks removed."""
    parser = _ProseHTML()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


_RST_DIRECTIVE = re.compile(r"^\s*\.\. ")
_RST_ROLE = re.compile(r":[a-z:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")


def rst_to_text(rst: str) -> str:
    """reST source to plain paragraphs: drops directives, literal blocks and doctests; keeps role text."""
    out: list[str] = []
    skip_indent: int | None = None  # inside a literal block / directive body: skip lines indented deeper
    in_doctest = False
    for line in rst.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if in_doctest:
            in_doctest = bool(stripped)
            continue
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if stripped.startswith(">>>"):
            in_doctest = True
            out.append("")
        elif _RST_DIRECTIVE.match(line):
            skip_indent = indent
            out.append("")
        elif stripped and set(stripped) <= set("=-~^*#+'`\""):
            out.append("")  # section underline
        elif stripped.endswith("::"):
            skip_indent = indent
            out.append(line.rstrip()[:-1])
        else:
            out.append(line)
    text = "\n".join(out)
    text = _RST_LINK.sub(r"\1", _RST_ROLE.sub(r"\1", text))
    return text.replace("``", "").replace("**", "")


def paragraphs(text: str) -> list[str]:
    """Split on blank lines and unwrap each paragraph onto one line (hard-wrapped sources read alike)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if para:
            out.append(para)
    return out


def is_prose(para: str, min_words: int = 8) -> bool:
    """True for an English sentence-like paragraph: enough words, few code characters, mostly letters."""
    words = para.split()
    if len(words) < min_words:
        return False
    letters = sum(c.isalpha() for c in para)
    if letters < 0.72 * len(para):
        return False
    codeish = sum(1 for w in words if _CODE_CHARS & set(w) or (w.isupper() and len(w) > 3))
    if codeish > 0.08 * len(words):
        return False
    # prose has sentences: punctuation at the end and lowercase function words
    lower = sum(1 for w in words if w.islower())
    return lower > 0.5 * len(words) and para[-1] in ".!?:;)\"'"


def pack(paragraph_list: list[str], max_chars: int, sep: str = "\n\n") -> list[str]:
    """Greedily join consecutive paragraphs into documents of at most max_chars (long ones stand alone)."""
    docs, cur, size = [], [], 0
    for para in paragraph_list:
        if cur and size + len(para) + len(sep) > max_chars:
            docs.append(sep.join(cur))
            cur, size = [], 0
        cur.append(para[:max_chars])
        size += len(cur[-1]) + len(sep)
    if cur:
        docs.append(sep.join(cur))
    return docs


def cut_lines(text: str, max_chars: int) -> str:
    """Truncate at the last line break before max_chars, so code is cut between lines, not inside one."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut + 1 if cut > 0 else max_chars]


def dedup_key(text: str) -> str:
    """Whitespace-insensitive content hash: vendored copies of one file count once."""
    return hashlib.sha1(" ".join(text.split()).encode("utf-8", "replace")).hexdigest()


def stable_unit(key: str, salt: str = "") -> float:
    """Deterministic number in [0, 1) from a string; used to assign sources to splits."""
    digest = hashlib.sha1(f"{salt}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
