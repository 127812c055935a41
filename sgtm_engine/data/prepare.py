"""From a corpus to training pools and test sets: held-out split, tokenizer, label pools, packing, manifest.

`prepare_data(spec, context, cache_dir, noise, filter)` is the one entry point; the trainer then builds a plan
(`PreparedData.plan`) and samples batches from the pools (`sampler.PoolSampler`).

Choices made here:
- Held out per (split, category), seeded by `DataSpec.seed`: `test_docs_per_category` documents, drawn from the
  documents the corpus reserves for evaluation when it has some there (TinyStories' validation split), otherwise from
  all of them, but never more than half of a category (a small category keeps training data). Reserved documents
  are never trained on, drawn or not. `max_docs_per_split` then caps the training documents (seeded sample, corpus
  order kept).
- The BPE is trained on the training documents before the `max_docs_per_split` cap, so a quick run shares the
  tokenizer of the full run. Held-out documents never reach the tokenizer either.
- Each document is tokenized once and cached (`cache_dir/tokens/<key>`, key = corpus content hash + tokenizer hash),
  so a repeated run, or one with another seed, noise or context, skips tokenization.
- Training documents are grouped into pools by (true split, applied label) with document-granular noise, or by
  true split with batch-granular noise (noise.py). Within a pool, documents (each followed by EOT) are concatenated
  in corpus order and cut into rows of `context + 1` ids (inputs = row[:-1], labels = row[1:]); a final partial row
  is right-padded with the pad id, so no document is lost from a small pool. Rows cross document boundaries, as in
  the paper's Wikipedia pipeline; each row records the documents it came from (`Pool.doc_spans`).
- Test sets are per document: each document + EOT, truncated to `context + 1` ids, right-padded, with its length.
- Labels: pad positions are always -100; with `learn_eot=False` (reference parity) every EOT label is -100 too.
- Conditional training (`DataSpec.conditional`, data/conditional.py): each training document is prefixed with the
  control token of its applied label, each held-out document with `<|safe|>`; control tokens are never targets.
- The manifest hash is a sha256 over exactly what can be trained on: the tokenizer hash, `learn_eot`, and the ids of
  every row of every active pool (pools removed by a filter or an upsampling factor of 0 are not trained on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from sgtm_engine.config import DataSpec, FilterSpec, MaskMode, NoiseGranularity, NoiseSpec, Split
from sgtm_engine.data import noise as noise_lib
from sgtm_engine.data.conditional import ControlTokens, add_control_tokens, ignore_control_labels
from sgtm_engine.data.corpora import Corpus, Document
from sgtm_engine.data.registry import load_corpus
from sgtm_engine.data.schedule import PoolInfo, TrainingPlan, build_plan, pool_removed
from sgtm_engine.data.tokenizer import encode_documents, hub_tokenizer, load_tokenizer, tokenizer_hash, train_tokenizer
from sgtm_engine.errors import DataError

log = logging.getLogger(__name__)

IGNORE = -100

# ---------------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Pool:
    """Training rows that share a true split and (document granularity) an applied label."""

    name: str
    split: Split
    mode: MaskMode | None  # None: the mode is drawn per step (batch granularity)
    examples: torch.Tensor  # LongTensor [n, context + 1]
    doc_ids: tuple[str, ...]  # documents in packing order
    doc_spans: torch.Tensor  # LongTensor [n, 2]: row i holds doc_ids[start:end]
    n_tokens: int  # real tokens (EOTs included, padding excluded)


@dataclass(frozen=True)
class TestSet:
    """Held-out documents of one (split, category), one row each, right-padded."""

    split: Split
    category: str
    tokens: torch.Tensor  # LongTensor [n, L], L <= context + 1
    lengths: torch.Tensor  # LongTensor [n]: real tokens per row
    doc_ids: tuple[str, ...]

    @property
    def attention_mask(self) -> torch.Tensor:
        """[n, L - 1] for the inputs tokens[:, :-1]: 1 on real tokens."""
        return (torch.arange(self.tokens.shape[1] - 1)[None, :] < self.lengths[:, None]).long()


@dataclass
class PreparedData:
    """Everything the trainer and the evaluator need from the data side."""

    spec: DataSpec
    context: int
    noise: NoiseSpec
    filter: FilterSpec
    tokenizer: PreTrainedTokenizerFast
    tokenizer_hash: str
    pools: dict[str, Pool]
    test_sets: dict[tuple[Split, str], TestSet]
    doc_labels: dict[str, MaskMode]  # applied label per training document (document granularity; else empty)
    manifest_hash: str
    corpus_name: str
    corpus_fingerprint: str
    corpus_metadata: Mapping[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)
    control: ControlTokens | None = None  # conditional training's control tokens (None: an ordinary run)

    @property
    def eot_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def inputs_and_labels(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [b, T], labels [b, T]) from rows [b, T + 1] of a pool or a test set."""
        return make_labels(rows, self.pad_id, self.eot_id, self.spec.learn_eot, self.control_ids)

    @property
    def control_ids(self) -> tuple[int, ...]:
        """Conditional training's control-token ids (never targets, never sampled); () for an ordinary run."""
        return self.control.ids if self.control is not None else ()

    @property
    def eval_prefix(self) -> tuple[int, ...]:
        """Token ids every evaluation prompt starts with: `<|safe|>` for conditional training, else none."""
        return (self.control.safe_id,) if self.control is not None else ()

    def pool_infos(self) -> dict[str, PoolInfo]:
        return {name: PoolInfo(p.split, p.mode, p.examples.shape[0]) for name, p in self.pools.items()}

    def active_pools(self) -> list[str]:
        """Pools that can be trained on: not removed by the filter nor by an upsampling factor of 0."""
        up = upsampling(self.spec)
        return sorted(n for n, p in self.pools.items()
                      if up[p.split] > 0 and not pool_removed(p.split, p.mode, self.filter))

    def plan(self, steps: int, seed: int) -> TrainingPlan:
        """The per-step plan (pool, mode, skip) for `steps` optimizer steps; see schedule.build_plan."""
        return build_plan(self.pool_infos(), steps, upsample=upsampling(self.spec), noise=self.noise,
                          filter=self.filter, seed=seed)

    def summary(self) -> dict[str, Any]:
        """Plain data for logging: counts, hashes, provenance, and the label confusion matrix in documents."""
        split_of = {d: p.split for p in self.pools.values() for d in p.doc_ids}
        docs_confusion = noise_lib.confusion((split_of[d], m) for d, m in self.doc_labels.items())
        return {"corpus": self.corpus_name, "corpus_fingerprint": self.corpus_fingerprint,
                "tokenizer_hash": self.tokenizer_hash, "manifest_hash": self.manifest_hash,
                "vocab_size": self.vocab_size, "context": self.context,
                "attribution": self.corpus_metadata.get("attribution"), **self.stats,
                "label_confusion_docs": docs_confusion if self.doc_labels else None}


