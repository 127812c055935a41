"""The byte-level BPE: round trip, special tokens, content-keyed cache, offline AutoTokenizer loading."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sgtm_engine.data import tokenizer as tk
from sgtm_engine.errors import DataError

TEXTS = [f"The cell {i} divides; la célula {i} se divide. Ünïcödé ✓ {i * 7}" for i in range(200)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tk.PreTrainedTokenizerFast]:
    cache = tmp_path_factory.mktemp("tok")
    return cache, tk.train_tokenizer(TEXTS, 300, cache)


def test_roundtrip_and_special_tokens(trained: tuple[Path, tk.PreTrainedTokenizerFast]) -> None:
    _, tok = trained
    assert tok.eos_token == tk.EOT and tok.eos_token_id == 0 and tok.bos_token_id == 0
    assert tok.pad_token == tk.PAD and tok.pad_token_id == 1
    assert len(tok) == 300
    text = "Zebra 🦓 niño\n\tcafé — 42"  # unseen bytes still round-trip: byte-level, no unknown token
    [ids] = tk.encode_documents(tok, [text])
    assert tok.decode(ids) == text
    assert 0 not in ids and 1 not in ids


def test_special_token_strings_in_text_stay_text(trained: tuple[Path, tk.PreTrainedTokenizerFast]) -> None:
    _, tok = trained
    [ids] = tk.encode_documents(tok, [f"a{tk.EOT}b{tk.PAD}"])
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids
    assert tok.decode(ids) == f"a{tk.EOT}b{tk.PAD}"


def test_same_content_hits_the_cache(trained: tuple[Path, tk.PreTrainedTokenizerFast],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cache, tok = trained

    def no_training(*args: object) -> None:
        raise AssertionError("trained again although the content was cached")

    monkeypatch.setattr(tk, "_train", no_training)
    again = tk.train_tokenizer(list(TEXTS), 300, cache)
    assert tk.tokenizer_hash(again) == tk.tokenizer_hash(tok)
    assert len(list((cache / "tokenizers").iterdir())) == 1


def test_changed_content_or_setting_gives_a_new_key() -> None:
    key = tk.tokenizer_key(TEXTS, 300)
    assert key == tk.tokenizer_key(list(TEXTS), 300)
    assert key != tk.tokenizer_key(TEXTS[:-1], 300)
    assert key != tk.tokenizer_key(TEXTS[:-1] + [TEXTS[-1] + " "], 300)
    assert key != tk.tokenizer_key(TEXTS, 301)
    assert tk.tokenizer_key(["ab", "c"], 300) != tk.tokenizer_key(["a", "bc"], 300)  # boundaries count


def test_loads_with_auto_tokenizer_offline(trained: tuple[Path, tk.PreTrainedTokenizerFast], tmp_path: Path) -> None:
    _, tok = trained
    tok.save_pretrained(tmp_path / "export")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "export"), local_files_only=True)
    assert loaded.eos_token_id == 0 and loaded.pad_token_id == 1
    assert loaded("The cell divides")["input_ids"] == tok("The cell divides")["input_ids"]
    assert tk.tokenizer_hash(loaded) == tk.tokenizer_hash(tok)


def test_pretrained_without_pad_gets_one(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())  # GPT-2-like: one special token, no pad
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=280, special_tokens=[tk.EOT],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tk.EOT).save_pretrained(tmp_path / "gpt2-like")
    loaded = tk.load_tokenizer(tmp_path / "gpt2-like")
    assert loaded.pad_token == tk.PAD and loaded.pad_token_id == 280 and len(loaded) == 281
    assert loaded.eos_token_id == 0


def test_bad_tokenizer_path_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        tk.load_tokenizer(tmp_path / "missing")


def test_hub_tokenizer_is_fetched_once_and_then_loaded_offline(tmp_path, monkeypatch):
    """A registered hub tokenizer is saved under the cache and read from there (no network in tests: fake hub)."""
    from transformers import PreTrainedTokenizerFast

    from sgtm_engine.data import tokenizer as tok_mod

    fake = tok_mod.train_tokenizer(["hello world"] * 50 + ["hola mundo"] * 50, 300, tmp_path / "c0")
    calls = []

    class FakeAuto:
        @staticmethod
        def from_pretrained(name, **kw):
            if kw.get("local_files_only"):
                return PreTrainedTokenizerFast.from_pretrained(name, **kw)
            calls.append(name)
            return fake

    monkeypatch.setattr(tok_mod, "AutoTokenizer", FakeAuto)
    a = tok_mod.hub_tokenizer("gpt2", tmp_path / "c1")
    b = tok_mod.hub_tokenizer("gpt2", tmp_path / "c1")
    assert calls == ["openai-community/gpt2"]
    assert a.encode("hola") == b.encode("hola") and a.pad_token_id is not None
