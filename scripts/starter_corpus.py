"""Pretraining text for the starter model, rebuilt from three Debian packages.

Every source is public domain or permissively licensed English (see
src/tunesmith/assets/starter/README.md for versions and licences):
- wordnet-base (WordNet 3.0 licence): glosses and example sentences, turned into plain
  sentences ("A dog is a member of the genus Canis ...");
- dict-devil (public domain): Ambrose Bierce's "The Devil's Dictionary" (1911);
- dict-jargon (public domain): The Jargon File 4.4.7;
- python3.11-doc (PSF licence 2.0): the prose paragraphs of the Python documentation sources;
- sqlite3-doc (public domain): the prose paragraphs of the SQLite documentation;
- rust-doc (MIT or Apache-2.0): the prose paragraphs of the Rust books and standard library docs;
- postgresql-doc-15 (PostgreSQL licence): the prose paragraphs of the PostgreSQL manual.

`download(dir)` runs `apt-get download` (needs network and `apt-get update` once);
everything else reads the unpacked packages and needs no network.
"""
from __future__ import annotations

import gzip
import html
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("wordnet-base", "dict-devil", "dict-jargon", "python3.11-doc", "sqlite3-doc",
            "rust-doc", "postgresql-doc-15")
POS_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}


def download(debs: Path) -> Path:
    """Fetch the source packages with apt-get and unpack them under `debs/root`."""
    debs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True)
    root = debs / "root"
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def package_versions(debs: Path) -> dict[str, str]:
    """Package -> version, read from the downloaded file names (name_version_arch.deb)."""
    out = {}
    for deb in sorted(debs.glob("*.deb")):
        name, version, _ = deb.stem.split("_")
        out[name] = version.replace("%3a", ":")
    return out


@dataclass
class Synset:
    """One WordNet synset: its words, gloss, example sentences and a few relations."""

    pos: str
    words: list[str]
    definition: str
    examples: list[str]
    hypernyms: list[str] = field(default_factory=list)  # offsets, same part of speech
    antonyms: list[str] = field(default_factory=list)   # words


def _clean_word(word: str) -> str:
    """'ice_cream(a)' -> 'ice cream'."""
    return re.sub(r"\(.*?\)$", "", word).replace("_", " ")


def _parse_line(line: str, pos: str) -> tuple[str, Synset]:
    """Parse one line of a WordNet data.* file into (offset, Synset)."""
    head, _, gloss = line.partition(" | ")
    parts = head.split()
    offset, n_words = parts[0], int(parts[3], 16)
    words = [_clean_word(parts[4 + 2 * i]) for i in range(n_words)]
    i = 4 + 2 * n_words
    n_ptrs = int(parts[i])
    hypernyms, antonym_offsets = [], []
    for k in range(n_ptrs):
        sym, target, tpos = parts[i + 1 + 4 * k: i + 4 + 4 * k]
        if sym in ("@", "@i") and tpos == pos:
            hypernyms.append(target)
        elif sym == "!":
            antonym_offsets.append(target)
    pieces = [p.strip() for p in gloss.strip().split(";")]
    examples = [p.strip('"') for p in pieces if p.startswith('"') and p.endswith('"') and len(p) > 6]
    definition = "; ".join(p for p in pieces if not p.startswith('"')).strip()
    syn = Synset(pos, words, definition, examples, hypernyms)
    syn.antonyms = antonym_offsets  # offsets for now; resolved to words in read_wordnet
    return offset, syn


def read_wordnet(root: Path) -> list[Synset]:
    """All synsets of the four parts of speech, with hypernyms/antonyms resolved to words."""
    by_key: dict[tuple[str, str], Synset] = {}
    for pos, name in POS_FILES.items():
        for line in (root / "usr/share/wordnet" / name).read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue
            offset, syn = _parse_line(line, pos)
            by_key[(pos, offset)] = syn
    for (pos, _), syn in by_key.items():
        ants = [by_key.get((p, o)) for p in ("a", "n", "v", "r") for o in syn.antonyms]
        syn.antonyms = sorted({s.words[0] for s in ants if s is not None})
        syn.hypernyms = [by_key[(pos, o)].words[0] for o in syn.hypernyms if (pos, o) in by_key]
    return [s for s in by_key.values() if s.definition]


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def synset_sentences(syn: Synset) -> list[str]:
    """Plain English sentences describing a synset (definition sentence + its examples)."""
    word, d = syn.words[0], syn.definition.rstrip(".")
    if syn.pos == "n":
        first = f"{_article(word).capitalize()} {word} is {d}." if d.split()[0] in ("a", "an", "the", "any", "one") \
            else f"The word {word} means {d}."
    elif syn.pos == "v":
        first = f"To {word} is to {d}."
    else:
        first = f"{word.capitalize()} means {d}."
    out = [first]
    if len(syn.words) > 1:
        out.append(f"Other words for {word} are {', '.join(syn.words[1:4])}.")
    out += [e[0].upper() + e[1:] + ("" if e[-1] in ".!?" else ".") for e in syn.examples]
    return out


