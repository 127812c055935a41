"""What a stage trains on: the corpus and its tokenizer (`DataSpec`), the labelling classifier's errors
(`NoiseSpec`), and the data-filtering baselines (`FilterSpec`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sgtm_engine.config.checks import FORBID_EXTRA, Checks
from sgtm_engine.config.convert import did_you_mean
from sgtm_engine.config.vocabulary import (
    FalsePositiveSource,
    FilterKind,
    FilterMatching,
    NoiseGranularity,
    NoiseModel,
)
from sgtm_engine.errors import Loc, Problem

#: Registered tokenizers (name -> Hugging Face hub id). The API takes these names, never a path or URL.
TOKENIZERS: dict[str, str] = {"gpt2": "openai-community/gpt2"}

#: The corpora every engine ships: `sgtm_engine.data`'s registry starts with exactly these (a test holds the two
#: together). A library user may register more in their own process, so `DataSpec` takes any name; a job the service
#: runs starts a fresh engine process that knows only these, so the API refuses other names at submit time.
BUILTIN_CORPORA: tuple[str, ...] = ("wiki-bilingual", "wiki-bio", "tinystories-bilingual", "wikipedia-ores")


@dataclass(frozen=True)
class DataSpec:
    """Which corpus, how it is tokenized, split and held out."""

    __pydantic_config__ = FORBID_EXTRA

    corpus: str = "wiki-bilingual"
    """A registry name: wiki-bilingual, wiki-bio, tinystories-bilingual, wikipedia-ores, or an operator-registered
    one."""
    vocab_size: int = 8192
    """Size of the byte-level BPE trained on the corpus (embedded corpora); hub corpora use GPT-2's tokenizer."""
    test_docs_per_category: int = 50
    """Held-out documents per (split, category), drawn with `seed`."""
    max_docs_per_split: int | None = None
    """Cap on training documents per split (for quick runs); None = all."""
    tokenizer: str | None = None
    """A registered tokenizer name instead of a BPE trained on the corpus: 'gpt2' (the paper's GPT-2 BPE, fetched
    from the Hugging Face hub on first use, so it needs the internet once). None trains a byte-level BPE."""
    learn_eot: bool = True
    """Train on end-of-text (a separate pad id). False = the reference's pad == EOT, every EOT label ignored."""
    upsample_retain: float = 1.0
    upsample_forget: float = 1.0
    upsample_adjacent: float = 1.0
    seed: int = 0
    conditional: bool = False
    """Conditional training (Korbak et al. 2023): every training document is prefixed with a control token,
    `<|forget|>` when labelled forget, else `<|safe|>`; held-out documents are evaluated behind `<|safe|>`. Needs
    document-granular labels (data/conditional.py)."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.require(bool(self.corpus), "corpus", "name a registered corpus, e.g. 'wiki-bilingual'")
        c.bound("vocab_size", gt=256, le=1 << 20)
        c.require(self.tokenizer in (None, *TOKENIZERS), "tokenizer",
                  f"use null (train a BPE) or one of {sorted(TOKENIZERS)}")
        c.bound("test_docs_per_category", ge=1)
        c.bound("max_docs_per_split", ge=1, nullable=True)
        c.bound("upsample_retain", "upsample_forget", "upsample_adjacent", ge=0, fix=" (0 removes the split)")
        c.done()


@dataclass(frozen=True)
class NoiseSpec:
    """The labelling classifier: which true-forget documents are caught, which others are flagged by mistake."""

    __pydantic_config__ = FORBID_EXTRA

    model: NoiseModel = NoiseModel.PRECISION_RECALL
    precision: float = 1.0
    recall: float = 1.0
    """1 - recall is the paper's 'undiscovered forget' rate."""
    tpr: float = 1.0
    fpr: float = 0.0
    """Corrected definition: false positives = fpr * negatives, drawn from retain and adjacent data."""
    granularity: NoiseGranularity = NoiseGranularity.DOCUMENT
    fp_source: FalsePositiveSource = FalsePositiveSource.RETAIN_AND_ADJACENT
    """Where false positives come from (both noise models): 'retain_and_adjacent', 'adjacent_first' or
    'adjacent_only' (the reference's precision/recall mode)."""
    forget_retain_frac: float = 0.0
    """Share of caught forget steps applied as retain mode (paper's forget_retain_perc / 100)."""
    adjacent_retain_frac: float = 0.0
    retain_retain_frac: float = 0.0
    """Share of retain steps in retain mode (paper: 0.25 TinyStories, 0.10 Wikipedia); the main lever on ablation
    damage."""
    seed: int = 0

    def __post_init__(self) -> None:
        c = Checks(self)
        c.bound("precision", "recall", "tpr", "fpr", "forget_retain_frac", "adjacent_retain_frac",
                "retain_retain_frac", ge=0, le=1, kind="a probability")
        if self.model == NoiseModel.PRECISION_RECALL:
            c.require(self.precision > 0, "precision", "must be > 0 (false positives = TP*(1/P - 1))",
                      reads=("model",))
        c.done()

    @property
    def true_positive_rate(self) -> float:
        return self.recall if self.model == NoiseModel.PRECISION_RECALL else self.tpr


@dataclass(frozen=True)
class FilterSpec:
    """Data filtering baselines. The labels come from the noise model, so recall < 1 gives a 'recall r' filter."""

    __pydantic_config__ = FORBID_EXTRA

    kind: FilterKind = FilterKind.NONE
    matching: FilterMatching = FilterMatching.COMPUTE




def unknown_corpora(spec: Any, loc: Loc = ()) -> list[Problem]:
    """A problem for every `DataSpec` inside `spec` (a spec object, searched field by field) naming a corpus that is
    not built in: its field, its value, a did-you-mean and the built-in names."""
    if isinstance(spec, DataSpec):
        if spec.corpus in BUILTIN_CORPORA:
            return []
        guess = did_you_mean(spec.corpus, BUILTIN_CORPORA)
        hint = f"did you mean {guess!r}? " if guess else ""
        return [Problem.at((*loc, "corpus"), f"unknown corpus; {hint}known corpora: {list(BUILTIN_CORPORA)}",
                           spec.corpus)]
    if not dataclasses.is_dataclass(spec):
        return []
    return [p for f in dataclasses.fields(spec) for p in unknown_corpora(getattr(spec, f.name), (*loc, f.name))]
