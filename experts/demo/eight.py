"""The 8-expert demo: each domain of a 4-expert demo build split in two, branched from the same seed.

`ensemble build-demo --experts 8 --base artifacts/demo --out artifacts/demo8` reuses the base build's tokenizer,
seed model, generalist and data splits, and branches eight experts from the seed, each on one half of a
domain's train split. The eight branches together get the token budget the four did (each half as many
steps), so the generalist, trained on the same seed plus the union of the four domains' branch rows, is still
the equal-budget baseline. Outside `make test` (`make demo8`, about 3 minutes of training).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

_SCIENCE = {"numpy", "scipy", "sympy", "pandas", "sklearn", "numba", "networkx", "matplotlib", "mpmath",
            "contourpy", "narwhals", "mpl_toolkits", "cycler", "joblib", "pyarrow", "llvmlite"}
_LITERARY = ("fortunes", "jargon-text", "common-licenses")


def _prefix(doc: dict) -> str:
    return doc["source"].split(":", 1)[0].split("/", 1)[0]


# expert name -> (domain of the base build, does a train document of that domain belong to it)
SUBDOMAINS: dict[str, tuple[str, Callable[[dict], bool]]] = {
    "code_sci": ("code", lambda d: _prefix(d) in _SCIENCE),                 # numeric / scientific Python
    "code_sys": ("code", lambda d: _prefix(d) not in _SCIENCE),             # stdlib, frameworks, tooling
    "prose_tech": ("prose", lambda d: _prefix(d) not in _LITERARY),         # manuals, handbooks, Python docs
    "prose_lit": ("prose", lambda d: _prefix(d) in _LITERARY),              # fortunes, jargon file, licences
    "math_ex": ("math", lambda d: d["source"].startswith("mathgen#")),      # generated exercises, worked
    "math_doc": ("math", lambda d: not d["source"].startswith("mathgen#")), # math docstrings of libraries
    "json_api": ("json", lambda d: _prefix(d) == "botocore"),               # API models and schemas
    "json_data": ("json", lambda d: _prefix(d) != "botocore"),              # data and configuration JSON
}
EXPERTS8 = tuple(SUBDOMAINS)


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        else:
            shutil.rmtree(dst)
    dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


def build_eight(base: Path, out: Path, workers: int, log: Callable[[str], None]) -> dict:
    """Branch the eight experts from base/seed; link base's tokenizer, generalist and data; write manifest.json."""
    from transformers import MixtralConfig

    from experts.demo import tokenizer as tk
    from experts.demo.build import run_plans
    from experts.demo.train import TrainArgs, encode_docs, pack_rows, take_rows

    manifest = json.loads((base / "manifest.json").read_text())
    branch = manifest["training"]["branch_args"]
    targs = TrainArgs(**{**branch, "init_from": base / "seed"})
    half = replace(targs, steps=max(1, targs.steps // 2), warmup_steps=max(4, targs.warmup_steps // 2),
                   threads=max(1, 2 // workers))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "generalist", "seed", "data"):
        _link(base / name, out / name)
    tokenizer = tk.load_tokenizer(base / "tokenizer")
    config = MixtralConfig.from_pretrained(str(base / "seed"))
    jobs, sizes = [], {}
    for i, (name, (domain, belongs)) in enumerate(SUBDOMAINS.items()):
        with (base / "data" / domain / "train.jsonl").open(encoding="utf-8") as f:
            docs = [d for d in map(json.loads, f) if belongs(d)]
        rows = pack_rows(encode_docs(tokenizer, [d["text"] for d in docs]), half.seq_len, half.seed + 10 + i)
        sizes[name] = {"domain": domain, "train_docs": len(docs), "available_rows": len(rows)}
        jobs.append((name, take_rows(rows, half.steps * half.batch_size, half.seed + 10 + i), half,
                     out / "experts" / name))
    log(f"8 experts: {half.steps} steps x {half.tokens_per_step} tokens each, from {base / 'seed'}")
    plans = [jobs[w::workers] for w in range(workers)]
    stats = run_plans(config, plans)
    for name in EXPERTS8:
        tk.copy_tokenizer(out / "tokenizer", out / "experts" / name)
    info = {"experts": list(EXPERTS8), "base": str(base), "subdomains": sizes, "branch_args": {
        **{k: str(v) if isinstance(v, Path) else v for k, v in half.__dict__.items()}},
        "budget": {"seed_tokens": manifest["training"]["budget"]["seed_tokens"],
                   "tokens_per_expert_branch": half.steps * half.tokens_per_step,
                   "experts_total_tokens": manifest["training"]["budget"]["seed_tokens"]
                   + len(EXPERTS8) * half.steps * half.tokens_per_step,
                   "generalist_total_tokens": manifest["training"]["budget"]["generalist_total_tokens"]},
        "models": stats}
    (out / "manifest.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    (out / ".built").write_text("8 experts\n")
    return info
