"""Russian (and English) demo corpora built from Debian packages (no data hub needed).

`apt-get download` fetches each package (no root needed), `dpkg-deb -x` unpacks it, and the
prose is extracted: fortunes (one quote per line), HTML manuals and man pages (one paragraph per
line). Lines are cleaned, filtered to prose in the language's script, deduplicated and split into
train / held-out by a hash of the line, so the split does not depend on package order.
Output (atomic): train.txt, heldout.txt, manifest.json, README.md (sources and licences).

    python -m lep_megatron.data.debian_corpus --out data/corpus              # Russian
    python -m lep_megatron.data.debian_corpus --language en --out data/corpus_en
"""
import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import tempfile
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from lep_megatron.common.io import UserInputError, atomic_dir


@dataclass(frozen=True)
class CorpusSource:
    """One Debian package and how to read Russian prose out of it."""

    package: str
    """Debian package name, fetched with `apt-get download`."""
    kind: str
    """`fortune` (records separated by `%` lines), `html` (paragraphs of HTML pages) or `man`
    (paragraphs of gzipped troff man pages)."""
    root: str
    """Directory inside the package that holds the Russian text."""
    licence_package: Optional[str] = None
    """Package whose copyright file states the licence, when the package links it elsewhere."""
    script: str = "cyrillic"
    """Alphabet the prose is written in (a key of SCRIPTS): lines mostly in another are dropped."""

    def __post_init__(self):
        if self.kind not in ("fortune", "html", "man"):
            raise ValueError(f"CorpusSource.kind must be fortune, html or man, got {self.kind!r}")
        if self.script not in SCRIPTS:
            raise ValueError(f"CorpusSource.script must be one of {sorted(SCRIPTS)}, got {self.script!r}")


# script -> its letters' code point range
SCRIPTS = {"cyrillic": ("\u0400", "\u04ff"), "latin": ("A", "z")}

RUSSIAN_SOURCES = (
    CorpusSource("fortunes-ru", "fortune", "usr/share/games/fortunes/ru"),
    CorpusSource("libreoffice-help-ru", "html", "usr/share/libreoffice/help/ru"),
    CorpusSource("gimp-help-ru", "html", "usr/share/gimp/2.0/help/ru", licence_package="gimp-help-common"),
    CorpusSource("kicad-doc-ru", "html", "usr/share/doc/kicad/help/ru"),
    CorpusSource("doublecmd-help-ru", "html", "usr/share"),
    CorpusSource("aptitude-doc-ru", "html", "usr/share/doc"),
    CorpusSource("debian-faq-ru", "html", "usr/share/doc"),
    CorpusSource("developers-reference-ru", "html", "usr/share/developers-reference"),
    CorpusSource("maint-guide-ru", "html", "usr/share/doc"),
    CorpusSource("manpages-ru", "man", "usr/share/man/ru"),
)
ENGLISH_SOURCES = (
    CorpusSource("fortunes", "fortune", "usr/share/games/fortunes", script="latin"),
)
SOURCES_BY_LANGUAGE = {"ru": RUSSIAN_SOURCES, "en": ENGLISH_SOURCES}

MIN_CHARS = 24
"""Shorter lines are mostly menu labels and headings, not prose."""
MIN_SCRIPT_SHARE = 0.6
"""Share of letters that must be in the source's script; drops code, paths and other languages."""

_BLOCK_TAGS = {"p", "li", "td", "th", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "title", "caption", "div", "br", "tr", "blockquote"}
_SKIP_TAGS = {"script", "style", "pre", "code", "kbd", "samp"}
_SPACES = re.compile(r"\s+")


