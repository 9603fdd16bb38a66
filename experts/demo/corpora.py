"""Assemble the four demo domain corpora (code, prose, math, json) from on-disk sources, deduplicated and split.

`build_corpora(out, quick, seed)` -> {domain: {split: [Doc]}} and writes data/<domain>/<split>.jsonl under out.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from experts.demo import mathgen, readers, textutil
from experts.demo.readers import Doc

DOMAINS = ("code", "prose", "math", "json")
SPLITS = ("train", "gate", "heldout")
# stable_unit(group) below 0.82 -> train, below 0.91 -> gate, else heldout: split by source file, never by token.
SPLIT_EDGES = (0.82, 0.91)

# Where each domain's text comes from and under which licence (the README table is made from this).
SOURCES: dict[str, list[dict[str, str]]] = {
    "code": [
        {"source": "CPython 3.11 standard library (*.py)", "licence": "PSF-2.0"},
        {"source": "Python sources of the packages installed in .venv (torch, transformers, vllm, ray, sympy, "
                   "scipy, numpy, botocore, ...)", "licence": "each package's own: Apache-2.0, BSD-3-Clause, MIT, "
                                                              "... (per-package list in manifest.json)"},
    ],
    "prose": [
        {"source": "debian-handbook (en-US HTML)", "licence": "GPL-2.0+ or CC-BY-SA-3.0"},
        {"source": "debian-reference-en (HTML)", "licence": "GPL-2+"},
        {"source": "debian-faq (HTML)", "licence": "verbatim/modified copies permitted (SPI), GPL-2+"},
        {"source": "maint-guide (HTML)", "licence": "MIT / GPL-2.0+"},
        {"source": "developers-reference (reST sources)", "licence": "GPL-2"},
        {"source": "python3-doc: Python 3.11 docs reST sources (tutorial, howto, faq, whatsnew, reference, "
                   "library; code blocks removed)", "licence": "PSF-2.0"},
        {"source": "gnu-standards (GNU Coding Standards, Information for Maintainers)", "licence": "GFDL-1.3+"},
        {"source": "jargon-text (The Jargon File 4.4.7)", "licence": "public domain (packaging scripts GPL)"},
        {"source": "fortunes, fortunes-min (BSD fortune databases)", "licence": "BSD-3-Clause / public domain"},
        {"source": "/usr/share/common-licenses (licence texts from base-files)", "licence": "verbatim copying"},
    ],
    "math": [
        {"source": "math-heavy docstrings of sympy, mpmath, numpy, scipy", "licence": "BSD-3-Clause"},
        {"source": "experts/demo/mathgen.py + mathwords.py: 39 exercise families with worked solutions",
         "licence": "this repository's licence (Apache-2.0)"},
    ],
    "json": [
        {"source": "botocore data/ (AWS API models, paginators, waiters, examples; .json and .json.gz)",
         "licence": "Apache-2.0"},
        {"source": "other .json shipped in .venv packages (vllm, sklearn, pycountry, ray, jsonschema "
                   "specifications, ...)", "licence": "each package's own (manifest.json)"},
    ],
    "mixed": [
        {"source": "package long descriptions (*.dist-info/METADATA bodies: README markdown/reST with code)",
         "licence": "each package's own; split by package, never used to train experts"},
        {"source": "stitched segments of the gate/heldout splits above", "licence": "as their sources"},
    ],
}


@dataclass(frozen=True)
class Budget:
    domain_chars: int  # characters per domain before splitting (~4 chars per token)
    code_file: int = 12_000  # per-file caps so no single source dominates
    prose_doc: int = 4_000
    json_piece: int = 8_000
    json_pieces: int = 3
    math_doc: int = 6_000
    math_real_share: float = 0.45  # docstrings; generated exercises fill the rest


FULL = Budget(domain_chars=6_500_000)
# small documents in quick builds, so every split of every domain still gets a few dozen
QUICK = Budget(domain_chars=150_000, code_file=3_000, prose_doc=2_000, json_piece=2_000, math_doc=2_000)
# Largest share of a domain's characters one origin may take (stdlib and botocore are collections of many files).
ORIGIN_CAP = {"python-stdlib": 0.30, "pkg:botocore": 0.75, "python3-doc": 0.30, "fortunes": 0.30,
              "generated:math": 1.0}
DEFAULT_ORIGIN_CAP = {"code": 0.05, "prose": 0.30, "math": 0.20, "json": 0.06}


Loader = tuple[str, Callable[[], list[Doc]]]  # (origin, read its docs): files are read only when needed


def take(loaders: Iterable[Loader], domain: str, limit: int, seen: set[str]) -> list[Doc]:
    """Accept docs in order until `limit` characters, skipping duplicates and origins that reached their cap."""
    taken: list[Doc] = []
    total, per_origin = 0, {}
    for origin, load in loaders:
        cap = ORIGIN_CAP.get(origin, DEFAULT_ORIGIN_CAP[domain]) * limit
        if per_origin.get(origin, 0) >= cap:
            continue
        for doc in load():
            key = textutil.dedup_key(doc.text)
            if key in seen or per_origin.get(origin, 0) >= cap:  # may overshoot by one doc: never reads in vain
                continue
            seen.add(key)
            taken.append(doc)
            per_origin[origin] = per_origin.get(origin, 0) + len(doc.text)
            total += len(doc.text)
        if total >= limit:
            break
    return taken


def _files(files: list, rng: random.Random, read: Callable) -> list[Loader]:
    """Loaders for files in a seeded random order; a loader returns the file's docs (none if rejected)."""
    files = list(files)
    rng.shuffle(files)

    def loader(origin: str, path: Path) -> Callable[[], list[Doc]]:
        def load() -> list[Doc]:
            result = read(origin, path)  # a reader returns one Doc, a list of them, or None
            return result if isinstance(result, list) else [result] if result else []

        return load

    return [(origin, loader(origin, path)) for origin, path in files]


