"""Hub loaders on small local fixtures in the hub's layouts; nothing here touches the network."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sgtm_engine.config import Split
from sgtm_engine.data.hub import (
    best_topics,
    iter_rows,
    load_tinystories_bilingual,
    load_wikipedia_ores,
    read_ores_csv,
    split_files,
)
from sgtm_engine.errors import DataError

from .conftest import FIXTURES

HUB = FIXTURES / "hub"


def test_tinystories_one_document_per_story_and_language() -> None:
    corpus = load_tinystories_bilingual(HUB / "tinystories_spanish")
    counts = corpus.counts()
    assert counts == {"forget": {"es": 8}, "retain": {"en": 9}}  # one train row has no Spanish side
    assert corpus.metadata["dropped"] == {"empty_text_es": 1}
    assert corpus.heldout == {f"ts:validation:{i}:{lang}" for i in range(3) for lang in ("en", "es")}
    first = {d.doc_id: d for d in corpus.documents}
    assert first["ts:train:0:en"].text.startswith("Once upon a time")
    assert first["ts:train:0:es"].text.startswith("Había una vez") and first["ts:train:0:es"].split == Split.FORGET


def test_tinystories_max_rows_caps_each_split() -> None:
    corpus = load_tinystories_bilingual(HUB / "tinystories_spanish", max_rows=2)
    assert sum(d.doc_id.startswith("ts:train") for d in corpus.documents) == 4
    assert len(corpus.heldout) == 4


def test_split_files_follow_hub_naming(tmp_path: Path) -> None:
    root = HUB / "tinystories_spanish"
    assert [p.name for p in split_files(root, "validation")] == ["validation-00000-of-00001.jsonl"]
    assert [p.name for p in split_files(root, "train")] == ["train-00000-of-00001.jsonl"]
    assert split_files(root, "test") == []


def test_best_topic_prefers_non_asterisk_then_score() -> None:
    topics = best_topics(read_ores_csv(HUB / "ores_topics.csv"))
    assert topics[12] == "STEM.Biology"  # STEM.STEM* scores higher but carries an asterisk
    assert topics[13] == "STEM.Biology"  # 0.93 beats Chemistry's 0.71
    assert topics[39] == "STEM.Medicine_&_Health"
    assert topics[307] == "History_and_Society.Politics_and_government"
    assert 1309 not in topics  # frwiki rows are ignored


def test_wikipedia_ores_join_and_splits() -> None:
    corpus = load_wikipedia_ores(HUB / "wikipedia", HUB / "ores_topics.csv")
    by_id = {d.doc_id: d for d in corpus.documents}
    assert corpus.counts() == {
        "adjacent": {"STEM.Chemistry": 1, "STEM.Earth_and_environment": 1, "STEM.Medicine_&_Health": 1},
        "forget": {"STEM.Biology": 2},
        "retain": {"Culture": 1, "Geography": 1, "History_and_Society": 1, "STEM": 1},
    }
    assert by_id["enwiki:309"].category == "STEM"  # the STEM remainder collapses to the top level
    assert "enwiki:999" not in by_id and corpus.metadata["dropped"] == {"no_topic": 1}


def test_wikipedia_ores_topic_lists_are_parameters() -> None:
    corpus = load_wikipedia_ores(HUB / "wikipedia", HUB / "ores_topics.csv", forget_topics=("Culture.Performing_arts",),
                                 adjacent_topics=("STEM.Biology",))
    counts = corpus.counts()
    assert counts["forget"] == {"Culture.Performing_arts": 1} and counts["adjacent"] == {"STEM.Biology": 2}


def test_wikipedia_ores_needs_the_topics_file() -> None:
    with pytest.raises(DataError, match="ORES topics CSV"):
        load_wikipedia_ores(HUB / "wikipedia")


def test_missing_local_path_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_tinystories_bilingual(tmp_path / "nowhere")


def test_rows_missing_a_column_are_refused(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "only English"}) + "\n")
    with pytest.raises(DataError, match="lack columns"):
        load_tinystories_bilingual(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed")
def test_parquet_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b"], "text_es": ["c d"]}), tmp_path / "train-00000-of-00001.parquet")
    assert list(iter_rows(tmp_path / "train-00000-of-00001.parquet", ["text", "text_es"])) == [
        {"text": "a b", "text_es": "c d"}]


def test_parquet_without_pyarrow_says_what_to_do(tmp_path: Path) -> None:
    if importlib.util.find_spec("pyarrow") is not None:
        pytest.skip("pyarrow is installed")
    (tmp_path / "train.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow"):
        list(iter_rows(tmp_path / "train.parquet", ["text"]))


def test_hub_id_is_downloaded_lazily(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import shutil

    import huggingface_hub

    snapshot = tmp_path / ".cache" / "hub" / "snapshot"  # the hub's cache sits under a hidden folder
    shutil.copytree(HUB / "tinystories_spanish", snapshot)
    calls = []

    def fake_download(**kw: object) -> str:
        calls.append(kw)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    corpus = load_tinystories_bilingual("ffuuugor/tinystories_spanish", revision="abc123")
    assert calls == [{"repo_id": "ffuuugor/tinystories_spanish", "repo_type": "dataset", "revision": "abc123",
                      "allow_patterns": None}]
    assert corpus.counts() == {"forget": {"es": 8}, "retain": {"en": 9}}


def test_string_that_is_neither_path_nor_hub_id(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a hub data set id"):
        load_tinystories_bilingual(str(tmp_path / "a" / "b"))