def wordnet_text(synsets: list[Synset]) -> list[str]:
    """One short paragraph per synset."""
    return [" ".join(synset_sentences(s)) for s in synsets]


def dictd_text(root: Path, name: str, start: str) -> list[str]:
    """Prose paragraphs of a dictd database (devil, jargon), from `start` on (skips the header)."""
    raw = gzip.open(root / f"usr/share/dictd/{name}.dict.dz", "rt", encoding="utf-8", errors="replace").read()
    raw = raw.translate(str.maketrans("\u201c\u201d\u2018\u2019", "\"\"''"))
    raw = raw[raw.index(start):]
    paras = []
    for block in re.split(r"\n\s*\n", raw):
        text = " ".join(line.strip() for line in block.splitlines()).replace("_", "").replace("{", "").replace("}", "")
        if len(text) > 40 and sum(c.isalpha() for c in text) > 0.6 * len(text):
            paras.append(text)
    return paras


_ROLE = re.compile(r":[a-z:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")


def _rst_inline(text: str) -> str:
    """Strip reST inline markup: roles, links, literals, emphasis."""
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = text.replace("``", "").replace("**", "").replace("`", "")
    return re.sub(r"(?<!\w)\*(\S[^*]*?)\*", r"\1", text)


def python_doc_text(root: Path) -> list[str]:
    """Prose paragraphs of the Python docs' reST sources (code, tables and directives dropped)."""
    paras = []
    for path in sorted((root / "usr/share/doc/python3.11/html/_sources").rglob("*.rst.txt")):
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            lines = block.splitlines()
            if not lines or lines[0].startswith((" ", "\t", "..", ">>>", "=", "-", "*", "+", "|", ":")):
                continue
            text = _rst_inline(" ".join(line.strip() for line in lines))
            if text.endswith("::"):
                text = text[:-1]
            letters = sum(c.isalpha() or c == " " for c in text)
            if len(text) > 60 and letters > 0.85 * len(text) and text[-1] in ".:":
                paras.append(text)
    return list(dict.fromkeys(paras))


RUST_BOOKS = ("book", "reference", "rust-by-example", "nomicon", "edition-guide", "embedded-book", "cargo",
              "rustc", "rustdoc", "unstable-book", "std")


def html_paragraphs(dirs: list[Path]) -> list[str]:
    """The <p> paragraphs of HTML documentation, tags and entities removed, duplicates dropped."""
    paras = []
    for d in dirs:
        for path in sorted(d.rglob("*.html")):
            html_text = path.read_text(encoding="utf-8", errors="replace")
            for block in re.findall(r"<p>(.*?)(?=<p>|</p>|<h\d|<pre|<table|<ul|<ol|<div)", html_text, re.S):
                text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", block)).split())
                letters = sum(c.isalpha() or c == " " for c in text)
                if len(text) > 60 and letters > 0.85 * len(text) and text[-1] in ".:":
                    paras.append(text)
    return list(dict.fromkeys(paras))


def build_corpus(root: Path) -> dict[str, list[str]]:
    """Source name -> list of paragraphs."""
    return {
        "wordnet": wordnet_text(read_wordnet(root)),
        "devil": dictd_text(root, "devil", "PREFACE"),
        "jargon": dictd_text(root, "jargon", "(TM)\n"),
        "python-docs": python_doc_text(root),
        "sqlite-docs": html_paragraphs([root / "usr/share/doc/sqlite3"]),
        "rust-docs": html_paragraphs([root / "usr/share/doc/rust-doc/html" / b for b in RUST_BOOKS]),
        "postgresql-docs": html_paragraphs([root / "usr/share/doc/postgresql-doc-15/html"]),
    }
