"""The independent held-out split: natural documents from on-disk sources that no demo corpus reads.

`build_independent(out, n_tokens, seed)` -> [Doc] and writes data/eval/independent.jsonl under out.

Every source is a Debian package in INDEPENDENT_DEBS (installed by `make sysdeps`), read through its dpkg
file list; none is a demo prose package, and nothing comes from the Python stdlib or the packages in .venv
(the code, JSON, math and mixed sources of the demo). Documents are windows of whole lines cut from one file
each, as the file has them (man pages rendered by groff, info manuals, Python/shell/Perl sources, JSON, math
manuals, READMEs): mixed documents are natural ones, never stitched. A window that shares more than a fifth
of its long lines with any demo corpus is dropped (boilerplate such as licence headers).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cache, lru_cache
from pathlib import Path

from experts.demo import textutil
from experts.demo.readers import Doc, _json_style, json_pieces

# kind -> (domain label, Debian packages read, documents in a full build). Domain "mixed" marks natural
# documents that interleave prose with code, commands, JSON or formulas.
KINDS: dict[str, tuple[str, tuple[str, ...], int]] = {
    "info_prose": ("prose", ("coreutils", "grep", "sed", "findutils", "diffutils", "gzip", "wget", "gettext",
                             "ed", "bzip2-doc", "time", "gnupg", "readline-common", "libtasn1-doc"), 30),
    "man_page": ("mixed", ("coreutils", "findutils", "grep", "sed", "tar", "gzip", "man-db", "dpkg", "apt",
                           "util-linux", "procps", "openssh-client", "git", "curl", "wget", "make", "bash",
                           "diffutils", "debianutils", "passwd", "login", "adduser", "jq", "bc",
                           "gnupg", "cmake", "perl", "less", "file", "xz-utils", "zstd"), 30),
    "python": ("code", ("python3-apt", "python3-software-properties", "python3-lazr.restfulclient",
                        "python3-lazr.uri", "python3-wadllib", "python3-httplib2", "python3-oauthlib",
                        "python3-dbus", "python3-distro", "python3-argcomplete", "python3-toml",
                        "python3-xmltodict", "yq", "python3-blinker", "python3-crcmod"), 20),
    "shell_config": ("code", ("debianutils", "gzip", "man-db", "dpkg", "dpkg-dev", "debconf", "ca-certificates",
                              "init-system-helpers", "adduser", "apt", "procps", "login", "passwd", "bash",
                              "util-linux", "openssh-client", "git"), 15),
    "perl_pod": ("mixed", ("libdpkg-perl", "debconf", "dpkg-dev", "perl-modules-5.36"), 10),
    "json": ("json", ("node-mdn-data", "iso-codes", "cmake-data", "node-ajv", "node-uri-js", "node-punycode",
                      "node-fast-deep-equal", "node-json-schema-traverse", "node-json-stable-stringify"), 30),
    "math_manual": ("math", ("maxima-doc", "calc-common", "bc"), 35),
    "readme": ("mixed", ("node-ajv", "node-mdn-data", "node-uri-js", "node-punycode", "node-fast-deep-equal",
                         "node-json-schema-traverse", "node-json-stable-stringify", "jq", "apt", "git", "curl",
                         "python3-httplib2", "python3-oauthlib", "python3-distro", "python3-toml",
                         "python3-xmltodict", "adduser", "calc-common"), 15),
}
INDEPENDENT_DEBS = tuple(sorted({p for _, pkgs, _ in KINDS.values() for p in pkgs}))
MIN_TOKENS, MAX_TOKENS = 150, 512
CONTAMINATION = 0.2   # max share of a window's long lines that may also occur in a demo corpus
_LONG_LINE = 32
PACKAGE_SHARE = 0.4   # no package gives more than this share of one kind's documents
MANUALS = ("info_prose", "math_manual")   # big single files give several windows (other kinds: 1 per file)
_DPKG_INFO = Path("/var/lib/dpkg/info")


@cache
def package_files(pkg: str) -> tuple[Path, ...]:
    """Regular files installed by a Debian package (its dpkg file list), sorted; [] if not installed."""
    lists = sorted(_DPKG_INFO.glob(f"{pkg}.list")) + sorted(_DPKG_INFO.glob(f"{pkg}:*.list"))
    files = set()
    for lst in lists:
        for line in lst.read_text(errors="replace").splitlines():
            p = Path(line)
            if line.startswith("/") and p.is_file() and not p.is_symlink():
                files.add(p)
    return tuple(sorted(files))


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


# ------------------------------------------------------------------ extractors: file -> natural text
def render_man(path: Path) -> str:
    """A man page as `man` shows it (groff, 78 columns, no hyphenation), header/footer and indent removed."""
    roff = read_text(path)
    if roff.lstrip().startswith(".so "):
        return ""                                  # a link to another page
    roff = re.sub(r"(?m)^(\.(TH|Dd)\b.*)$", r"\1\n.nh\n.ad l", roff, count=1)   # ragged right, unhyphenated
    out = subprocess.run(["groff", "-mandoc", "-Tutf8", "-P-cbou", "-rHY=0", "-rLL=78n"],
                         input=roff.encode(), capture_output=True, timeout=30, check=False).stdout.decode("utf-8", "replace")
    lines = out.replace("\u2010", "-").replace("\u2212", "-").splitlines()
    lines = lines[1:-1]                             # the running header and footer
    return dedent_common("\n".join(lines)).strip("\n")


def dedent_common(text: str) -> str:
    """Remove the indent all non-blank lines share, but keep section headings at column 0 as they are."""
    body = [line for line in text.splitlines() if line.strip() and line[0] == " "]
    cut = min((len(line) - len(line.lstrip()) for line in body), default=0)
    return "\n".join(line[cut:] if line.startswith(" " * cut) else line for line in text.splitlines())


@lru_cache(maxsize=64)
def info_nodes(path: Path) -> tuple[str, ...]:
    """The nodes of an info file, without their navigation header line; index and tag-table nodes dropped."""
    nodes = []
    for node in read_text(path).split("\x1f"):
        head, _, body = node.lstrip("\n").partition("\n")
        if not head.startswith("File:") or "Index" in head.split("Node:")[-1].split(",")[0]:
            continue
        nodes.append(body.strip("\n"))
    return tuple(n for n in nodes if len(n) > 300)


def is_shell(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(40)
    except OSError:
        return False
    return bool(re.match(rb"#! ?/(usr/)?bin/(env )?(ba|da)?sh\b", head))


def is_config(path: Path) -> bool:
    s = str(path)
    return (s.startswith("/etc/") or "/examples/" in s) and path.suffix in (".conf", ".cfg", "") and \
        not is_shell(path) and path.stat().st_size > 400


def pod_module(text: str) -> bool:
    return "\n=head1" in text or "\n=item" in text


def _calc_help(text: str) -> str:
    return text.split("\n## Copyright")[0].strip()


# ------------------------------------------------------------------ windows
def window(text: str, max_chars: int, rng: random.Random, starts: Callable[[list[str], int], bool] | None = None) -> str:
    """A run of whole lines of at most max_chars, starting at a paragraph (or `starts`) boundary."""
    lines = text.splitlines()
    ok = [i for i, line in enumerate(lines) if line.strip() and (i == 0 or not lines[i - 1].strip()
                                                                or (starts is not None and starts(lines, i)))]
    ok = [i for i in ok if sum(len(x) + 1 for x in lines[i:]) >= max_chars // 3] or ok or [0]
    start = rng.choice(ok)
    return textutil.cut_lines("\n".join(lines[start:]), max_chars).strip("\n")


def prose_of(text: str, max_chars: int, rng: random.Random) -> str:
    """Consecutive English paragraphs of a manual (code, tables and menus dropped), packed to max_chars."""
    paras = [p for p in textutil.paragraphs(text) if textutil.is_prose(p)]
    if not paras:
        return ""
    start = rng.randrange(max(1, len(paras) - 2))
    return textutil.pack(paras[start:], max_chars)[0]


def json_window(text: str, max_chars: int, rng: random.Random) -> str:
    """One valid JSON piece of a file (grouped members, in the file's own layout)."""
    try:
        pieces = list(json_pieces(json.loads(text), max_chars, _json_style(text)))
    except (ValueError, RecursionError):
        return ""
    return rng.choice(pieces) if pieces else ""


# ------------------------------------------------------------------ per kind: candidate texts
def _files(pkgs: tuple[str, ...], keep: Callable[[Path], bool]) -> list[Path]:
    return sorted({f for p in pkgs for f in package_files(p) if keep(f)})


def candidates(kind: str, pkgs: tuple[str, ...]) -> list[tuple[Path, Callable[[random.Random, int], str]]]:
    """(file, make a window of at most N chars) for every usable file of one kind."""
    if kind == "info_prose":
        files = _files(pkgs, lambda f: "/info/" in str(f) and ".info" in f.name)
        # one candidate per node; the window runs on into the following nodes as a reader would
        return [(f, lambda r, n, f=f, i=i: prose_of("\n\n".join(info_nodes(f)[i:i + 4]), n, r))
                for f in files for i in range(len(info_nodes(f)))]
    if kind == "man_page":
        if shutil.which("groff") is None:
            return []
        files = _files(pkgs, lambda f: re.search(r"/usr/share/man/man[158]/[^/]+\.gz$", str(f)) is not None)
        return [(f, lambda r, n, f=f: window(render_man(f), n, r)) for f in files]
    if kind == "python":
        files = _files(pkgs, lambda f: f.suffix == ".py" and "/tests/" not in str(f) and f.stat().st_size > 1500)
        return [(f, lambda r, n, f=f: window(read_text(f), n, r)) for f in files]
    if kind == "shell_config":
        files = _files(pkgs, lambda f: (is_shell(f) or is_config(f)) and f.stat().st_size > 600)
        return [(f, lambda r, n, f=f: window(read_text(f), n, r)) for f in files]
    if kind == "perl_pod":
        files = [f for f in _files(pkgs, lambda f: f.suffix == ".pm") if pod_module(read_text(f))]
        return [(f, lambda r, n, f=f: window(read_text(f), n, r)) for f in files]
    if kind == "json":
        files = _files(pkgs, lambda f: f.name.endswith(".json") and f.stat().st_size > 600)
        return [(f, lambda r, n, f=f: json_window(read_text(f), n, r)) for f in files]
    if kind == "math_manual":
        maxima = _files(pkgs, lambda f: re.search(r"/info/maxima\.info-\d", str(f)) is not None)
        calc = _files(pkgs, lambda f: "/calc/help/" in str(f) and not f.name.startswith(("COPYING", "custom")))
        bc = _files(pkgs, lambda f: f.name == "bc.info.gz")
        out = [(f, lambda r, n, f=f: _calc_help(read_text(f))[:n]) for f in calc]
        for f in maxima + bc:      # a big manual: one candidate per node, so it can give several documents
            out += [(f, lambda r, n, t=t: window(t, n, r)) for t in info_nodes(f)]
        return out
    if kind == "readme":
        files = _files(pkgs, lambda f: re.search(r"/README(\.md|\.markdown|\.txt)?(\.gz)?$", f.name) is not None
                       or f.name.lower().startswith("readme"))
        return [(f, lambda r, n, f=f: window(read_text(f), n, r)) for f in files]
    raise ValueError(f"unknown kind {kind!r}")


def demo_lines(data_dir: Path) -> set[str]:
    """Long stripped lines of every demo corpus file (train, gate, heldout, mixed): the contamination index."""
    seen: set[str] = set()
    for path in sorted(data_dir.glob("*/*.jsonl")):
        if path.parent.name == "eval":
            continue
        with path.open(encoding="utf-8") as f:
            for line in f:
                for text_line in json.loads(line)["text"].splitlines():
                    s = text_line.strip()
                    if len(s) >= _LONG_LINE:
                        seen.add(s)
    return seen


def contaminated(text: str, seen: set[str]) -> bool:
    long = [s for s in (line.strip() for line in text.splitlines()) if len(s) >= _LONG_LINE]
    return bool(long) and sum(s in seen for s in long) > CONTAMINATION * len(long)


def build_kind(kind: str, want: int, n_tokens: Callable[[str], int], seen: set[str], rng: random.Random,
               taken: set[str]) -> Iterator[Doc]:
    domain, pkgs, _ = KINDS[kind]
    cands = candidates(kind, pkgs)
    rng.shuffle(cands)
    per_file: dict[Path, int] = {}
    per_pkg: dict[str, int] = {}
    pkg_cap = max(2, int(want * PACKAGE_SHARE))
    made = 0
    for path, make in cands:
        if made >= want:
            return
        pkg = owner_of(path, pkgs)
        if per_file.get(path, 0) >= (pkg_cap if kind in MANUALS else 1) or per_pkg.get(pkg, 0) >= pkg_cap:
            continue
        try:
            text = make(rng, int(MAX_TOKENS * 3.0))
        except (OSError, subprocess.SubprocessError, ValueError):
            continue
        n = n_tokens(text) if text else 0
        if n > MAX_TOKENS:
            text = textutil.cut_lines(text, int(len(text) * MAX_TOKENS / n * 0.95))
            n = n_tokens(text)
        key = textutil.dedup_key(text)
        if n < MIN_TOKENS or key in taken or contaminated(text, seen):
            continue
        taken.add(key)
        per_file[path] = per_file.get(path, 0) + 1
        per_pkg[pkg] = per_pkg.get(pkg, 0) + 1
        made += 1
        yield Doc(text, domain, f"{kind}:{path}", f"deb:{pkg}", f"independent:{kind}")


def owner_of(path: Path, pkgs: tuple[str, ...]) -> str:
    return next((p for p in pkgs if path in package_files(p)), "?")


def build_independent(out: Path, n_tokens: Callable[[str], int], seed: int = 0, quick: bool = False,
                      log: Callable[[str], None] = print) -> list[Doc]:
    """Write out/data/eval/independent.jsonl (text, domain, source, kind) and return its documents."""
    seen = demo_lines(out / "data")
    taken: set[str] = set()
    docs: list[Doc] = []
    for kind, (_, _, count) in KINDS.items():
        want = max(2, count // 10) if quick else count
        part = list(build_kind(kind, want, n_tokens, seen, random.Random(f"{seed}:independent:{kind}"), taken))
        if len(part) < want:
            log(f"independent split: {kind} gave {len(part)} of {want} documents (missing packages?)")
        docs += part
    path = out / "data" / "eval" / "independent.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text, "domain": d.domain, "source": d.source,
                                "kind": d.source.split(":", 1)[0], "package": d.origin[4:]}, ensure_ascii=False) + "\n")
    return docs


# ------------------------------------------------------------------ `ensemble build-eval-split`
def add_arguments(parser) -> None:
    parser.add_argument("--demo", type=Path, default=Path("artifacts/demo"), help="demo build directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tenth of the documents")


def run(args) -> int:
    """(Re)build DEMO/data/eval/independent.jsonl for an existing demo build (`ensemble build-demo` does it too)."""
    from experts.demo import tokenizer as tk

    tokenizer = tk.load_tokenizer(args.demo / "tokenizer")
    docs = build_independent(args.demo, lambda t: len(tokenizer.backend_tokenizer.encode(t).ids), args.seed,
                             args.quick)
    kinds: dict[str, int] = {}
    for d in docs:
        kinds[d.source.split(":", 1)[0]] = kinds.get(d.source.split(":", 1)[0], 0) + 1
    print(f"{len(docs)} documents -> {args.demo / 'data' / 'eval' / 'independent.jsonl'}: "
          + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    return 0
