"""A stage's model in MLflow: an MLflow model (pyfunc flavor, pyfunc_lm.py) of its export, linked to the stage's
run and, when the spec says `register`, a new version of a registered model.

Choices made here:
- The packaged model is the export (export.py), the folder a `transformers` user loads as is, so the MLflow model
  and `sgtm export` are the same files; the optimizer state of a training checkpoint is not uploaded.
- Through `MlflowClient` with explicit ids (MLflow 3's logged-model calls: create, upload, finalize), never the
  fluent API's active run.
- The signature is fixed (int64 token ids -> float32 logits), so MLflow neither infers it by running the model nor
  guesses the pip requirements by loading it in a subprocess.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PYFUNC_SCRIPT = Path(__file__).with_name("pyfunc_lm.py")
REQUIREMENTS = ("torch", "transformers", "safetensors", "numpy")


def _signature(vocab_size: int) -> Any:
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype("int64"), (-1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, vocab_size))]))


def save_pyfunc(export_dir: Path, dest: Path) -> Path:
    """Write the MLflow model of an export folder to `dest` (which must not exist)."""
    import json

    import mlflow

    vocab = json.loads((export_dir / "config.json").read_text())["vocab_size"]
    # The signature says it all: an input example would make MLflow run the model
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        mlflow.pyfunc.save_model(path=str(dest), python_model=str(PYFUNC_SCRIPT),
                                 artifacts={"model": str(export_dir)}, signature=_signature(vocab),
                                 pip_requirements=list(REQUIREMENTS))
    return dest


def log_model(client: Any, run_id: str, name: str, write_export: Callable[[Path], Path],
              registered_name: str | None = None) -> str:
    """Export (`write_export(folder)`), package and upload a model linked to `run_id`; register it as a new version of
    `registered_name` when given. Returns the model's URI (`models:/<model id>`)."""
    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="sgtm-model-") as tmp:
            export_dir = write_export(Path(tmp) / "export")
            client.log_model_artifacts(model.model_id, str(save_pyfunc(export_dir, Path(tmp) / "mlflow_model")))
        client.finalize_logged_model(model.model_id, "READY")
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    uri = f"models:/{model.model_id}"
    if registered_name:
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(registered_name)
        except MlflowException as exc:  # it exists: add a version
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # the source is where the files are: a `models:/` URI would be resolved against the process-global
        # tracking URI, which this client does not set
        version = client.create_model_version(registered_name, source=model.artifact_location, run_id=run_id,
                                              model_id=model.model_id)
        log.info("registered %s as %s version %s", uri, registered_name, version.version)
    return uri
