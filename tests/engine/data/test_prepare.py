"""Held-out documents, packing, labels, manifest hash and the token cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sgtm_engine.config import DataSpec, FilterKind, FilterSpec, NoiseGranularity, NoiseSpec, Split
from sgtm_engine.data import IGNORE, prepare_data
from sgtm_engine.data import prepare as prep
from sgtm_engine.data.corpora import Corpus

from .conftest import synthetic_corpus

SPEC = DataSpec(corpus="synthetic", vocab_size=300, test_docs_per_category=5)


def _prepare(corpus: Corpus, cache: Path, spec: DataSpec = SPEC, context: int = 32, **kw: object) -> prep.PreparedData:
    return prepare_data(spec, context, cache, corpus=corpus, **kw)  # type: ignore[arg-type]


def _trained_doc_ids(data: prep.PreparedData) -> set[str]:
    return {d for p in data.pools.values() for d in p.doc_ids}


def test_heldout_documents_are_never_trained_on(corpus: Corpus, cache_dir: Path) -> None:
    data = _prepare(corpus, cache_dir)
    test_ids = {d for t in data.test_sets.values() for d in t.doc_ids}
    assert set(data.test_sets) == {(Split.RETAIN, "history"), (Split.RETAIN, "arts"), (Split.FORGET, "biology"),
                                   (Split.ADJACENT, "chemistry")}
    assert all(len(t.doc_ids) == 5 for t in data.test_sets.values())
    assert not test_ids & _trained_doc_ids(data)
    assert test_ids | _trained_doc_ids(data) == {d.doc_id for d in corpus.documents}
    again = _prepare(corpus, cache_dir, dataclasses.replace(SPEC, seed=1))
    assert {d for t in again.test_sets.values() for d in t.doc_ids} != test_ids  # seeded


def test_reserved_documents_are_held_out(cache_dir: Path) -> None:
    base = synthetic_corpus()
    reserved = frozenset(d.doc_id for d in base.documents if d.doc_id.endswith((":0", ":1", ":2")))
    corpus = dataclasses.replace(base, heldout=reserved)
    data = _prepare(corpus, cache_dir)
    test_ids = {d for t in data.test_sets.values() for d in t.doc_ids}
    assert test_ids == reserved  # 3 reserved per category < 5 requested: all of them, nothing else
    assert not reserved & _trained_doc_ids(data)


def test_small_category_keeps_half_for_training(cache_dir: Path) -> None:
    data = _prepare(synthetic_corpus(n_per_category=6), cache_dir)
    assert all(len(t.doc_ids) == 3 for t in data.test_sets.values())


def test_packing_rows_spans_and_padding() -> None:
    docs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10, 11, 12])]
    rows, spans, n = prep.pack(docs, width=4, eot_id=0, pad_id=1)
    # stream: 5 6 7 0 | 8 0 9 10 | 11 12 0 + pad
    assert rows.tolist() == [[5, 6, 7, 0], [8, 0, 9, 10], [11, 12, 0, 1]]
    assert spans.tolist() == [[0, 1], [1, 3], [2, 3]]
    assert n == 11
    rows, _, n = prep.pack([np.array([5, 6, 7])], width=3, eot_id=0, pad_id=1)
    assert rows.tolist() == [[5, 6, 7]] and n == 3  # the lone last EOT has nothing to predict


def test_labels_ignore_padding_and_optionally_eot() -> None:
    rows = torch.tensor([[5, 6, 0, 7, 0, 1, 1]])
    inputs, labels = prep.make_labels(rows, pad_id=1, eot_id=0, learn_eot=True)
    assert inputs.tolist() == [[5, 6, 0, 7, 0, 1]]
    assert labels.tolist() == [[6, 0, 7, 0, IGNORE, IGNORE]]
    _, labels = prep.make_labels(rows, pad_id=1, eot_id=0, learn_eot=False)
    assert labels.tolist() == [[6, IGNORE, 7, IGNORE, IGNORE, IGNORE]]


def test_pools_and_test_sets_shapes(corpus: Corpus, cache_dir: Path) -> None:
    data = _prepare(corpus, cache_dir, context=32, noise=NoiseSpec(retain_retain_frac=0.25))
    assert set(data.pools) == {"retain/default", "retain/retain", "forget/forget", "adjacent/default"}
    for pool in data.pools.values():
        assert pool.examples.dtype == torch.long and pool.examples.shape[1] == 33
        assert pool.doc_spans.shape == (pool.examples.shape[0], 2)
        assert pool.n_tokens == int((pool.examples != data.pad_id).sum())
    for t in data.test_sets.values():
        assert t.tokens.shape[1] <= 33 and int(t.lengths.max()) == t.tokens.shape[1]
        last = t.tokens[torch.arange(len(t.lengths)), t.lengths - 1]
        assert (last[t.lengths < 33] == data.eot_id).all()  # whole documents end in EOT; longer ones are cut
        assert t.attention_mask.shape == (len(t.lengths), t.tokens.shape[1] - 1)
    assert data.summary()["label_confusion_docs"]["retain"]["retain"] == len(data.pools["retain/retain"].doc_ids)


def test_rows_hold_exactly_the_pool_documents(corpus: Corpus, cache_dir: Path) -> None:
    data = _prepare(corpus, cache_dir, context=16)
    pool = data.pools["forget/forget"]
    text = {d.doc_id: d.text for d in corpus.documents}
    flat = pool.examples.flatten()
    stream = flat[flat != data.pad_id].tolist()
    expected = []
    for doc_id in pool.doc_ids:
        expected += data.tokenizer(text[doc_id])["input_ids"] + [data.eot_id]
    assert stream == expected
    first, last = pool.doc_spans[0].tolist()
    assert first == 0 and last >= 1


# ---------------------------------------------------------------------------------------------------------------------
# Manifest hash: changes iff the training content changes


def test_manifest_is_stable_for_the_same_content(corpus: Corpus, cache_dir: Path) -> None:
    a = _prepare(corpus, cache_dir)
    b = _prepare(synthetic_corpus(), cache_dir)  # rebuilt, equal content
    assert a.manifest_hash == b.manifest_hash
    # things that do not change what is trained on: the noise seed without noise, eval-only changes
    assert _prepare(corpus, cache_dir, noise=NoiseSpec(seed=7)).manifest_hash == a.manifest_hash
    assert _prepare(corpus, cache_dir, filter=FilterSpec(kind=FilterKind.NONE)).manifest_hash == a.manifest_hash


@pytest.mark.parametrize("change", ["text", "context", "seed", "learn_eot", "vocab", "filter", "upsample", "noise"])
def test_manifest_changes_with_training_content(corpus: Corpus, cache_dir: Path, change: str) -> None:
    base = _prepare(corpus, cache_dir)
    kw: dict[str, object] = {}
    spec, context, other = SPEC, 32, corpus
    if change == "text":
        docs = list(corpus.documents)
        i = next(i for i, d in enumerate(docs) if d.doc_id not in {x for t in base.test_sets.values()
                                                                    for x in t.doc_ids})
        docs[i] = dataclasses.replace(docs[i], text=docs[i].text + " more")
        other = dataclasses.replace(corpus, documents=tuple(docs))
    elif change == "context":
        context = 48
    elif change == "seed":
        spec = dataclasses.replace(SPEC, seed=3)  # another held-out draw
    elif change == "learn_eot":
        spec = dataclasses.replace(SPEC, learn_eot=False)
    elif change == "vocab":
        spec = dataclasses.replace(SPEC, vocab_size=280)
    elif change == "filter":
        kw["filter"] = FilterSpec(kind=FilterKind.WEAK)
    elif change == "upsample":
        spec = dataclasses.replace(SPEC, upsample_adjacent=0.0)
    elif change == "noise":
        kw["noise"] = NoiseSpec(retain_retain_frac=0.5)
    assert _prepare(other, cache_dir, spec, context, **kw).manifest_hash != base.manifest_hash


def test_heldout_text_change_keeps_the_manifest(corpus: Corpus, cache_dir: Path) -> None:
    base = _prepare(corpus, cache_dir)
    held = next(iter(base.test_sets.values())).doc_ids[0]
    docs = tuple(dataclasses.replace(d, text=d.text + " x") if d.doc_id == held else d for d in corpus.documents)
    # the tokenizer is trained on training documents only, so it and every training row stay the same
    assert _prepare(dataclasses.replace(corpus, documents=docs), cache_dir).manifest_hash == base.manifest_hash


# ---------------------------------------------------------------------------------------------------------------------
# Caching and granularity


def test_repeat_run_skips_tokenization(corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _prepare(corpus, tmp_path)

    def no_encoding(*args: object) -> None:
        raise AssertionError("tokenized again although the arrays were cached")

    monkeypatch.setattr(prep, "encode_documents", no_encoding)
    monkeypatch.setattr(prep, "train_tokenizer", lambda texts, vocab, cache: prep.load_tokenizer(
        next((cache / "tokenizers").iterdir())))
    again = _prepare(corpus, tmp_path, context=48, noise=NoiseSpec(retain_retain_frac=0.5))
    assert again.tokenizer_hash == first.tokenizer_hash
    assert len(list((tmp_path / "tokens").iterdir())) == 1


def test_batch_granularity_pools_are_true_splits(corpus: Corpus, cache_dir: Path) -> None:
    data = _prepare(corpus, cache_dir, noise=NoiseSpec(granularity=NoiseGranularity.BATCH, recall=0.5))
    assert set(data.pools) == {"retain", "forget", "adjacent"}
    assert all(p.mode is None for p in data.pools.values()) and data.doc_labels == {}


def test_max_docs_per_split_caps_training(corpus: Corpus, cache_dir: Path) -> None:
    full = _prepare(corpus, cache_dir)
    capped = _prepare(corpus, cache_dir, dataclasses.replace(SPEC, max_docs_per_split=10))
    per_split = {s: sum(len(p.doc_ids) for p in capped.pools.values() if p.split == s) for s in Split}
    assert per_split == {Split.RETAIN: 10, Split.FORGET: 10, Split.ADJACENT: 10}
    assert capped.tokenizer_hash == full.tokenizer_hash  # the cap does not retrain the tokenizer
    assert capped.test_sets.keys() == full.test_sets.keys()
    assert all(capped.test_sets[k].doc_ids == full.test_sets[k].doc_ids for k in full.test_sets)


def test_pretrained_tokenizer_path(corpus: Corpus, cache_dir: Path, tmp_path: Path) -> None:
    base = _prepare(corpus, cache_dir)
    base.tokenizer.save_pretrained(tmp_path / "tok")
    data = _prepare(corpus, cache_dir, dataclasses.replace(SPEC, vocab_size=999), tokenizer_path=tmp_path / "tok")
    assert data.tokenizer_hash == base.tokenizer_hash and data.vocab_size == base.vocab_size


def test_embedded_corpus_end_to_end(cache_dir: Path) -> None:
    spec = DataSpec(corpus="wiki-bio", vocab_size=1024, test_docs_per_category=20, max_docs_per_split=300)
    data = prepare_data(spec, 128, cache_dir, NoiseSpec(recall=0.9, retain_retain_frac=0.1))
    assert data.vocab_size == 1024
    assert len(data.test_sets) == 12 and all(len(t.doc_ids) == 20 for t in data.test_sets.values())
    conf = data.summary()["label_confusion_docs"]
    assert conf["forget"] == {"default": 30, "retain": 0, "forget": 270}
    assert conf["retain"]["retain"] == 30 and conf["adjacent"]["default"] == 300
    assert not {d for t in data.test_sets.values() for d in t.doc_ids} & _trained_doc_ids(data)
    assert set(data.doc_labels) == _trained_doc_ids(data)
