"""The corpus registry: corpus name -> zero-argument loader, the one place `DataSpec.corpus` is resolved.

Choices made here:
- A plain dict, filled with the built-in corpora when this module is imported (`embedded.py`, `hub.py` only
  define loaders; they import `corpora.py` for the types, never this module, so the imports run one way).
- Operators register their own corpora (JSONL files, or a hub corpus read from a local mirror) with
  `register_corpus`; replacing a name, built-in or not, takes `replace=True`. The API never accepts file paths: it
  can only name a corpus.
- A loaded corpus is kept per name for the process (corpora are immutable), so a recipe's stages load it once;
  re-registering a name swaps the loader and misses that cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sgtm_engine.config import DataSpec
from sgtm_engine.data.corpora import Corpus
from sgtm_engine.data.embedded import load_wiki_bilingual, load_wiki_bio
from sgtm_engine.data.hub import load_tinystories_bilingual, load_wikipedia_ores
from sgtm_engine.errors import ConfigError

log = logging.getLogger(__name__)

CorpusLoader = Callable[[], Corpus]

_REGISTRY: dict[str, CorpusLoader] = {
    "wiki-bilingual": load_wiki_bilingual,
    "wiki-bio": load_wiki_bio,
    "tinystories-bilingual": load_tinystories_bilingual,
    "wikipedia-ores": load_wikipedia_ores,
}

#: name -> (loader, corpus) of the corpora loaded in this process.
_LOADED: dict[str, tuple[CorpusLoader, Corpus]] = {}


def register_corpus(name: str, loader: CorpusLoader, *, replace: bool = False) -> None:
    """Make `loader` available as `DataSpec(corpus=name)`.

    Args:
        name: the registry name.
        loader: a zero-argument callable returning a `Corpus` (use `functools.partial` to bind paths).
        replace: allow overriding an existing name (e.g. pointing `wikipedia-ores` at local files).
    """
    if not name:
        raise ConfigError("register_corpus: name='' is empty; give a non-empty corpus name")
    if name in _REGISTRY and not replace:
        raise ConfigError(f"register_corpus: {name!r} is already registered; pass replace=True to override it")
    _REGISTRY[name] = loader


def unregister_corpus(name: str) -> None:
    _REGISTRY.pop(name, None)


def known_corpora() -> list[str]:
    return sorted(_REGISTRY)


def load_corpus(spec: DataSpec) -> Corpus:
    """The corpus named by `spec.corpus`.

    Raises:
        ConfigError: the name is not registered (naming `data.corpus`, the value and the known names).
        DataError: the corpus' files are missing or corrupt.
    """
    loader = _REGISTRY.get(spec.corpus)
    if loader is None:
        raise ConfigError(f"data.corpus={spec.corpus!r}: unknown corpus; choose one of {sorted(_REGISTRY)} "
                          f"or register it first with sgtm_engine.data.register_corpus")
    cached = _LOADED.get(spec.corpus)
    if cached is not None and cached[0] is loader:
        return cached[1]
    corpus = loader()
    log.info("corpus %s: %d documents %s", corpus.name, len(corpus.documents), corpus.counts())
    _LOADED[spec.corpus] = (loader, corpus)
    return corpus
