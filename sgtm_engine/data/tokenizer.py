"""The tokenizer: a byte-level BPE trained on the corpus's training documents, or a saved one (e.g. GPT-2's).

Choices made here:
- HF `tokenizers` BPE with a byte-level pre-tokenizer and decoder (no unknown tokens, exact round trip), trained with
  the full byte alphabet and `min_frequency=2`. Two special tokens: `<|endoftext|>` (id 0: EOT, also bos/unk as in
  GPT-2) and a separate `<|pad|>` (id 1), so EOT can be learned while padding is ignored.
- It is wrapped as `transformers.PreTrainedTokenizerFast`, so `save_pretrained` gives a directory that
  `AutoTokenizer.from_pretrained` loads offline and an exported model is complete.
- Trained tokenizers are cached under `cache_dir/tokenizers/<key>`, where the key is a sha256 over the settings,
  the vocabulary size and every training text (length-prefixed, in order): a changed corpus or setting gives a new
  key, the same content reuses the directory. Writes go to a temporary directory renamed into place.
- A saved tokenizer without a pad token (GPT-2) gets `<|pad|>` added (vocabulary + 1), so `learn_eot` still works.
- Text is always encoded with special tokens treated as plain text: a document that contains the string
  "<|endoftext|>" does not inject an EOT (what tiktoken's `encode_ordinary` does for the reference).
- `tokenizer_hash` (sha256 of the serialized backend plus the special-token ids) identifies the tokenizer in the
  data manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sgtm_engine.errors import DataError

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SETTINGS = {"format": 1, "model": "bpe", "pre_tokenizer": "byte_level", "add_prefix_space": False,
            "min_frequency": 2, "special_tokens": [EOT, PAD]}
"""Everything besides the texts and the vocabulary size that decides the trained tokenizer (part of the cache key)."""

# ---------------------------------------------------------------------------------------------------------------------
# Keys and hashes


def tokenizer_key(texts: Iterable[str], vocab_size: int) -> str:
    """The cache key of a BPE trained on `texts`: sha256 over settings, vocabulary size and texts."""
    h = hashlib.sha256(json.dumps({**SETTINGS, "vocab_size": vocab_size}, sort_keys=True).encode())
    for t in texts:
        b = t.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """Identity of a tokenizer's behaviour: its serialized backend plus its EOT and pad ids."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Training (cached) and loading


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT, bos_token=EOT, unk_token=EOT,
                                   pad_token=PAD)


def _train(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=SETTINGS["min_frequency"],
                                  special_tokens=[EOT, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer, length=len(texts))
    tok = _wrap(backend)
    if tok.convert_tokens_to_ids(EOT) != 0 or tok.convert_tokens_to_ids(PAD) != 1:
        raise DataError("BPE training did not give the special tokens ids 0 and 1")  # pragma: no cover
    return tok


def train_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` trained on `texts`, loaded from the cache when the same content was seen.

    Args:
        texts: the training documents, in a fixed order.
        vocab_size: target vocabulary size, special tokens included (a tiny corpus may give fewer).
        cache_dir: the cache root; the tokenizer lives in `cache_dir/tokenizers/<key>`.
    """
    if not texts:
        raise DataError("cannot train a tokenizer on zero documents")
    key = tokenizer_key(texts, vocab_size)
    target = Path(cache_dir) / "tokenizers" / key
    if (target / "tokenizer.json").exists():
        log.info("tokenizer cache hit %s", key[:12])
        return load_tokenizer(target)
    t0 = time.perf_counter()
    tok = _train(texts, vocab_size)
    seconds = time.perf_counter() - t0
    log.info("trained byte-level BPE (%d tokens) on %d documents in %.1f s", len(tok), len(texts), seconds)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=target.parent))
    tok.save_pretrained(tmp)
    meta = {**SETTINGS, "vocab_size": vocab_size, "n_texts": len(texts), "train_seconds": round(seconds, 2)}
    (tmp / "sgtm_tokenizer.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, target)
    except OSError:  # another process cached the same key first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(target)


def hub_tokenizer(name: str, cache_dir: Path) -> PreTrainedTokenizerFast:
    """A registered hub tokenizer (config.TOKENIZERS), downloaded once into `cache_dir` and loaded offline after."""
    from sgtm_engine.config import TOKENIZERS

    local = Path(cache_dir) / "tokenizers" / f"hub-{name}"
    if not (local / "tokenizer.json").exists():
        try:
            AutoTokenizer.from_pretrained(TOKENIZERS[name]).save_pretrained(str(local))
        except OSError as e:
            raise DataError(f"data.tokenizer={name!r}: cannot fetch {TOKENIZERS[name]} from the hub ({e}); this "
                            "needs the internet once, or use data.tokenizer=null to train a BPE") from e
    return load_tokenizer(local)


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A saved tokenizer (ours or e.g. GPT-2's), offline; `<|pad|>` is added when it has no pad token."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {path}: {e}") from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise DataError(f"{path}: need a fast (tokenizers-backed) tokenizer, got {type(tok).__name__}")
    if tok.eos_token_id is None:
        raise DataError(f"{path}: the tokenizer has no eos token; set eos_token to its end-of-text token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD})
    return tok


# ---------------------------------------------------------------------------------------------------------------------
# Encoding


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without EOT; special-token strings in the text are encoded as plain text."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: the flag below must not leak
    backend.encode_special_tokens = True
    backend.no_padding()
    backend.no_truncation()
    return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
