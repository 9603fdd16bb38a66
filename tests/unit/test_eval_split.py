"""The independent held-out split: disjoint from every demo corpus source, natural windows, deterministic."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from experts.demo import independent as ind
from experts.demo import readers, textutil

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "artifacts" / "demo"


def prose_debs() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    block = re.search(r"PROSE_DEBS :=(.*?)\n[^\s\\]", text, re.DOTALL).group(1)
    return set(block.replace("\\", " ").split())


def test_no_source_package_of_the_demo_corpora_is_read():
    assert not set(ind.INDEPENDENT_DEBS) & prose_debs()
    # no Debian package that ships the demo's Python/JSON sources (the .venv and the stdlib are not Debian's)
    assert not any(p.startswith(("python3.11", "python3-doc")) for p in ind.INDEPENDENT_DEBS)
    for kind, (_, pkgs, _) in ind.KINDS.items():
        for path, _ in ind.candidates(kind, pkgs)[:200]:
            s = str(path.resolve())
            assert not s.startswith((str(readers.SITE), str(readers.STDLIB))), (kind, s)
            assert "/.venv/" not in s


def test_windows_are_whole_lines_of_the_source():
    text = "\n".join(f"line {i} " + "word " * (i % 7) for i in range(200))
    rng = random.Random(0)
    for _ in range(20):
        w = ind.window(text, 500, rng)
        assert 0 < len(w) <= 500
        assert all(line in text.splitlines() for line in w.splitlines())


def test_contamination_check_drops_windows_that_share_lines_with_demo_corpora():
    seen = {"this line is long enough to count as a shared line of text"}
    shared = "this line is long enough to count as a shared line of text\nshort\n"
    assert ind.contaminated(shared * 2, seen)
    assert not ind.contaminated("another long line that nobody has ever seen anywhere\n" * 9 + shared, seen)


def test_info_nodes_and_calc_help_are_cleaned():
    assert ind._calc_help("NAME\n  sin\n\n## Copyright (C) 1999\n## text") == "NAME\n  sin"
    assert ind.dedent_common("       a\n         b\nNAME\n") == "a\n  b\nNAME"


@pytest.mark.skipif(not (DEMO / "data" / "eval" / "independent.jsonl").exists(), reason="demo split not built")
def test_built_split_shares_no_document_with_the_demo_corpora():
    docs = [json.loads(line) for line in (DEMO / "data" / "eval" / "independent.jsonl").read_text().splitlines()]
    assert len(docs) >= 100
    assert {d["kind"] for d in docs} == set(ind.KINDS)
    keys = {textutil.dedup_key(d["text"]) for d in docs}
    for path in (DEMO / "data").glob("*/*.jsonl"):
        if path.parent.name == "eval":
            continue
        for line in path.read_text().splitlines():
            assert textutil.dedup_key(json.loads(line)["text"]) not in keys, path
