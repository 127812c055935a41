"""Small, fast data fixtures: a synthetic corpus (three splits, a few categories) and shared caches."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sgtm_engine.config import Split
from sgtm_engine.data.corpora import Corpus, Document

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

_WORDS = {
    Split.RETAIN: "the king city river war music poet empire trade law church painter novel".split(),
    Split.FORGET: "cell gene protein enzyme species tissue blood virus neuron plant fungus organ".split(),
    Split.ADJACENT: "atom molecule acid metal crystal energy gas planet rock ocean salt bond".split(),
}


def synthetic_corpus(n_per_category: int = 40, seed: int = 0, name: str = "synthetic",
                     categories: dict[Split, tuple[str, ...]] | None = None) -> Corpus:
    """Documents of 10-60 words drawn from a per-split vocabulary, deterministic in `seed`."""
    categories = categories or {Split.RETAIN: ("history", "arts"), Split.FORGET: ("biology",),
                                Split.ADJACENT: ("chemistry",)}
    rng = random.Random(seed)
    docs = []
    for split, cats in categories.items():
        for cat in cats:
            for i in range(n_per_category):
                words = [rng.choice(_WORDS[split]) for _ in range(rng.randint(10, 60))]
                docs.append(Document(f"{cat}:{i}", " ".join(words) + ".", split, cat, "en"))
    return Corpus(name, tuple(docs), {"source": "synthetic"})


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session: tests that share content share tokenizers and token arrays."""
    return tmp_path_factory.mktemp("sgtm-cache")


@pytest.fixture
def corpus() -> Corpus:
    return synthetic_corpus()
