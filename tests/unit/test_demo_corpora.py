"""Demo corpora: deterministic selection, splits by source group, valid JSON pieces, code-free prose."""

from __future__ import annotations

import json
import random

from experts.demo import corpora, mathgen, mixed, readers, textutil
from experts.demo.corpora import Budget

SMALL = Budget(domain_chars=40_000)


def _docs(domain: str, seed: int = 0) -> list[readers.Doc]:
    return corpora.domain_docs(domain, SMALL, seed, set())


def test_code_selection_is_deterministic_and_seeded():
    first, again, other = _docs("code"), _docs("code"), _docs("code", seed=1)
    assert [d.text for d in first] == [d.text for d in again]
    assert [d.source for d in first] != [d.source for d in other]
    assert sum(len(d.text) for d in first) >= SMALL.domain_chars
    assert all(len(d.text) <= SMALL.code_file for d in first)


def test_math_mixes_docstrings_and_generated_exercises_deterministically():
    docs = _docs("math")
    assert [d.text for d in docs] == [d.text for d in _docs("math")]
    origins = {d.origin for d in docs}
    assert "generated:math" in origins and origins & {"pkg:sympy", "pkg:mpmath", "pkg:numpy", "pkg:scipy"}


def test_splits_are_by_group_and_disjoint():
    docs = _docs("code") + _docs("math") + _docs("json")
    split_of_group: dict[str, str] = {}
    texts: dict[str, set[str]] = {s: set() for s in corpora.SPLITS}
    for doc in docs:
        split = corpora.split_of(doc.group, seed=0)
        assert split_of_group.setdefault(doc.group, split) == split, "a source group spans two splits"
        texts[split].add(textutil.dedup_key(doc.text))
    assert not (texts["train"] & texts["gate"]) and not (texts["train"] & texts["heldout"])
    assert not (texts["gate"] & texts["heldout"])
    assert set(split_of_group.values()) == set(corpora.SPLITS)


def test_take_deduplicates_and_caps_origins():
    doc = readers.Doc("same text " * 50, "code", "a", "pkg:a", "a")
    copies = [("pkg:a", lambda: [doc])] * 3
    assert len(corpora.take(copies, "code", 10_000, set())) == 1
    many = [("pkg:b", lambda i=i: [readers.Doc(f"{i} " + "x" * 100, "code", str(i), "pkg:b", str(i))])
            for i in range(100)]
    taken = corpora.take(many, "code", 10_000, set())
    assert sum(len(d.text) for d in taken) <= corpora.DEFAULT_ORIGIN_CAP["code"] * 10_000 + 110


def test_json_pieces_are_valid_and_bounded():
    obj = {"shapes": {f"Shape{i}": {"type": "structure", "documentation": "<p>An API shape.</p>" * (i % 7),
                                    "members": {f"m{j}": {"shape": "String"} for j in range(i % 9)}}
                      for i in range(400)}, "version": "2.0"}
    style = {"indent": 2, "separators": (",", ":"), "ensure_ascii": False}
    pieces = list(readers.json_pieces(obj, 4000, style))
    assert len(pieces) > 10
    for piece in pieces:
        assert isinstance(json.loads(piece), dict)
        assert len(piece) <= 2 * 4000


def test_rst_and_html_extraction_drop_code():
    rst = "Intro text that explains the idea in words.\n\n.. code-block:: python\n\n   x = 1\n\n" \
          "Use :func:`len` like this::\n\n   len([1, 2])\n\n>>> print(3)\n3\n\nClosing words here."
    text = textutil.rst_to_text(rst)
    assert "x = 1" not in text and "len([1, 2])" not in text and "print(3)" not in text
    assert "Use len like this:" in text and "Closing words here." in text
    html = "<p>The <code>apt</code> tool installs packages for you.</p><pre>apt install foo</pre>"
    assert textutil.paragraphs(textutil.html_to_text(html)) == ["The apt tool installs packages for you."]
    assert textutil.is_prose("The quick brown fox jumps over the lazy dog near the river bank.")
    assert not textutil.is_prose("x = {'a': foo(bar), 'b': baz[0]} if y else None  # type: ignore")


def test_math_generator_is_seeded_and_varied():
    assert mathgen.exercises(3, 20_000) == mathgen.exercises(3, 20_000)
    rng = random.Random(0)
    texts = [mathgen.exercise(rng) for _ in range(400)]
    assert len(set(texts)) == len(texts)
    openings = {t.split(".")[0].split(":")[0][:12] for t in texts}
    assert len(openings) > 50, "exercises should not all share a template"


def test_mixed_windows_and_readme_split_by_package():
    text = "\n".join(f"line {i} " + "word " * 8 for i in range(200))
    piece = mixed.window(text, 100, random.Random(0))
    assert piece and piece in text and len(piece) <= 100 * mixed.CHARS_PER_TOKEN + 60
    readmes = [(f"pkg{i}", "readme") for i in range(50)]
    split = mixed.split_readmes(readmes, seed=0)
    assert not {p for p, _ in split["gate"]} & {p for p, _ in split["heldout"]}
    assert len(split["gate"]) + len(split["heldout"]) == 50
