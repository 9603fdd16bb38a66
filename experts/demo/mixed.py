"""Mixed-domain documents for gate training and evaluation, built per split from that split's material only.

Kinds: commented code, package READMEs, JSON with prose, math word problems, and stitched multi-domain documents.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

from experts.demo import readers, textutil
from experts.demo.readers import Doc

MIN_TOKENS, MAX_TOKENS = 200, 800
SEGMENT_TOKENS = (50, 300)
CHARS_PER_TOKEN = 3.2  # rough, only to cut windows; final lengths are checked with the real tokenizer
# documents per kind per split (full build); quick builds use a tenth
COUNTS = {"gate": {"code_comments": 80, "readme": 110, "json_prose": 80, "math_prose": 70, "stitched": 120},
          "heldout": {"code_comments": 30, "readme": 45, "json_prose": 30, "math_prose": 25, "stitched": 50}}
REQUIRES = {"code_comments": {"code"}, "readme": set(), "json_prose": {"json", "prose"}, "math_prose": {"math"},
            "stitched": set()}  # pools a kind cannot do without (a tiny quick build may leave one empty)
README_GATE_SHARE = 0.6  # of packages; the rest are held out
_FENCE = {"code": "python", "json": "json", "math": "", "prose": ""}
_LEADS = ["Here is an example:", "For example:", "The following snippet shows this:", "Consider the following.",
          "As an illustration:", "The response looks like this:", "A typical configuration:", "Worked example:"]


def metadata_readmes() -> list[tuple[str, str]]:
    """(package, long description) from every installed *.dist-info/METADATA: real prose + code documents."""
    out = []
    for dist in sorted(readers.SITE.glob("*.dist-info")):
        meta = dist / "METADATA"
        if not meta.is_file():
            continue
        text = meta.read_text(encoding="utf-8", errors="replace")
        _head, _, body = text.partition("\n\n")  # RFC 822 headers, blank line, then the long description
        if len(body.strip()) >= 1500:
            out.append((dist.name.split("-")[0].lower(), body.strip()))
    return out


def window(text: str, tokens: int, rng: random.Random) -> str:
    """A run of whole lines of about `tokens` tokens, starting at a random line (blank-line aligned if possible)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if i == 0 or not lines[i - 1].strip()] or [0]
    start = rng.choice(starts[: max(1, len(starts) - 1)])
    out, size = [], 0
    for line in lines[start:]:
        if size + len(line) > tokens * CHARS_PER_TOKEN and out:
            break
        out.append(line)
        size += len(line) + 1
    return "\n".join(out).strip("\n")


def comment_ratio(code: str) -> float:
    """Share of characters in comments and docstrings: high for code written with English explanations."""
    comments = sum(len(m) for m in re.findall(r"#[^\n]*", code))
    docstrings = sum(len(m) for m in re.findall(r'(?s)""".*?"""', code))
    return (comments + docstrings) / max(1, len(code))


def is_word_problem(text: str) -> bool:
    return any(len(line.split()) >= 15 and sum(w.isalpha() for w in line.split()) > 0.6 * len(line.split())
               for line in text.splitlines())


def segment(domain: str, pool: list[Doc], rng: random.Random, fence_p: float = 0.7) -> str:
    """One 50-300 token piece of a random document of `domain`, fenced like markdown for code/JSON."""
    text = window(rng.choice(pool).text, rng.randint(*SEGMENT_TOKENS), rng)
    if domain in ("code", "json") and rng.random() < fence_p:
        return f"```{_FENCE[domain]}\n{text}\n```"
    return text


def stitched(pools: dict[str, list[Doc]], rng: random.Random) -> tuple[str, str]:
    order = rng.sample(list(pools), rng.randint(2, 4))
    parts = []
    for i, domain in enumerate(order):
        if i and rng.random() < 0.5:
            parts.append(rng.choice(_LEADS))
        parts.append(segment(domain, pools[domain], rng))
    return "\n\n".join(parts), "+".join(order)


def json_prose(pools: dict[str, list[Doc]], rng: random.Random) -> tuple[str, str]:
    documented = [d for d in pools["json"] if '"documentation"' in d.text or '"description"' in d.text]
    if documented and rng.random() < 0.4:
        doc = rng.choice(documented)  # API models and schemas: JSON whose values are English descriptions
        return window(doc.text, rng.randint(250, 700), rng), doc.source
    intro = segment("prose", pools["prose"], rng)
    block = segment("json", pools["json"], rng, fence_p=0.9)
    tail = segment("prose", pools["prose"], rng) if rng.random() < 0.4 else ""
    return "\n\n".join(p for p in (intro, rng.choice(_LEADS), block, tail) if p), "prose+json"


