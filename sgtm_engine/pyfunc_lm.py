"""The MLflow pyfunc model of an exported sgtm model: token ids in, next-token logits out.

Logged as an MLflow "model from code": MLflow keeps this file with the model and runs it when the model is loaded,
so `mlflow.pyfunc.load_model(uri)` needs torch, transformers and safetensors, not sgtm. The model itself is the
export folder (export.py) under the artifact `model`: stock GPT-Neo weights plus `output_bias.safetensors`, which is
restored here as the export's model card says (the same lines as `sgtm_engine.model.hf.restore_output_bias`, which
this file cannot import).

`predict(ids)`: ids an int64 array (batch, tokens) of at most the model's position table; returns float32 logits
(batch, tokens, vocabulary), equal to the engine's GPTNeoLM logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class CausalLMLogits(PythonModel):
    def load_context(self, context: Any) -> None:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        path = Path(context.artifacts["model"])
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        if (path / "output_bias.safetensors").exists():
            bias = load_file(str(path / "output_bias.safetensors"))["lm_head.bias"]
            self.model.lm_head.bias = torch.nn.Parameter(bias)

    # np.ndarray is a hint MLflow infers no schema from: the signature the model is logged with stays its only schema
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        ids = torch.as_tensor(np.asarray(model_input), dtype=torch.long)
        with torch.no_grad():
            return self.model(input_ids=ids).logits.float().numpy()


mlflow.models.set_model(CausalLMLogits())
