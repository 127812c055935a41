"""Bring-your-own corpora: JSON-lines documents, registered by an operator under a name.

One object per line: `text` (non-empty string), `split` ("retain", "forget" or "adjacent"), `category` (string);
optional `id` (default: the line number), `lang` (default "und") and `heldout` (true: reserved for evaluation).

Choices made here:
- Every problem in the file is reported at once (up to 20, with line numbers), like the config's validation.
- The file's sha256 is recorded in the corpus metadata; caches are keyed by the documents' content anyway.
- Registration binds a path on the operator's side (CLI, deployment config): the API can only name the corpus.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from sgtm_engine.config import Split
from sgtm_engine.data.corpora import Corpus, Document, check_documents
from sgtm_engine.data.registry import register_corpus
from sgtm_engine.errors import DataError

_MAX_REPORTED = 20


def load_jsonl(path: str | Path, name: str | None = None, tokenizer_path: Path | None = None) -> Corpus:
    """A corpus from a JSON-lines file (see the module docstring for the fields)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"corpus file {path}: {e}") from e
    name = name or path.stem
    problems: list[str] = []
    docs: list[Document] = []
    heldout: set[str] = set()
    splits = [s.value for s in Split]
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            problems.append(f"line {n}: not valid JSON ({e})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {n}: expected an object with text, split, category")
            continue
        text, split, category = obj.get("text"), obj.get("split"), obj.get("category")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"line {n}: text={text!r}: must be a non-empty string")
        if split not in splits:
            problems.append(f"line {n}: split={split!r}: must be one of {splits}")
        if not isinstance(category, str) or not category:
            problems.append(f"line {n}: category={category!r}: must be a non-empty string")
        if len(problems) >= _MAX_REPORTED:
            break
        if problems:
            continue
        doc = Document(str(obj.get("id", n)), text.strip(), Split(split), category, str(obj.get("lang", "und")))
        docs.append(doc)
        if obj.get("heldout"):
            heldout.add(doc.doc_id)
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems[:_MAX_REPORTED]))
    meta = {"source": str(path), "sha256": hashlib.sha256(raw).hexdigest()}
    return Corpus(name, check_documents(name, docs), meta, frozenset(heldout), tokenizer_path)


def register_jsonl_corpus(name: str, path: str | Path, *, tokenizer_path: Path | None = None,
                          replace: bool = False) -> None:
    """Make a JSONL file available as `DataSpec(corpus=name)`."""
    register_corpus(name, functools.partial(load_jsonl, Path(path), name, tokenizer_path), replace=replace)
