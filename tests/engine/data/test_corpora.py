"""Embedded corpora (real package data, read-only), cleaning, checksums, registry, JSONL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sgtm_engine.config import BUILTIN_CORPORA, DataSpec, Split
from sgtm_engine.data import embedded, known_corpora, load_corpus, load_jsonl, register_jsonl_corpus
from sgtm_engine.data.adjacency import rank_adjacent
from sgtm_engine.data.corpora import Corpus, Document
from sgtm_engine.data.registry import register_corpus, unregister_corpus
from sgtm_engine.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------------------------------
# Embedded corpora


def test_wiki_bilingual_counts_are_sane() -> None:
    corpus = load_corpus(DataSpec(corpus="wiki-bilingual"))
    counts = corpus.counts()
    en, es = sum(counts["retain"].values()), sum(counts["forget"].values())
    assert 9_900 < en <= 10_033 and 6_000 < es <= 6_239  # the package's 10,033 / 6,239 minus what cleaning drops
    assert len(counts["retain"]) == 12 and len(counts["forget"]) == 8
    assert "adjacent" not in counts
    assert counts["retain"]["Biology and health sciences"] > 1_300
    assert {d.lang for d in corpus.by_split(Split.FORGET)} == {"es"}
    assert "CC BY-SA" in corpus.metadata["attribution"]
    assert set(corpus.metadata["files_sha256"]) == {"summaries_en-us.json", "titles_en-us.json",
                                                    "summaries_es-es.json", "titles_es-es.json"}


def test_wiki_bio_splits() -> None:
    corpus = load_corpus(DataSpec(corpus="wiki-bio"))
    counts = corpus.counts()
    assert list(counts["forget"]) == [embedded.BIOLOGY]
    assert set(counts["adjacent"]) == set(embedded.WIKI_BIO_ADJACENT)
    assert embedded.UNCATEGORIZED in counts["retain"]  # deliberate natural label noise stays in retain
    assert not set(counts["retain"]) & (set(embedded.WIKI_BIO_ADJACENT) | {embedded.BIOLOGY})
    assert {d.lang for d in corpus.documents} == {"en"}
    assert corpus.fingerprint == load_corpus(DataSpec(corpus="wiki-bio")).fingerprint


def test_wiki_bio_adjacent_choice_is_measured_and_deterministic() -> None:
    corpus = load_corpus(DataSpec(corpus="wiki-bio"))
    ranking = rank_adjacent(corpus.documents, embedded.BIOLOGY)
    assert ranking == rank_adjacent(corpus.documents, embedded.BIOLOGY)
    names = [c for c, _ in ranking]
    assert set(names[:3]) == set(embedded.WIKI_BIO_ADJACENT)
    assert names[0] == "Physical sciences"
    scores = [s for _, s in ranking]
    assert scores[2] - scores[3] > scores[0] - scores[2]  # the three are a cluster: a clear gap to the fourth


def test_cleaning_rules() -> None:
    raw = "A\u00a0 cell ,  the\u2009unit .\n\n\n  Second\u2060 line "
    assert embedded.clean_text(raw) == "A cell, the unit.\nSecond line"
    assert embedded.drop_reason("Helena puede referirse a:", "es") == "short"
    assert embedded.drop_reason("El término sacrificio puede referirse a: algo y otras cosas", "es") == "disambiguation"
    assert embedded.drop_reason("Graf hace referencia a varios artículos:", "es") == "disambiguation"
    assert embedded.drop_reason("No debe confundirse con el color rosado de las flores", "es") == "hatnote"
    ordinary = "La conciencia se define como el conocimiento de sí mismo. También puede referirse a: otra cosa"
    assert embedded.drop_reason(ordinary, "es") is None  # the phrase after the first sentence is ordinary text


def test_cleaning_applied_to_package_data() -> None:
    es = embedded.load_language("es")
    assert es.dropped["disambiguation"] > 50 and es.dropped["duplicate"] > 0
    texts = [a.text for a in es.articles]
    assert len(set(texts)) == len(texts)
    assert not any("\u00a0" in t or "  " in t or len(t) < embedded.MIN_CHARS for t in texts)
    assert not any(t.startswith("Helena puede referirse") for t in texts)


def test_checksum_mismatch_raises(tmp_path: Path) -> None:
    source = embedded.package_source()
    copied = []
    for name, path, digest in source.files:  # a private copy: site-packages is never touched
        target = tmp_path / name
        shutil.copyfile(path, target)
        copied.append((name, target, digest))
    tampered = tmp_path / "titles_en-us.json"
    data = json.loads(tampered.read_text())
    data[next(iter(data))] = "Biology and health sciences"
    tampered.write_text(json.dumps(data))
    with pytest.raises(DataError, match="does not match the package RECORD"):
        embedded.load_wiki_bio(embedded.WikiSource(tuple(copied), "tampered copy"))
    intact = embedded.WikiSource(tuple(c for c in copied if c[0] != "titles_en-us.json"), "partial copy")
    with pytest.raises(DataError, match="missing"):
        embedded.load_wiki_bio(intact)


def test_record_digest_notation() -> None:
    assert embedded.record_digest(b"") == "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"  # RECORD's empty-file hash


# ---------------------------------------------------------------------------------------------------------------------
# Registry and JSONL


def test_unknown_corpus_names_field_value_and_choices() -> None:
    with pytest.raises(ConfigError) as e:
        load_corpus(DataSpec(corpus="wiki-klingon"))
    message = str(e.value)
    assert "data.corpus='wiki-klingon'" in message
    for name in ("wiki-bilingual", "wiki-bio", "tinystories-bilingual", "wikipedia-ores"):
        assert name in message


def test_the_registry_starts_with_the_built_in_corpora_the_api_accepts() -> None:
    """The API checks corpus names against `config.BUILTIN_CORPORA` (it cannot import the registry)."""
    assert known_corpora() == sorted(BUILTIN_CORPORA)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_corpus_registered_by_name(tmp_path: Path) -> None:
    rows = [{"text": f"doc {i} text", "split": s, "category": c, "id": f"d{i}"}
            for i, (s, c) in enumerate([("retain", "a"), ("forget", "b"), ("adjacent", "c"), ("retain", "a")])]
    rows[3]["heldout"] = True
    path = _jsonl(tmp_path / "mine.jsonl", rows)
    register_jsonl_corpus("my-corpus", path)
    try:
        assert "my-corpus" in known_corpora()
        corpus = load_corpus(DataSpec(corpus="my-corpus"))
        assert corpus.name == "my-corpus" and len(corpus.documents) == 4
        assert corpus.heldout == {"d3"}
        assert corpus.documents[1] == Document("d1", "doc 1 text", Split.FORGET, "b", "und")
        with pytest.raises(ConfigError, match="already registered"):
            register_jsonl_corpus("my-corpus", path)
    finally:
        unregister_corpus("my-corpus")


def test_jsonl_reports_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "", "split": "retain", "category": "a"}\nnot json\n'
                    '{"text": "x", "split": "keep", "category": "a"}\n')
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert "line 1: text=''" in str(e.value) and "line 2" in str(e.value) and "line 3: split='keep'" in str(e.value)


def test_corpus_needs_retain_and_forget(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "r.jsonl", [{"text": "t", "split": "retain", "category": "a"}])
    with pytest.raises(DataError, match="no forget documents"):
        load_jsonl(path)


def test_corpus_rejects_duplicate_ids() -> None:
    doc = Document("x", "t", Split.RETAIN, "a", "en")
    with pytest.raises(DataError, match="duplicate document ids"):
        Corpus("dup", (doc, doc))


def test_operator_can_replace_a_builtin(corpus: Corpus) -> None:
    def loader() -> Corpus:
        return corpus

    register_corpus("wikipedia-ores-test", loader)
    try:
        assert load_corpus(DataSpec(corpus="wikipedia-ores-test")) is corpus
    finally:
        unregister_corpus("wikipedia-ores-test")
