"""Documents and corpora: what every corpus loader returns (the registry of names is `registry.py`).

Choices made here:
- A corpus is an immutable list of `Document`s, each with its true `Split` and a `category` (the unit of per-category
  evaluation). Which documents are held out for testing is decided later (`prepare.py`), except that a corpus may
  reserve documents for evaluation (`Corpus.heldout`: e.g. a hub data set's validation split); those are never
  trained on.
- `Corpus.fingerprint` hashes the documents themselves (id, split, category, language, text, reserved flag), so every
  cache keyed by it follows the content, whatever loader produced it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sgtm_engine.config import Split
from sgtm_engine.errors import DataError


@dataclass(frozen=True)
class Document:
    """One training or evaluation document. `split` is its true label; `category` is what evaluation groups by."""

    doc_id: str
    text: str
    split: Split
    category: str
    lang: str


@dataclass(frozen=True)
class Corpus:
    """A named set of documents plus provenance.

    Attributes:
        name: registry name.
        documents: every document, in a fixed order.
        metadata: provenance for logging: source files and their sha256, attribution/licence, cleaning counts.
        heldout: ids of documents the source reserves for evaluation (never trained on).
        tokenizer_path: a saved tokenizer to use instead of training a BPE (e.g. GPT-2's for the paper's corpora).
    """

    name: str
    documents: tuple[Document, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    heldout: frozenset[str] = frozenset()
    tokenizer_path: Path | None = None

    def __post_init__(self) -> None:
        ids = Counter(d.doc_id for d in self.documents)
        dupes = sorted(i for i, n in ids.items() if n > 1)
        if dupes:
            raise DataError(f"corpus {self.name!r}: duplicate document ids {dupes[:5]} ({len(dupes)} in all)")
        unknown = self.heldout - ids.keys()
        if unknown:
            raise DataError(f"corpus {self.name!r}: held-out ids not in the corpus: {sorted(unknown)[:5]}")

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over every document's content (the key of every cache derived from this corpus)."""
        h = hashlib.sha256(b"sgtm-corpus-v1\0")
        for d in self.documents:
            reserved = "1" if d.doc_id in self.heldout else "0"
            for part in (d.doc_id, d.split.value, d.category, d.lang, reserved, d.text):
                b = part.encode()
                h.update(len(b).to_bytes(8, "little"))  # length-prefixed: no two document lists hash alike
                h.update(b)
        return h.hexdigest()

    def counts(self) -> dict[str, dict[str, int]]:
        """Documents per split and category: {split: {category: n}}."""
        out: dict[str, dict[str, int]] = {}
        for d in self.documents:
            per = out.setdefault(d.split.value, {})
            per[d.category] = per.get(d.category, 0) + 1
        return {s: dict(sorted(c.items())) for s, c in sorted(out.items())}

    def by_split(self, split: Split) -> list[Document]:
        return [d for d in self.documents if d.split == split]


def check_documents(name: str, documents: Iterable[Document]) -> tuple[Document, ...]:
    """Documents as a tuple, refusing a corpus without retain or without forget documents."""
    docs = tuple(documents)
    present = {d.split for d in docs}
    missing = [s.value for s in (Split.RETAIN, Split.FORGET) if s not in present]
    if missing:
        raise DataError(f"corpus {name!r} has no {' and no '.join(missing)} documents; every corpus needs both")
    return docs