def make_doc(kind: str, pools: dict[str, list[Doc]], readmes: list[tuple[str, str]],
             rng: random.Random) -> tuple[str, str]:
    """(text, detail) of one mixed document of the given kind."""
    if kind == "code_comments":
        doc = rng.choice([d for d in pools["code"] if comment_ratio(d.text) > 0.25] or pools["code"])
        return window(doc.text, rng.randint(250, 750), rng), doc.source
    if kind == "readme":
        pkg, text = rng.choice(readmes)
        return window(text, rng.randint(250, 750), rng), pkg
    if kind == "json_prose":
        return json_prose(pools, rng)
    if kind == "math_prose":
        words = [d for d in pools["math"] if d.origin == "generated:math" and is_word_problem(d.text)]
        parts = [segment("prose", pools["prose"], rng)] if rng.random() < 0.3 else []
        parts += [rng.choice(words or pools["math"]).text for _ in range(rng.randint(2, 4))]
        return "\n\n".join(parts), "word problems"
    return stitched(pools, rng)


def build_mixed(split: str, pools: dict[str, list[Doc]], readmes: list[tuple[str, str]], seed: int,
                n_tokens: Callable[[str], int], scale: float = 1.0) -> list[Doc]:
    """Mixed docs of one split (gate or heldout), each MIN..MAX tokens, from that split's pools only."""
    rng = random.Random(f"{seed}:mixed:{split}")
    pools = {domain: pool for domain, pool in pools.items() if pool}
    docs: list[Doc] = []
    seen: set[str] = set()  # small pools can yield the same window twice
    for kind, count in COUNTS[split].items():
        want, tries = max(2, int(count * scale)), 0
        if REQUIRES[kind] - set(pools) or (kind == "readme" and not readmes) or len(pools) < 2:
            continue
        while sum(d.origin == kind for d in docs) < want and tries < want * 20:
            tries += 1
            text, detail = make_doc(kind, pools, readmes, rng)
            n = n_tokens(text)
            if n > MAX_TOKENS:
                text = textutil.cut_lines(text, int(len(text) * MAX_TOKENS / n * 0.95))
                n = n_tokens(text)
            key = textutil.dedup_key(text)
            if MIN_TOKENS <= n <= MAX_TOKENS and key not in seen:
                seen.add(key)
                docs.append(Doc(text, "mixed", f"{kind}:{detail}", kind, f"mixed:{split}"))
    return docs


def split_readmes(readmes: list[tuple[str, str]], seed: int) -> dict[str, list[tuple[str, str]]]:
    """Split package READMEs by package name: no package appears in both gate and heldout."""
    out: dict[str, list[tuple[str, str]]] = {"gate": [], "heldout": []}
    for pkg, text in readmes:
        side = "gate" if textutil.stable_unit(pkg, salt=f"{seed}:readme") < README_GATE_SHARE else "heldout"
        out[side].append((pkg, text))
    return out


def write_mixed(out: Path, corpora: dict[str, dict[str, list[Doc]]], seed: int, n_tokens: Callable[[str], int],
                quick: bool, write_jsonl: Callable) -> dict[str, list[Doc]]:
    """data/mixed/{gate,heldout}.jsonl plus data/eval/heldout_mixed.jsonl and heldout_all.jsonl."""
    readmes = split_readmes(metadata_readmes(), seed)
    mixed = {}
    for split in ("gate", "heldout"):
        pools = {domain: splits[split] for domain, splits in corpora.items()}
        mixed[split] = build_mixed(split, pools, readmes[split], seed, n_tokens, scale=0.1 if quick else 1.0)
        write_jsonl(out / "data" / "mixed" / f"{split}.jsonl", mixed[split])
    write_jsonl(out / "data" / "eval" / "heldout_mixed.jsonl", mixed["heldout"])
    pure = [d for splits in corpora.values() for d in splits["heldout"]]
    write_jsonl(out / "data" / "eval" / "heldout_all.jsonl", pure + mixed["heldout"])
    return mixed
