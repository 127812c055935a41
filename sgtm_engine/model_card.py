"""The model card (`README.md`) of an exported model: what it is, how to load it with stock `transformers`, what it
was trained on (with the corpus's attribution) and what it measured.

Stdlib only: the card is text made from a stage's `result.json` record (or from the model's config alone when the
export starts from a bare checkpoint folder).
"""

from __future__ import annotations

import json
from typing import Any

from sgtm_engine.yamlio import dump_yaml

#: The licence of every Wikipedia-derived corpus the engine embeds or downloads; a model trained on such text is
#: derived from it, so its card carries the attribution.
WIKIPEDIA_LICENSE = "CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/)"

_LOADING = """\
```python
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}")
tokenizer = AutoTokenizer.from_pretrained("{path}")
{bias}```
"""

_BIAS = """\
# The output bias (learned, or calibrated after ablation) is in its own file; stock GPT-Neo has no slot for it:
bias = load_file("{path}/output_bias.safetensors")["lm_head.bias"]
model.lm_head.bias = torch.nn.Parameter(bias)
"""


def model_card(*, record: dict[str, Any] | None, config: dict[str, Any], has_output_bias: bool, variant: str,
               path_hint: str = "path/to/this/folder") -> str:
    """The card's Markdown.

    Args:
        record: the source stage's result record (None for a bare checkpoint folder).
        config: the exported `config.json`.
        has_output_bias: whether `output_bias.safetensors` was written.
        variant: what was exported, in words ("trained", "ablated (zero)", "ablated and calibrated", ...).
        path_hint: the folder name shown in the loading snippet.
    """
    record = record or {}
    method = record.get("method", "unknown")
    context = config.get("sgtm_context") or config["max_position_embeddings"]
    table = config["max_position_embeddings"]
    data = record.get("data") or {}
    parts = [
        f"# sgtm GPT-Neo model: {method}, {variant}",
        "",
        f"A GPT-Neo language model trained with the sgtm engine (method `{method}`; Selective GradienT Masking, "
        "arXiv 2512.05648, localizes knowledge of a forget domain into a slice of the weights that ablation removes). "
        f"{config['num_layers']} layers, width {config['hidden_size']}, {config['num_heads']} heads, vocabulary "
        f"{config['vocab_size']}, context {context} tokens.",
        "",
        "## Loading",
        "",
        "It loads with stock `transformers` (`GPTNeoForCausalLM`), with no unexpected or missing weights:",
        "",
        _LOADING.format(path=path_hint, bias=_BIAS.format(path=path_hint) if has_output_bias else ""),
    ]
    if has_output_bias:
        parts += ["Without those lines every logit is off by that per-token constant, so the next-token "
                  "distribution is not the trained (or calibrated) model's.", ""]
    parts += [
        "## Context and generation",
        "",
        f"The model was trained on sequences of {context} tokens; the tokenizer's `model_max_length` is {context}. "
        f"Its position table holds {table} rows: rows past {context - 1} repeat the last trained position, so "
        f"stock `generate` continues past the context (up to {table} tokens in all, prompt included) instead of "
        "failing on the position lookup. Text past the context is out of the training distribution and degrades; "
        f"for long generations keep the last {context} tokens as the prompt and generate in steps.",
        "",
    ]
    if record.get("resolved_spec") is not None:
        parts += ["## Spec", "", f"Stage `{record.get('kind', '?')}`, spec hash `{record.get('spec_hash', '?')}`, "
                  f"seed {record.get('seed', '?')}, code version `{record.get('code_version', '?')}`.", "",
                  "```yaml", dump_yaml(record["resolved_spec"]).rstrip(), "```", ""]
    if record.get("data_spec") is not None:
        parts += ["## Data", "", f"Corpus `{record['data_spec'].get('corpus', '?')}` "
                  f"(data manifest hash `{record.get('manifest_hash', '?')}`).", "",
                  "```yaml", dump_yaml(record["data_spec"]).rstrip(), "```", ""]
    metrics = record.get("metrics") or {}
    if metrics:
        parts += ["## Metrics", "", "From the source stage's `result.json`:", "", "| metric | value |", "|---|---|"]
        parts += [f"| `{k}` | {_number(v)} |" for k, v in sorted(metrics.items())]
        parts += [""]
    parts += ["## Licence and attribution", "", _attribution(data), ""]
    return "\n".join(parts)


def _attribution(data: dict[str, Any]) -> str:
    text = data.get("attribution")
    if text:
        return (f"The training text: {text}. A model trained on CC BY-SA text is shared under the same terms; "
                "keep this attribution with it.")
    return ("The embedded corpora are Wikipedia text (Wikipedia contributors), licensed "
            f"{WIKIPEDIA_LICENSE}; a model trained on them is shared under the same terms, with this attribution.")


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)