def make_labels(rows: torch.Tensor, pad_id: int, eot_id: int, learn_eot: bool,
                control_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = rows[:, :-1]
    labels = rows[:, 1:].clone()
    labels[labels == pad_id] = IGNORE
    if not learn_eot:
        labels[labels == eot_id] = IGNORE
    return inputs, ignore_control_labels(inputs, labels, control_ids)


def upsampling(spec: DataSpec) -> dict[Split, float]:
    return {Split.RETAIN: spec.upsample_retain, Split.FORGET: spec.upsample_forget,
            Split.ADJACENT: spec.upsample_adjacent}


# ---------------------------------------------------------------------------------------------------------------------
# Held-out documents


def split_heldout(corpus: Corpus, per_category: int, seed: int,
                  max_train_per_split: int | None = None) -> tuple[dict[tuple[Split, str], list[Document]],
                                                                   list[Document]]:
    """(test documents per (split, category), training documents in corpus order)."""
    groups: dict[tuple[Split, str], list[Document]] = {}
    for d in corpus.documents:
        groups.setdefault((d.split, d.category), []).append(d)
    test: dict[tuple[Split, str], list[Document]] = {}
    for (split, category), docs in sorted(groups.items()):
        reserved = [d for d in docs if d.doc_id in corpus.heldout]
        pool, cap = (reserved, per_category) if reserved else (docs, min(per_category, len(docs) // 2))
        if cap > 0:
            rng = random.Random(f"sgtm-heldout:{seed}:{split.value}:{category}")
            test[(split, category)] = rng.sample(pool, min(cap, len(pool)))
    excluded = {d.doc_id for docs in test.values() for d in docs} | corpus.heldout
    train = [d for d in corpus.documents if d.doc_id not in excluded]
    if max_train_per_split is not None:
        keep: set[str] = set()
        for split in Split:
            ids = [d.doc_id for d in train if d.split == split]
            rng = random.Random(f"sgtm-cap:{seed}:{split.value}")
            keep.update(rng.sample(ids, min(max_train_per_split, len(ids))))
        train = [d for d in train if d.doc_id in keep]
    return test, train


# ---------------------------------------------------------------------------------------------------------------------
# Tokens per document, cached


@dataclass(frozen=True)
class DocumentTokens:
    ids: np.ndarray  # every document's tokens, concatenated (no EOT)
    offsets: np.ndarray  # [n_docs + 1]
    index: dict[str, int]

    def of(self, doc_id: str) -> np.ndarray:
        i = self.index[doc_id]
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


def document_tokens(corpus: Corpus, tokenizer: PreTrainedTokenizerFast, tok_hash: str,
                    cache_dir: Path) -> DocumentTokens:
    """Token ids of every document of the corpus, from the cache when this (corpus, tokenizer) was seen."""
    key = hashlib.sha256(f"sgtm-tokens-v1:{corpus.fingerprint}:{tok_hash}".encode()).hexdigest()
    target = Path(cache_dir) / "tokens" / key
    doc_ids = [d.doc_id for d in corpus.documents]
    if (target / "offsets.npy").exists():
        log.info("token cache hit %s", key[:12])
        ids, offsets = np.load(target / "ids.npy"), np.load(target / "offsets.npy")
        return DocumentTokens(ids, offsets, {d: i for i, d in enumerate(doc_ids)})
    encoded = encode_documents(tokenizer, [d.text for d in corpus.documents])
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    ids = np.concatenate([np.asarray(e, dtype=dtype) for e in encoded]) if encoded else np.zeros(0, dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=target.parent))
    np.save(tmp / "ids.npy", ids)
    np.save(tmp / "offsets.npy", offsets)
    (tmp / "meta.json").write_text(json.dumps({"corpus": corpus.name, "fingerprint": corpus.fingerprint,
                                               "tokenizer_hash": tok_hash, "n_docs": len(doc_ids),
                                               "n_tokens": int(offsets[-1])}))
    try:
        os.replace(tmp, target)
    except OSError:  # someone else cached the same key first
        shutil.rmtree(tmp, ignore_errors=True)
    return DocumentTokens(ids, offsets, {d: i for i, d in enumerate(doc_ids)})


# ---------------------------------------------------------------------------------------------------------------------
# Packing


def pack(docs: Sequence[np.ndarray], width: int, eot_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows [n, width], doc spans [n, 2], real tokens): documents + EOT concatenated, cut, last row padded."""
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    stream = np.empty(int(starts[-1]), dtype=np.int64)
    for d, s, n in zip(docs, starts[:-1], lengths, strict=True):
        stream[s:s + n - 1] = d
        stream[s + n - 1] = eot_id
    total = len(stream)
    n_rows = total // width + (1 if total % width >= 2 else 0)  # a lone last token has nothing to predict
    rows = np.full(n_rows * width, pad_id, dtype=np.int64)
    kept = min(total, n_rows * width)
    rows[:kept] = stream[:kept]
    first = np.arange(n_rows) * width
    last = np.minimum(first + width, kept) - 1
    spans = np.stack([np.searchsorted(starts, first, "right") - 1, np.searchsorted(starts, last, "right")], axis=1)
    return rows.reshape(n_rows, width), spans, kept


def _test_set(split: Split, category: str, docs: Sequence[Document], tokens: DocumentTokens, width: int,
              eot_id: int, pad_id: int, prefix: Sequence[int] = ()) -> TestSet:
    seqs = [np.concatenate([np.asarray(prefix, dtype=np.int64), tokens.of(d.doc_id), [eot_id]])[:width]
            for d in docs]
    longest = max(len(s) for s in seqs)
    out = np.full((len(seqs), longest), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return TestSet(split, category, torch.from_numpy(out), torch.tensor([len(s) for s in seqs]),
                   tuple(d.doc_id for d in docs))


# ---------------------------------------------------------------------------------------------------------------------
# The entry point


def prepare_data(spec: DataSpec, context: int, cache_dir: Path, noise: NoiseSpec | None = None,
                 filter: FilterSpec | None = None, *, corpus: Corpus | None = None,
                 tokenizer_path: Path | None = None) -> PreparedData:
    """Load, split, tokenize and pack the data of one training run.

    Args:
        spec: which corpus, vocabulary, held-out size, caps, EOT handling, upsampling and seed.
        context: the model's sequence length; rows hold `context + 1` ids.
        cache_dir: where tokenizers and token arrays are cached (content-addressed; safe to share).
        noise: the labelling classifier (document-granular labels decide the pools).
        filter: the filter baseline (decides which pools the manifest covers; the plan applies it).
        corpus: an already loaded corpus (default: `load_corpus(spec)`).
        tokenizer_path: a saved tokenizer to use instead of training a BPE (default: the corpus's, if any).
    """
    noise = noise or NoiseSpec()
    filter = filter or FilterSpec()
    if context < 1:
        raise DataError(f"context={context}: must be >= 1")
    corpus = corpus or load_corpus(spec)
    test_docs, train_docs = split_heldout(corpus, spec.test_docs_per_category, spec.seed)
    tok_path = tokenizer_path or corpus.tokenizer_path
    if tok_path is not None:
        tokenizer = load_tokenizer(Path(tok_path))
    elif spec.tokenizer is not None:
        tokenizer = hub_tokenizer(spec.tokenizer, cache_dir)
    else:
        tokenizer = train_tokenizer([d.text for d in train_docs], spec.vocab_size, cache_dir)
    tok_hash = tokenizer_hash(tokenizer)
    if spec.max_docs_per_split is not None:
        _, train_docs = split_heldout(corpus, spec.test_docs_per_category, spec.seed, spec.max_docs_per_split)
    tokens = document_tokens(corpus, tokenizer, tok_hash, cache_dir)
    control = None
    if spec.conditional:  # after encoding: adding special tokens leaves every document's ids unchanged
        if noise.granularity != NoiseGranularity.DOCUMENT:
            raise DataError("data.conditional needs document-granular labels (noise.granularity='document')")
        control = add_control_tokens(tokenizer)
        tok_hash = tokenizer_hash(tokenizer)
    eot, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)

    labels: dict[str, MaskMode] = {}
    if noise.granularity == NoiseGranularity.DOCUMENT:
        labels = noise_lib.assign_document_labels(
            {s: [d.doc_id for d in train_docs if d.split == s] for s in Split}, noise)
    members: dict[tuple[Split, MaskMode | None], list[Document]] = {}
    for d in train_docs:
        members.setdefault((d.split, labels.get(d.doc_id)), []).append(d)
    pools = {}
    for (split, mode), docs in sorted(members.items(), key=lambda kv: noise_lib.pool_name(*kv[0])):
        ids = [tokens.of(d.doc_id) for d in docs]
        if control is not None:
            ids = [np.concatenate([[control.for_label(mode)], x]) for x in ids]
        rows, spans, n_tokens = pack(ids, context + 1, eot, pad)
        if len(rows):
            name = noise_lib.pool_name(split, mode)
            pools[name] = Pool(name, split, mode, torch.from_numpy(rows), tuple(d.doc_id for d in docs),
                               torch.from_numpy(spans), n_tokens)
    prefix = (control.safe_id,) if control is not None else ()
    tests = {key: _test_set(*key, docs, tokens, context + 1, eot, pad, prefix) for key, docs in test_docs.items()}

    data = PreparedData(spec=spec, context=context, noise=noise, filter=filter, tokenizer=tokenizer,
                        tokenizer_hash=tok_hash, pools=pools, test_sets=tests, doc_labels=labels, manifest_hash="",
                        corpus_name=corpus.name, corpus_fingerprint=corpus.fingerprint,
                        corpus_metadata=corpus.metadata, control=control)
    data.manifest_hash = manifest_hash(data)
    data.stats = _stats(train_docs, test_docs, tokens, pools)
    log.info("prepared %s: %s", corpus.name, {n: p.examples.shape[0] for n, p in pools.items()})
    return data


def manifest_hash(data: PreparedData) -> str:
    """sha256 over what can be trained on: tokenizer, EOT handling, and every row of every active pool, in order."""
    h = hashlib.sha256(f"sgtm-manifest-v1:{data.tokenizer_hash}:learn_eot={data.spec.learn_eot}".encode())
    for name in data.active_pools():
        rows = data.pools[name].examples
        h.update(f"\0{name}:{tuple(rows.shape)}\0".encode())
        h.update(rows.numpy().astype("<i4").tobytes())
    return h.hexdigest()


def _stats(train: Sequence[Document], test: Mapping[tuple[Split, str], Sequence[Document]], tokens: DocumentTokens,
           pools: Mapping[str, Pool]) -> dict[str, Any]:
    def table(docs: Sequence[Document]) -> dict[str, dict[str, dict[str, int]]]:
        out: dict[str, dict[str, dict[str, int]]] = {}
        for d in docs:
            cell = out.setdefault(d.split.value, {}).setdefault(d.category, {"docs": 0, "tokens": 0})
            cell["docs"] += 1
            cell["tokens"] += len(tokens.of(d.doc_id)) + 1  # + EOT
        return {split: dict(sorted(cats.items())) for split, cats in sorted(out.items())}

    return {"train": table(train), "test": table([d for docs in test.values() for d in docs]),
            "pools": {n: {"docs": len(p.doc_ids), "examples": int(p.examples.shape[0]), "tokens": p.n_tokens}
                      for n, p in pools.items()}}