def _docs(docs: list[Doc]) -> list[Loader]:
    return [(d.origin, lambda d=d: [d]) for d in docs]


def domain_docs(domain: str, budget: Budget, seed: int, seen: set[str]) -> list[Doc]:
    rng = random.Random(f"{seed}:{domain}")
    limit = budget.domain_chars
    if domain == "code":
        return take(_files(readers.python_files(), rng, lambda o, p: readers.code_doc(o, p, budget.code_file)),
                    domain, limit, seen)
    if domain == "prose":
        docs = list(readers.prose_docs(budget.prose_doc))
        rng.shuffle(docs)
        return take(_docs(docs), domain, limit, seen)
    if domain == "json":
        return take(_files(readers.json_files(), rng,
                           lambda o, p: readers.json_docs(o, p, budget.json_piece, budget.json_pieces)),
                    domain, limit, seen)
    real_limit = int(limit * budget.math_real_share)
    real = take(_files(readers.math_files(), rng, lambda o, p: readers.math_docstring_docs(o, p, budget.math_doc)),
                domain, real_limit, seen)
    made = sum(len(d.text) for d in real)
    generated = [Doc(text, "math", f"mathgen#{i}", "generated:math", f"mathgen#{i}")
                 for i, text in enumerate(mathgen.exercises(seed, limit - made))]
    return real + take(_docs(generated), domain, limit - made, seen)


def split_of(group: str, seed: int) -> str:
    u = textutil.stable_unit(group, salt=str(seed))
    return SPLITS[0] if u < SPLIT_EDGES[0] else SPLITS[1] if u < SPLIT_EDGES[1] else SPLITS[2]


def write_jsonl(path: Path, docs: Iterable[Doc]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc.text, "domain": doc.domain, "source": doc.source}, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_corpora(out: Path, quick: bool = False, seed: int = 0,
                  log: Callable[[str], None] = print) -> dict[str, dict[str, list[Doc]]]:
    """All four domains, each split by source group, written as JSONL under out/data/<domain>/."""
    budget = QUICK if quick else FULL
    seen: set[str] = set()  # shared across domains: a text lands in at most one corpus
    corpora: dict[str, dict[str, list[Doc]]] = {}
    for domain in DOMAINS:
        docs = domain_docs(domain, budget, seed, seen)
        splits: dict[str, list[Doc]] = {s: [] for s in SPLITS}
        for doc in docs:
            splits[split_of(doc.group, seed)].append(doc)
        for name, part in splits.items():
            write_jsonl(out / "data" / domain / f"{name}.jsonl", part)
        corpora[domain] = splits
        sizes = ", ".join(f"{s} {len(p)} docs/{sum(len(d.text) for d in p) / 1e6:.2f}M chars" for s, p in splits.items())
        log(f"corpus {domain}: {sizes}")
    return corpora


def origins_used(corpora: dict[str, dict[str, list[Doc]]]) -> dict[str, dict[str, int]]:
    """Characters per origin per domain, for the manifest's sources summary."""
    out: dict[str, dict[str, int]] = {}
    for domain, splits in corpora.items():
        counts: dict[str, int] = {}
        for docs in splits.values():
            for doc in docs:
                counts[doc.origin] = counts.get(doc.origin, 0) + len(doc.text)
        out[domain] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    return out


def licences_used(corpora: dict[str, dict[str, list[Doc]]]) -> dict[str, str]:
    """Licence of every installed package whose files were read (code, JSON, math docstrings)."""
    by_pkg = readers.package_licences()
    used = {o.split(":", 1)[1] for splits in corpora.values() for docs in splits.values() for d in docs
            for o in [d.origin] if o.startswith("pkg:")}
    return {pkg: by_pkg.get(pkg, "see package metadata") for pkg in sorted(used)}