class _Paragraphs(HTMLParser):
    """Collects the text of block elements of one HTML page, skipping code and scripts."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: List[str] = []
        self._parts: List[str] = []
        self._skip = 0

    def _flush(self):
        text = "".join(self._parts)
        self._parts = []
        if text.strip():
            self.paragraphs.append(text)

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS:
            self._skip += 1
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag):
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_data(self, data):
        if not self._skip:
            self._parts.append(data)

    def close(self):
        super().close()
        self._flush()


def clean_line(text: str, script: str = "cyrillic") -> Optional[str]:
    """One paragraph -> one NFC line with single spaces, or None if it is not prose in `script`."""
    line = _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()
    if len(line) < MIN_CHARS or "\ufffd" in line or len(line.split()) < 4:
        return None
    letters = [c for c in line if c.isalpha()]
    low, high = SCRIPTS[script]
    in_script = sum(low <= c <= high for c in letters)
    if not letters or in_script / len(letters) < MIN_SCRIPT_SHARE:
        return None
    return line


def _fortune_records(path: Path) -> Iterator[str]:
    record: List[str] = []
    for raw in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if raw.strip() == "%":
            yield " ".join(record)
            record = []
        else:
            record.append(raw.strip())
    if record:
        yield " ".join(record)


def _html_paragraphs(path: Path) -> Iterator[str]:
    parser = _Paragraphs()
    parser.feed(path.read_bytes().decode("utf-8", errors="replace"))
    parser.close()
    yield from parser.paragraphs


_TROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\\(em"), "\u2014"),
    (re.compile(r"\\\(en"), "\u2013"),
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0)[1] == "-" else "\\"),
    (re.compile(r"\\(\(..|\[[^\]]*\]|[&|^~ 0:%])"), lambda m: " " if m.group(1) in ("~", " ", "0") else ""),
]


def _man_paragraphs(path: Path) -> Iterator[str]:
    with gzip.open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    paragraph: List[str] = []
    verbatim = False  # .nf/.fi and .EX/.EE hold code and synopses, not prose
    for raw in text.splitlines():
        if raw.startswith((".", "'")):
            macro = raw[1:3]
            verbatim = macro in ("nf", "EX") or (verbatim and macro not in ("fi", "EE"))
            yield " ".join(paragraph)
            paragraph = []
        elif not verbatim:
            for pattern, repl in _TROFF_ESCAPES:
                raw = pattern.sub(repl, raw)
            paragraph.append(raw)
    yield " ".join(paragraph)


def extract_lines(source: CorpusSource, unpacked: Path) -> Iterator[str]:
    """Cleaned prose lines of an unpacked package, in sorted file order."""
    root = unpacked / source.root
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        if source.kind == "man":
            if not path.name.endswith(".gz"):
                continue
            texts = _man_paragraphs(path)
        elif source.kind == "fortune":
            if path.suffix in (".dat", ".u8"):  # strfile indexes and their links
                continue
            texts = _fortune_records(path)
        else:
            if path.suffix not in (".html", ".htm", ".xhtml"):
                continue
            texts = _html_paragraphs(path)
        for text in texts:
            line = clean_line(text, source.script)
            if line:
                yield line


def is_heldout(line: str, heldout_permille: int) -> bool:
    """The fixed split: a line is held out by the hash of its text, independent of order."""
    return int(hashlib.sha1(line.encode()).hexdigest()[:8], 16) % 1000 < heldout_permille


def _apt_download(packages: Sequence[str], into: Path) -> Dict[str, Path]:
    cmd = ["apt-get", "download", *packages]
    for attempt in range(2):
        proc = subprocess.run(cmd, cwd=into, capture_output=True, text=True)
        if proc.returncode == 0:
            break
        # a fresh machine has no package lists yet; only root can fetch them
        if attempt == 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            continue
        raise UserInputError(
            f"`{' '.join(cmd)}` failed ({proc.stderr.strip()[-300:]}); the corpus needs a reachable "
            "Debian mirror: run `apt-get update` as root, or pass --packages with available names"
        )
    debs = {}
    for package in packages:
        found = sorted(into.glob(f"{package}_*.deb"))
        if not found:
            raise UserInputError(f"apt-get download {package} produced no .deb in {into}")
        debs[package] = found[-1]
    return debs


def _licence(unpacked: Path, package: str) -> str:
    copyright_file = unpacked / "usr/share/doc" / package / "copyright"
    if not copyright_file.is_file():
        return "unknown (no copyright file in the package)"
    text = copyright_file.read_text(errors="replace")
    # DEP-5: the licence of `Files: *`; older free-form files: the first License line
    match = re.search(r"^Files:\s*\*\s*$.*?^License:[ \t]*(\S[^\n]*)$", text, re.M | re.S) or re.search(
        r"^\s*License:[ \t]*(\S[^\n]*)$", text, re.M
    )
    return match.group(1).strip() if match else f"see /usr/share/doc/{package}/copyright"


def build_corpus(
    out_dir: Path,
    sources: Sequence[CorpusSource] = RUSSIAN_SOURCES,
    heldout_permille: int = 50,
    max_bytes_per_source: Optional[int] = None,
    overwrite: bool = False,
) -> Dict:
    """Download, extract, clean, deduplicate and split; returns the manifest written beside the text.

    max_bytes_per_source cuts each package's text at a line boundary (never inside a character).
    """
    if not 0 < heldout_permille < 1000:
        raise UserInputError(f"heldout_permille={heldout_permille} must lie in (0, 1000)")
    packages = [s.package for s in sources]
    extra = sorted({s.licence_package for s in sources if s.licence_package} - set(packages))
    with tempfile.TemporaryDirectory(prefix="lep-corpus-") as work, atomic_dir(out_dir, overwrite, "out") as tmp:
        work = Path(work)
        debs = _apt_download(packages + extra, work)
        seen = set()
        manifest = {"heldout_permille": heldout_permille, "sources": []}
        with open(tmp / "train.txt", "w", encoding="utf-8") as train, open(tmp / "heldout.txt", "w", encoding="utf-8") as heldout:
            for source in sources:
                unpacked = work / source.package
                subprocess.run(["dpkg-deb", "-x", str(debs[source.package]), str(unpacked)], check=True)
                licence_pkg = source.licence_package or source.package
                if licence_pkg != source.package:
                    subprocess.run(["dpkg-deb", "-x", str(debs[licence_pkg]), str(work / licence_pkg)], check=True)
                n_lines = n_bytes = 0
                for line in extract_lines(source, unpacked):
                    if line in seen:
                        continue
                    size = len(line.encode()) + 1
                    if max_bytes_per_source is not None and n_bytes + size > max_bytes_per_source:
                        break
                    seen.add(line)
                    (heldout if is_heldout(line, heldout_permille) else train).write(line + "\n")
                    n_lines += 1
                    n_bytes += size
                manifest["sources"].append({
                    "package": source.package,
                    "deb": debs[source.package].name,
                    "deb_sha256": hashlib.sha256(debs[source.package].read_bytes()).hexdigest(),
                    "licence": _licence(work / licence_pkg, licence_pkg),
                    "lines": n_lines,
                    "bytes": n_bytes,
                })
        for split in ("train", "heldout"):
            manifest[f"{split}_bytes"] = (tmp / f"{split}.txt").stat().st_size
        if manifest["train_bytes"] == 0:
            raise UserInputError("the corpus came out empty: no source package yielded prose in its script")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        (tmp / "README.md").write_text(_readme(manifest, sources))
    return manifest


def _readme(manifest: Dict, sources: Sequence[CorpusSource]) -> str:
    rows = "\n".join(
        f"| {s['package']} | {s['deb']} | {s['licence']} | {s['lines']} | {s['bytes'] / 1e6:.2f} |"
        for s in manifest["sources"]
    )
    return (
        "# Demo corpus (built from Debian packages)\n\n"
        "Built by `python -m lep_megatron.data.debian_corpus`. One paragraph (HTML manuals) or one\n"
        "quote (fortunes) per line, NFC, whitespace collapsed, lines mostly in the sources' script\n"
        f"({', '.join(sorted({s.script for s in sources}))}) only, exact\n"
        f"duplicates removed. A line is held out when sha1(line) mod 1000 < {manifest['heldout_permille']}.\n\n"
        f"train.txt: {manifest['train_bytes'] / 1e6:.2f} MB, heldout.txt: {manifest['heldout_bytes'] / 1e6:.2f} MB\n\n"
        "Each text keeps the licence of the package it came from (see the package's\n"
        "/usr/share/doc/<package>/copyright); redistribute accordingly.\n\n"
        "| package | .deb | licence | lines | MB |\n|---|---|---|---|---|\n"
        f"{rows}\n"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/corpus"), help="output directory")
    parser.add_argument("--language", choices=sorted(SOURCES_BY_LANGUAGE), default="ru", help="which packages")
    parser.add_argument("--heldout-permille", type=int, default=50, help="held-out share in 1/1000")
    parser.add_argument("--max-mb-per-source", type=float, default=None, help="cut each package's text")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    cap = None if args.max_mb_per_source is None else int(args.max_mb_per_source * 1e6)
    manifest = build_corpus(args.out, SOURCES_BY_LANGUAGE[args.language], heldout_permille=args.heldout_permille,
                            max_bytes_per_source=cap, overwrite=args.overwrite)
    print(f"{args.out}: train {manifest['train_bytes'] / 1e6:.2f} MB, held-out {manifest['heldout_bytes'] / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
