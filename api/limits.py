"""Limits at the door: what one submission may ask of a shared machine, checked against the canonical spec (every
default filled in) before a row is written. Each problem names the field, the value, the limit and the setting
that raises it.

The bounds are settings (`SGTM_MAX_*`) with defaults sized for one large GPU: a run above them is almost always a
typo (`steps: 1e12`), and the engine would spend minutes allocating before failing. The parameter and memory
figures are estimates for a GPT-Neo block stack trained with AdamW in fp32: weights, gradients and two optimizer
moments (16 bytes a parameter) plus the activations autograd keeps (about 34 values per token, layer and width,
the figure of Korthikanti et al. 2022, without the attention-score term that fused attention does not store).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from api.config import Settings
from api.errors import Problem
from sgtm_engine.config import StageKind
from sgtm_engine.errors import NO_VALUE

#: The ledger stores seeds as signed 64-bit integers.
SEED_BOUND = 2**63

#: Spec keys bounded wherever they appear (train, attack, RMU, calibration), and their setting.
COUNTS = {"steps": "max_steps", "warmup_steps": "max_steps", "batch_size": "max_batch_size",
          "micro_batch_size": "max_batch_size"}
MODEL_SHAPE = {"n_layer": "max_n_layer", "d_model": "max_d_model", "context": "max_context"}


def limit_problems(settings: Settings, kind: StageKind, spec: dict[str, Any],
                   loc: tuple[str | int, ...]) -> list[Problem]:
    problems: list[Problem] = []
    for path, key, value in _fields(spec, loc):
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if key == "seed" and not -SEED_BOUND <= value < SEED_BOUND:
            problems.append(_problem(path, "a seed must lie in [-2^63, 2^63) (a 64-bit integer); pick a smaller "
                                           "one", value))
        elif key in COUNTS:
            problems += _over(settings, COUNTS[key], path, value)
    model = spec.get("model") if kind == StageKind.TRAIN else None
    if isinstance(model, dict):
        for key, setting in MODEL_SHAPE.items():
            if isinstance(model.get(key), int):
                problems += _over(settings, setting, loc + ("model", key), model[key])
        if not problems:
            problems += _size_problems(settings, spec, model, loc + ("model",))
    return problems


def estimated_parameters(model: dict[str, Any], vocab_size: int) -> int:
    n_layer, width, context = int(model["n_layer"]), int(model["d_model"]), int(model["context"])
    mlp = int(model.get("d_mlp") or 4 * width)
    per_block = 4 * width * width + 2 * width * mlp + 9 * width + mlp  # attention, MLP, biases and norms
    return n_layer * per_block + (vocab_size + context) * width


def estimated_memory_bytes(parameters: int, model: dict[str, Any], batch: int) -> int:
    activations = 34 * batch * int(model["context"]) * int(model["d_model"]) * int(model["n_layer"]) * 4
    return 16 * parameters + activations


def _size_problems(settings: Settings, spec: dict[str, Any], model: dict[str, Any],
                   loc: tuple[str | int, ...]) -> list[Problem]:
    data = spec.get("data") if isinstance(spec.get("data"), dict) else {}
    vocab = int(model.get("vocab_size") or (data or {}).get("vocab_size") or 50_257)
    parameters = estimated_parameters(model, vocab)
    if parameters > settings.max_parameters:
        return [_problem(loc, f"about {parameters:,} parameters, above the limit {settings.max_parameters:,} "
                              "(SGTM_MAX_PARAMETERS); shrink n_layer, d_model or vocab_size, or raise the setting",
                         model, show_value=False)]
    batch = int(spec.get("micro_batch_size") or spec.get("batch_size") or 1)
    memory = estimated_memory_bytes(parameters, model, batch)
    if memory > settings.max_memory_gb * 2**30:
        return [_problem(loc, f"needs about {memory / 2**30:.1f} GiB to train (weights, AdamW state and "
                              f"activations at batch {batch}), above the limit {settings.max_memory_gb} GiB "
                              "(SGTM_MAX_MEMORY_GB); lower micro_batch_size, context or the model size, or raise the "
                              "setting", model, show_value=False)]
    return []


def _over(settings: Settings, setting: str, path: tuple[str | int, ...], value: int) -> list[Problem]:
    limit = getattr(settings, setting)
    if value <= limit:
        return []
    return [_problem(path, f"above the limit {limit} (SGTM_{setting.upper()}); use a smaller value, or ask the "
                           "operator to raise the setting", value)]


def _fields(value: Any, loc: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield loc + (key,), str(key), item
            yield from _fields(item, loc + (key,))


def _problem(loc: tuple[str | int, ...], what: str, value: Any, *, show_value: bool = True) -> Problem:
    """Located in the request (`("body", "spec", "steps")`), worded from the body down (`spec.steps=...`)."""
    return Problem(loc, Problem.at(loc[1:], what, value if show_value else NO_VALUE).msg, value)
