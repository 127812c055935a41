"""Evaluation: loss per split and category, logit calibration, and capability measures beyond loss.

Choices (docs/method.md §10, §11):
- Loss is token-weighted within a (split, category); a split's `loss` is the unweighted mean over its categories
  (the paper's `val_loss`), and `loss_tok` the token-weighted one. Top-1 next-token accuracy sits beside each loss.
- Calibration fits only the output bias of an ablated copy (re-initialized from N(0, bias_std), seeded), on one
  train batch per non-empty split per step, with loss L_forget + beta * L_adjacent + alpha * L_retain and an AdamW
  whose LR decays linearly to final_lr_ratio * lr. The model passed in is never modified.
- Capability beyond loss, all offline and seeded: for a language-removal corpus the share of sampled continuations of
  held-out target-language prompts that an offline identifier (py3langid) labels as the target language; for every
  corpus a multiple-choice cloze on held-out documents (the last word of the first sentence against 4 distractor
  words from other documents of the same split, scored by log-likelihood; chance = 0.2), forget and retain side.
"""

from __future__ import annotations

import copy
import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sgtm_engine.config import AblateSpec, CalibrateSpec, EvalSpec, MaskMode, Split, Strategy
from sgtm_engine.data.conditional import suppress_logits
from sgtm_engine.data.prepare import PreparedData
from sgtm_engine.model.ablation import ablate
from sgtm_engine.model.gpt_neo import IGNORE_INDEX, GPTNeoLM
from sgtm_engine.model.hf import save_hf
from sgtm_engine.runtime import Runtime

if TYPE_CHECKING:
    from sgtm_engine.progress import Emit

log = logging.getLogger(__name__)

TARGET_LANGUAGE = {"wiki-bilingual": "es", "tinystories-bilingual": "es"}


# ---------------------------------------------------------------------------------------------------------------------
# Loss and accuracy per split and category


