"""The paper's data sets: bilingual TinyStories and Wikipedia with ORES topics (docs/data.md).

Both loaders take a hub id (downloaded lazily with `huggingface_hub`, only when called) or a local directory/file in
the hub's layout: data files named by split (`train-00000-of-00004.parquet`, `validation-….parquet`, under any
sub-folder). Parquet needs `pyarrow` (imported lazily); the same rows as JSON lines (`.jsonl`/`.json`) or CSV work
without it, which is what the offline tests use.

Choices made here:
- TinyStories: one document per story and language: retain = `text` (English, category "en"), forget = `text_es`
  (Spanish, category "es"). The hub's validation rows are reserved for evaluation (`Corpus.heldout`), as in the
  paper, where the validation split is the 1% test set. Rows with an empty side are dropped (counted).
- Wikipedia + ORES: ORES rows of `source == "enwiki"` are joined on `page_id` with the article rows (`id`). One topic
  per article: topics without an asterisk first, then the highest score. forget = `forget_topics`, adjacent =
  `adjacent_topics` (categories keep the fine topic name); retain collapses to the top-level category ("STEM" then
  holds the STEM remainder). Articles without a topic are dropped (counted). Both topic lists are parameters.
- `max_rows` caps rows read per hub split, for trials on a slice (the real sets are millions of rows).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sgtm_engine.config import Split
from sgtm_engine.data.corpora import Corpus, Document, check_documents
from sgtm_engine.errors import DataError

log = logging.getLogger(__name__)

TINYSTORIES_ID = "ffuuugor/tinystories_spanish"
WIKIPEDIA_ID = "wikimedia/wikipedia"
WIKIPEDIA_CONFIG = "20231101.en"
ORES_FORGET = ("STEM.Biology",)
ORES_ADJACENT = ("STEM.Chemistry", "STEM.Medicine_&_Health", "STEM.Earth_and_environment")
ORES_COLUMNS = ("wikidata_id", "page_id", "title", "source", "topic", "score")

_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")

# ---------------------------------------------------------------------------------------------------------------------
# Files: local or from the hub


def resolve(source: str | Path, *, patterns: Sequence[str] | None = None, revision: str | None = None) -> Path:
    """A local path as is; otherwise a hub data set id, downloaded (only `patterns`) into the hub's cache.

    A `Path` is always local; a string is local when it exists, else it must look like a hub id ('owner/name').
    """
    path = Path(source)
    if path.exists():
        return path
    if isinstance(source, Path) or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise DataError(f"{source}: no such file or directory, and not a hub data set id ('owner/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise DataError("reading a hub data set needs huggingface_hub: pip install huggingface_hub") from e
    try:
        return Path(snapshot_download(repo_id=str(source), repo_type="dataset", revision=revision,
                                      allow_patterns=list(patterns) if patterns else None))
    except Exception as e:  # network, auth, missing repo: all mean the data cannot be had
        raise DataError(f"cannot download hub data set {source!r}: {e}") from e


def split_files(root: Path, split: str) -> list[Path]:
    """Data files of one split under `root`, sorted (a file named for no split belongs to 'train')."""
    if root.is_file():
        return [root] if split == "train" else []
    found = []
    for p in sorted(root.rglob("*")):
        relative = p.relative_to(root)
        if not p.is_file() or p.suffix not in _SUFFIXES or any(part.startswith(".") for part in relative.parts):
            continue
        named = re.search(r"(^|[/_.-])(train|validation|valid|test)([-_.]|$)", relative.as_posix())
        file_split = named.group(2) if named else "train"
        if file_split == "valid":
            file_split = "validation"
        if file_split == split:
            found.append(p)
    return found


def iter_rows(path: Path, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Rows of a parquet, JSON-lines or CSV file as dicts (only `columns` are guaranteed to be read)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or give the rows as "
                            f"JSON lines / CSV with the same columns") from e
        for batch in pq.ParquetFile(path).iter_batches(columns=list(columns)):
            yield from batch.to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            first = f.read(1)
            f.seek(0)
            if first == "[":  # a JSON array rather than JSON lines
                yield from json.load(f)
                return
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as e:
                        raise DataError(f"{path}:{n}: not valid JSON ({e})") from e
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f)
    else:
        raise DataError(f"{path}: unsupported data file type; use .parquet, .jsonl, .json or .csv")


def _rows(root: Path, split: str, columns: Sequence[str], max_rows: int | None) -> Iterator[dict[str, Any]]:
    files = split_files(root, split)
    n = 0
    for path in files:
        for row in iter_rows(path, columns):
            if max_rows is not None and n >= max_rows:
                return
            missing = [c for c in columns if c not in row]
            if missing:
                raise DataError(f"{path}: rows lack columns {missing}; expected {list(columns)}")
            n += 1
            yield row


# ---------------------------------------------------------------------------------------------------------------------
# Bilingual TinyStories


def load_tinystories_bilingual(source: str | Path = TINYSTORIES_ID, *, revision: str | None = None,
                               max_rows: int | None = None, tokenizer_path: Path | None = None,
                               name: str = "tinystories-bilingual") -> Corpus:
    """English stories (retain) and their Spanish translations (forget); validation rows are held out.

    Args:
        source: hub id or a local directory/file with `text` and `text_es` columns.
        revision: hub revision (commit) to pin.
        max_rows: cap on rows read per hub split.
        tokenizer_path: a saved tokenizer (e.g. GPT-2's, as in the paper) to use instead of training a BPE.
        name: the corpus name.
    """
    root = resolve(source, revision=revision)
    docs: list[Document] = []
    heldout: set[str] = set()
    dropped: Counter[str] = Counter()
    for hub_split in ("train", "validation"):
        for i, row in enumerate(_rows(root, hub_split, ("text", "text_es"), max_rows)):
            for lang, column, split in (("en", "text", Split.RETAIN), ("es", "text_es", Split.FORGET)):
                text = (row[column] or "").strip()
                if not text:
                    dropped[f"empty_{column}"] += 1
                    continue
                doc = Document(f"ts:{hub_split}:{i}:{lang}", text, split, lang, lang)
                docs.append(doc)
                if hub_split == "validation":
                    heldout.add(doc.doc_id)
    if not docs:
        raise DataError(f"{source}: no TinyStories rows found (expected train/validation files with text, text_es)")
    meta = {"source": str(source), "revision": revision, "dropped": dict(dropped),
            "attribution": "TinyStories (Eldan & Li 2023, CDLA-Sharing-1.0); Spanish by claude-3-haiku "
                           f"({TINYSTORIES_ID})"}
    return Corpus(name, check_documents(name, docs), meta, frozenset(heldout), tokenizer_path)


# ---------------------------------------------------------------------------------------------------------------------
# Wikipedia + ORES topics


def best_topics(rows: Iterator[dict[str, Any]] | Sequence[dict[str, Any]]) -> dict[int, str]:
    """page_id -> its one topic: enwiki rows only; topics without '*' first, then the highest score."""
    best: dict[int, tuple[tuple[bool, float], str]] = {}
    for row in rows:
        if row["source"] != "enwiki":
            continue
        topic = row["topic"]
        key = (topic.endswith("*"), -float(row["score"]))  # smaller is better
        page = int(row["page_id"])
        if page not in best or key < best[page][0]:
            best[page] = (key, topic)
    return {page: topic for page, (_, topic) in best.items()}


def read_ores_csv(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of the ORES articletopic dump, with or without its header line."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for n, fields in enumerate(reader):
            if n == 0 and "page_id" in fields:
                continue
            if len(fields) != len(ORES_COLUMNS):
                raise DataError(f"{path}:{n + 1}: expected {len(ORES_COLUMNS)} columns {ORES_COLUMNS}, got {fields}")
            yield dict(zip(ORES_COLUMNS, fields, strict=True))


def load_wikipedia_ores(articles: str | Path = WIKIPEDIA_ID, topics: str | Path | None = None, *,
                        config: str = WIKIPEDIA_CONFIG, forget_topics: Sequence[str] = ORES_FORGET,
                        adjacent_topics: Sequence[str] = ORES_ADJACENT, revision: str | None = None,
                        max_rows: int | None = None, tokenizer_path: Path | None = None,
                        name: str = "wikipedia-ores") -> Corpus:
    """English Wikipedia articles labelled by their best ORES topic.

    Args:
        articles: hub id or local directory/file of rows with `id`, `url`, `title`, `text`.
        topics: the ORES CSV (`wikidata_id,page_id,title,source,topic,score`); it is not on the hub, so required.
        config: the hub configuration (sub-folder) of `articles`.
        forget_topics: ORES topics that make the forget split.
        adjacent_topics: ORES topics that make the adjacent split.
        revision: hub revision of `articles`.
        max_rows: cap on article rows read.
        tokenizer_path: a saved tokenizer (e.g. GPT-2's) to use instead of training a BPE.
        name: the corpus name.
    """
    if topics is None:
        raise DataError("wikipedia-ores needs the ORES topics CSV (topicsForAllWikipediaPages2020-08-24.csv); "
                        "register it: register_corpus('wikipedia-ores', functools.partial(load_wikipedia_ores, "
                        "topics=PATH), replace=True)")
    overlap = sorted(set(forget_topics) & set(adjacent_topics))
    if overlap:
        raise DataError(f"wikipedia-ores: topics {overlap} are both forget and adjacent; list each in one only")
    topic_of = best_topics(read_ores_csv(Path(topics)))
    root = resolve(articles, patterns=[f"{config}/*"], revision=revision)
    if (root / config).is_dir():
        root = root / config
    docs: list[Document] = []
    dropped: Counter[str] = Counter()
    for row in _rows(root, "train", ("id", "title", "text"), max_rows):
        topic = topic_of.get(int(row["id"]))
        text = (row["text"] or "").strip()
        if topic is None or not text:
            dropped["no_topic" if topic is None else "empty_text"] += 1
            continue
        if topic in forget_topics:
            split, category = Split.FORGET, topic
        elif topic in adjacent_topics:
            split, category = Split.ADJACENT, topic
        else:
            split, category = Split.RETAIN, topic.split(".")[0]
        docs.append(Document(f"enwiki:{row['id']}", text, split, category, "en"))
    log.info("wikipedia-ores: %d articles, dropped %s", len(docs), dict(dropped))
    meta = {"source": str(articles), "config": config, "topics_file": str(topics), "revision": revision,
            "forget_topics": list(forget_topics), "adjacent_topics": list(adjacent_topics), "dropped": dict(dropped),
            "attribution": "Wikipedia (CC BY-SA 4.0) via wikimedia/wikipedia; ORES articletopic (Wikimedia, CC0)"}
    return Corpus(name, check_documents(name, docs), meta, tokenizer_path=tokenizer_path)

