"""Data for SGTM runs: corpora, tokenizer, held-out splits, label pools, training plan, sampler. No model code.

The training loop's view:

    data = prepare_data(spec.data, spec.model.context, cache_dir, spec.noise, spec.filter)
    plan = data.plan(spec.steps, seed=spec.seed)            # per step: (pool, split, mode, skip)
    sampler = PoolSampler({n: p.examples for n, p in data.pools.items()}, seed=spec.seed)
    for step in plan:
        if step.skip: continue                              # epoch-matched filter: count the step, train nothing
        inputs, labels = data.inputs_and_labels(sampler.next_batch(step.pool, batch_size, rank, world_size))

Modules: corpora (Document, Corpus), registry (corpus name -> loader), embedded (wiki-bilingual, wiki-bio), hub
(tinystories-bilingual, wikipedia-ores), jsonl (bring-your-own), adjacency (how wiki-bio's adjacent split was chosen),
tokenizer, noise, schedule, prepare, sampler.
"""

from sgtm_engine.data.corpora import Corpus, Document
from sgtm_engine.data.embedded import load_wiki_bilingual, load_wiki_bio
from sgtm_engine.data.hub import load_tinystories_bilingual, load_wikipedia_ores
from sgtm_engine.data.jsonl import load_jsonl, register_jsonl_corpus
from sgtm_engine.data.noise import assign_document_labels, confusion, draw_mode, step_rates
from sgtm_engine.data.prepare import IGNORE, Pool, PreparedData, TestSet, make_labels, prepare_data
from sgtm_engine.data.registry import known_corpora, load_corpus, register_corpus, unregister_corpus
from sgtm_engine.data.sampler import PoolSampler
from sgtm_engine.data.schedule import PlanStep, PoolInfo, TrainingPlan, build_plan
from sgtm_engine.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer

__all__ = [
    "IGNORE",
    "Corpus",
    "Document",
    "PlanStep",
    "Pool",
    "PoolInfo",
    "PoolSampler",
    "PreparedData",
    "TestSet",
    "TrainingPlan",
    "assign_document_labels",
    "build_plan",
    "confusion",
    "draw_mode",
    "known_corpora",
    "load_corpus",
    "load_jsonl",
    "load_tinystories_bilingual",
    "load_tokenizer",
    "load_wiki_bilingual",
    "load_wiki_bio",
    "load_wikipedia_ores",
    "make_labels",
    "prepare_data",
    "register_corpus",
    "register_jsonl_corpus",
    "step_rates",
    "tokenizer_hash",
    "train_tokenizer",
    "unregister_corpus",
]