@torch.no_grad()
def loss_table(model: GPTNeoLM, data: PreparedData, spec: EvalSpec, runtime: Runtime) -> dict[str, float]:
    """Flat metrics: `<split>/<category>/{loss,acc,tokens}`, `<split>/loss` (mean of categories), `<split>/loss_tok`.

    Under torchrun every rank must call this together: each evaluates every world_size-th batch of each category and
    the sums are added over ranks, so N ranks evaluate the test set once between them, not N times."""
    was_training = model.training
    model.eval()
    model.set_mode(MaskMode.DEFAULT)
    keys = sorted(data.test_sets)
    sums: list[list[float]] = []  # per (split, category): summed loss, correct predictions, tokens
    for key in keys:
        tokens = data.test_sets[key].tokens
        starts = list(range(0, tokens.shape[0], spec.batch_size))[:spec.max_batches]
        total_loss, total_correct, total_tokens = 0.0, 0, 0
        for start in starts[runtime.rank::runtime.world_size]:
            rows = tokens[start:start + spec.batch_size].to(runtime.device)
            inputs, labels = data.inputs_and_labels(rows)
            total_tokens += int((labels != IGNORE_INDEX).sum())
            ce, correct = torch.zeros((), device=runtime.device), torch.zeros((), device=runtime.device)
            with runtime.autocast():  # the head in row chunks, as the training loss: no whole logit matrix
                for logits, targets in model.head_chunks(model.hidden_states(inputs), labels):
                    ce += F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
                    correct += ((logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum()
            total_loss += float(ce)
            total_correct += int(correct)
        sums.append([total_loss, total_correct, total_tokens])
    out: dict[str, float] = {}
    per_split: dict[str, list[tuple[float, float, int]]] = {}
    for (split, category), (total_loss, total_correct, total_tokens) in zip(keys, runtime.total(sums), strict=True):
        if total_tokens == 0:
            continue
        loss, acc = total_loss / total_tokens, total_correct / total_tokens
        key = f"{split.value}/{category}"
        out[f"{key}/loss"], out[f"{key}/acc"], out[f"{key}/tokens"] = loss, acc, float(total_tokens)
        per_split.setdefault(split.value, []).append((loss, acc, int(total_tokens)))
    for split, rows in per_split.items():
        out[f"{split}/loss"] = sum(r[0] for r in rows) / len(rows)
        out[f"{split}/acc"] = sum(r[1] for r in rows) / len(rows)
        tokens = sum(r[2] for r in rows)
        out[f"{split}/loss_tok"] = sum(r[0] * r[2] for r in rows) / tokens
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Logit calibration


def _split_pools(data: PreparedData) -> dict[Split, list[str]]:
    pools: dict[Split, list[str]] = {}
    for name, pool in data.pools.items():
        if pool.examples.shape[0]:
            pools.setdefault(pool.split, []).append(name)
    return pools


def calibrate(model: GPTNeoLM, data: PreparedData, spec: CalibrateSpec, runtime: Runtime) -> GPTNeoLM:
    """A copy of `model` whose output bias alone is refit after ablation; the input model is untouched."""
    calibrated = copy.deepcopy(model)
    calibrated.set_mode(MaskMode.DEFAULT)
    calibrated.train()
    bias = calibrated.lm_head.bias
    if bias is None:
        log.warning("model has no output bias (model.output_bias=false): calibration skipped")
        return calibrated
    for p in calibrated.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        bias.copy_(torch.randn(bias.shape, generator=gen) * spec.bias_std)
    bias.requires_grad_(True)
    opt = torch.optim.AdamW([bias], lr=spec.lr, weight_decay=spec.weight_decay)
    weights = {Split.FORGET: 1.0, Split.ADJACENT: spec.beta, Split.RETAIN: spec.alpha}
    pools = _split_pools(data)
    rng = random.Random(spec.seed)
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = spec.lr * (1 - (1 - spec.final_lr_ratio) * step / max(1, spec.steps - 1))
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=runtime.device)
        for split, names in pools.items():
            examples = data.pools[rng.choice(names)].examples
            idx = torch.randint(0, examples.shape[0], (spec.batch_size,), generator=gen)
            inputs, labels = data.inputs_and_labels(examples[idx].to(runtime.device))
            with runtime.autocast():
                _, loss = calibrated(inputs, labels)
            total = total + weights[split] * loss
        total.backward()
        opt.step()
    bias.requires_grad_(False)
    calibrated.eval()
    return calibrated


# ---------------------------------------------------------------------------------------------------------------------
# Capability beyond loss


@torch.no_grad()
def language_share(model: GPTNeoLM, data: PreparedData, spec: EvalSpec, runtime: Runtime, language: str,
                   prompt_tokens: int = 16) -> float | None:
    """Share of sampled continuations of held-out forget prompts identified as `language` (py3langid)."""
    import py3langid

    prompts = [t.tokens[i, :prompt_tokens] for (split, _), t in sorted(data.test_sets.items())
               if split == Split.FORGET for i in range(t.tokens.shape[0]) if t.lengths[i] > prompt_tokens]
    if not prompts or spec.n_samples == 0:
        return None
    rng = random.Random(spec.seed)
    prompts = rng.sample(prompts, min(spec.n_samples, len(prompts)))
    gen = torch.Generator(device=runtime.device).manual_seed(spec.seed)
    batch = torch.stack(prompts).to(runtime.device)
    sampled = sample(model, batch, spec.sample_tokens, gen, runtime, banned_ids=data.control_ids)[:, prompt_tokens:]
    hits = 0
    for row in sampled.tolist():
        text = data.tokenizer.decode(row, skip_special_tokens=True)
        hits += py3langid.classify(text)[0] == language if text.strip() else 0
    return hits / len(prompts)


@torch.no_grad()
def sample(model: GPTNeoLM, prompts: torch.Tensor, n_tokens: int, generator: torch.Generator, runtime: Runtime,
           temperature: float = 1.0, banned_ids: Sequence[int] = ()) -> torch.Tensor:
    """Ancestral sampling (no KV cache: short continuations of small models); `banned_ids` are never sampled
    (conditional training's control tokens)."""
    model.eval()
    model.set_mode(MaskMode.DEFAULT)
    ids = prompts
    for _ in range(n_tokens):
        window = ids[:, -model.spec.context:]
        with runtime.autocast():
            logits, _ = model(window)
        probs = torch.softmax(suppress_logits(logits[:, -1].float(), banned_ids) / temperature, dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


_SENTENCE = re.compile(r"^(.{20,300}?)\s(\w{3,})[.!?](\s|$)", re.UNICODE)


def cloze_items(data: PreparedData, split: Split, n: int, seed: int) -> list[tuple[str, str, list[str]]]:
    """(prompt, answer, distractors) from the first sentence of held-out documents of `split`."""
    found: list[tuple[str, str]] = []
    for (s, _), test in sorted(data.test_sets.items()):
        if s != split:
            continue
        for i in range(test.tokens.shape[0]):
            text = data.tokenizer.decode(test.tokens[i, : int(test.lengths[i])].tolist(), skip_special_tokens=True)
            m = _SENTENCE.match(text)
            if m:
                found.append((m.group(1), m.group(2)))
    rng = random.Random(seed)
    rng.shuffle(found)
    items = []
    answers = [a for _, a in found]
    for prompt, answer in found[:n]:
        pool = [a for a in answers if a.lower() != answer.lower()]
        if len(pool) >= 4:
            items.append((prompt, answer, rng.sample(pool, 4)))
    return items


@torch.no_grad()
def cloze_accuracy(model: GPTNeoLM, data: PreparedData, split: Split, spec: EvalSpec, runtime: Runtime
                   ) -> float | None:
    """Multiple-choice cloze accuracy (chance 0.2): does the true last word get the highest log-likelihood?"""
    items = cloze_items(data, split, spec.n_samples, spec.seed)
    if not items:
        return None
    model.eval()
    model.set_mode(MaskMode.DEFAULT)
    tok = data.tokenizer
    correct = 0
    for prompt, answer, distractors in items:
        prefix = list(data.eval_prefix) + tok.encode(prompt, add_special_tokens=False)  # conditional: <|safe|>
        conts = [tok.encode(" " + w, add_special_tokens=False) for w in [answer, *distractors]]
        seqs = [(prefix + c)[-model.spec.context - 1:] for c in conts]
        width = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), width), data.pad_id, dtype=torch.long)
        for i, q in enumerate(seqs):  # right-pad; causal attention keeps the padding out of earlier positions
            ids[i, :len(q)] = torch.tensor(q)
        ids = ids.to(runtime.device)
        with runtime.autocast():
            logits, _ = model(ids[:, :-1])  # all five candidates in one batch
        logp = torch.log_softmax(logits.float(), dim=-1)
        scores = []
        for i, (q, c) in enumerate(zip(seqs, conts, strict=True)):
            pos = torch.arange(len(q) - len(c) - 1, len(q) - 1, device=ids.device)
            scores.append(float(logp[i, pos, ids[i, pos + 1]].sum()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == 0)
    return correct / len(items)


def capability(model: GPTNeoLM, data: PreparedData, spec: EvalSpec, runtime: Runtime) -> dict[str, float]:
    if not spec.capability:
        return {}
    out: dict[str, float] = {}
    language = TARGET_LANGUAGE.get(data.corpus_name)
    if language:
        share = language_share(model, data, spec, runtime, language)
        if share is not None:
            out[f"capability/forget_{language}_share"] = share
    for split in (Split.FORGET, Split.RETAIN):
        acc = cloze_accuracy(model, data, split, spec, runtime)
        if acc is not None:
            out[f"capability/{split.value}_cloze_acc"] = acc
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The three views of one model


def evaluate_views(model: GPTNeoLM, data: PreparedData, eval_spec: EvalSpec, ablate_spec: AblateSpec | None,
                   calibrate_spec: CalibrateSpec, runtime: Runtime, with_capability: bool = True,
                   save_calibrated: Path | None = None, emit: Emit | None = None
                   ) -> dict[str, dict[str, float]]:
    """{'eval': unablated, 'eval_ablated': ..., 'eval_calibrated': ...} metrics; the model is left untouched.
    `save_calibrated`: where to write the calibrated model (the deployable one), when calibration runs.

    A clean model (strategy none) has nothing to ablate: its ablated view equals the unablated one and is not
    recomputed, but it is still calibrated, as every method is in the paper. Each phase (a view measured, the
    calibration fitted) is announced as a `phase` event before it starts: `{"type": "phase", "phase": "ablated",
    "index": 1, "count": 4}`; it carries no step, so a training run's step count stays the progress.
    """
    ablates = ablate_spec is not None and model.masking.strategy != Strategy.NONE
    calibrates = ablate_spec is not None and calibrate_spec.enabled and calibrate_spec.steps > 0
    phases = ["unablated", *(["ablated"] if ablates else []), *(["calibrating", "calibrated"] if calibrates else [])]

    def phase(name: str) -> None:
        if emit is not None:
            emit({"type": "phase", "phase": name, "index": phases.index(name), "count": len(phases)})

    def measure(m: GPTNeoLM, name: str) -> dict[str, float]:
        phase(name)
        metrics = loss_table(m, data, eval_spec, runtime)
        if with_capability:
            metrics.update(capability(m, data, eval_spec, runtime))
        return metrics

    views = {"eval": measure(model, "unablated")}
    if ablate_spec is None:
        return views
    ablated = model
    if ablates:
        ablated = copy.deepcopy(model)
        ablate(ablated, ablate_spec)
        views["eval_ablated"] = measure(ablated, "ablated")
    else:
        views["eval_ablated"] = views["eval"]
    if calibrates:
        phase("calibrating")
        calibrated = calibrate(ablated, data, calibrate_spec, runtime)
        views["eval_calibrated"] = measure(calibrated, "calibrated")
        if save_calibrated is not None and runtime.is_main:
            save_hf(calibrated, save_calibrated)
    return views


def flat_metrics(views: dict[str, dict[str, float]]) -> dict[str, float]:
    """`eval/forget/loss`-style keys for trackers."""
    return {f"{view}/{key}": value for view, metrics in views.items() for key, value in metrics.items()}
