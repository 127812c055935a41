"""The training loop end to end on the embedded corpus: exact resume, DDP parity, calibration, stages, recipes."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import load_file

from sgtm_engine.config import AblateSpec, CalibrateSpec, EvalSpec, MaskMode, TrainSpec, from_dict
from sgtm_engine.data.prepare import prepare_data
from sgtm_engine.errors import EXIT_CANCELLED, Cancelled
from sgtm_engine.evaluate import calibrate, evaluate_views, loss_table
from sgtm_engine.recipe import load_recipe
from sgtm_engine.runner import run_recipe
from sgtm_engine.runtime import Runtime
from sgtm_engine.stage import run_stage
from sgtm_engine.tracking import MlflowTracker
from sgtm_engine.train import build_model, train
from tests.engine.ranks import ENV, launcher, run_stage_cli

TINY = {
    "model": {"n_layer": 2, "d_model": 64, "context": 32},
    "masking": {"forget_mlp_dim": 32, "forget_attn_heads": 4},
    "data": {"corpus": "wiki-bilingual", "vocab_size": 512, "max_docs_per_split": 60, "test_docs_per_category": 2},
    "noise": {"recall": 0.9, "retain_retain_frac": 0.25},
    "optim": {"lr": 3e-3, "warmup_steps": 3},
    "steps": 12, "batch_size": 4, "micro_batch_size": 2, "log_every": 2,
    "eval": {"max_batches": 1, "capability": False},
}
CPU = Runtime(torch.device("cpu"), "fp32")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny_data(cache):
    spec = from_dict(TrainSpec, TINY)
    return spec, prepare_data(spec.data, spec.model.context, cache, spec.noise, spec.filter)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_interrupted_and_resumed_run_is_bit_identical(tiny_data, tmp_path):
    spec, data = tiny_data
    spec = from_dict(TrainSpec, {**TINY, "checkpoint_every": 4})
    straight = train(spec, tmp_path / "a", data, CPU)
    with pytest.raises(Cancelled):
        train(spec, tmp_path / "b", data, CPU, stop_after=6)  # stop between checkpoints: resume from step 6
    resumed = train(spec, tmp_path / "b", data, CPU)
    assert resumed.state.step == straight.state.step == spec.steps
    a, b = weights(straight.checkpoint), weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.state.mode_steps == straight.state.mode_steps
    assert resumed.state.tokens == straight.state.tokens


def test_plan_modes_reach_the_model_and_clean_models_train_as_default(tiny_data, tmp_path):
    spec, data = tiny_data
    result = train(spec, tmp_path / "sgtm", data, CPU)
    modes = result.state.mode_steps
    assert modes["forget"] > 0 and modes["default"] > 0
    assert sum(modes.values()) == spec.steps
    clean = from_dict(TrainSpec, {**TINY, "masking": {"strategy": "none"}})
    result = train(clean, tmp_path / "clean", data, CPU)
    assert result.state.mode_steps == {"default": spec.steps, "retain": 0, "forget": 0}


def test_calibration_changes_only_the_output_bias(tiny_data):
    spec, data = tiny_data
    model = build_model(spec, data.vocab_size, CPU.device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrated = calibrate(model, data, CalibrateSpec(steps=5, batch_size=2), CPU)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"calibration touched the input model: {k}"
    for k, v in calibrated.state_dict().items():
        if k == "lm_head.bias":
            assert not torch.equal(v, before[k])
        else:
            assert torch.equal(v, before[k]), f"calibration changed {k}"


@pytest.mark.parametrize(("strategy", "phases"), [
    ("sgtm", ["unablated", "ablated", "calibrating", "calibrated"]),
    ("none", ["unablated", "calibrating", "calibrated"]),  # nothing to ablate: that view is not measured again
])
def test_evaluation_announces_each_phase_before_it_starts(tiny_data, strategy, phases):
    spec, data = tiny_data
    model = build_model(dataclasses.replace(spec, masking=dataclasses.replace(spec.masking, strategy=strategy)),
                        data.vocab_size, CPU.device)
    events = []
    views = evaluate_views(model, data, EvalSpec(max_batches=1, capability=False), AblateSpec(),
                           CalibrateSpec(steps=2, batch_size=2), CPU, emit=events.append)
    assert [e["phase"] for e in events] == phases and {e["type"] for e in events} == {"phase"}
    assert [e["index"] for e in events] == list(range(len(phases))) and {e["count"] for e in events} == {len(phases)}
    assert all("step" not in e for e in events)  # inside training, the step count stays the progress
    assert set(views) == {"eval", "eval_ablated", "eval_calibrated"}


def _evaluate_as_rank(rank: int, world: int, port: int, cache: Path, state: dict, out: Path) -> None:
    """One rank of `test_ranks_share_the_held_out_evaluation`: join a gloo group and evaluate the given weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        spec = from_dict(TrainSpec, TINY)
        data = prepare_data(spec.data, spec.model.context, cache, spec.noise, spec.filter)
        model, rows = _counting_model(spec, data, state)
        metrics = loss_table(model, data, EvalSpec(batch_size=1), Runtime(CPU.device, "fp32", rank, world, rank))
        (out / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "rows": rows[0]}))
    finally:
        torch.distributed.destroy_process_group()


def _counting_model(spec: TrainSpec, data, state: dict) -> tuple[torch.nn.Module, list[int]]:
    model = build_model(spec, data.vocab_size, CPU.device)
    model.load_state_dict(state)
    rows, forward = [0], model.hidden_states

    def counted(inputs: torch.Tensor) -> torch.Tensor:
        rows[0] += inputs.shape[0]
        return forward(inputs)

    model.hidden_states = counted
    return model, rows


def test_ranks_share_the_held_out_evaluation(tiny_data, tmp_path, cache):
    """Under torchrun each rank evaluates its share of every category's batches and the sums are added over ranks:
    two gloo ranks together read each held-out row once and both get the one-process metrics."""
    spec, data = tiny_data
    state = build_model(spec, data.vocab_size, CPU.device).state_dict()
    model, rows = _counting_model(spec, data, state)
    alone = loss_table(model, data, EvalSpec(batch_size=1), CPU)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_evaluate_as_rank, args=(2, port, cache, state, tmp_path), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sum(r["rows"] for r in ranks) == rows[0] == sum(t.tokens.shape[0] for t in data.test_sets.values())
    assert all(0 < r["rows"] < rows[0] for r in ranks)
    for r in ranks:
        torch.testing.assert_close(r["metrics"], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled, 2 micro-batches per rank"])
def test_two_process_gloo_ddp_matches_one_process(tiny_data, tmp_path, cache, compiled):
    """torchrun with 2 CPU ranks (gloo) at the same effective batch ends where one eager process ends; compiled too
    (DDP inside torch.compile, gradients synced once per step through the compiled wrapper)."""
    spec_data = {**TINY, "steps": 6, "micro_batch_size": 1 if compiled else None,
                 "masking": {"strategy": "sgtm", "forget_mlp_dim": 32, "forget_attn_heads": 4}}
    (tmp_path / "spec.json").write_text(json.dumps({**spec_data, "runtime": {"compile": compiled}}))
    (tmp_path / "eager.json").write_text(json.dumps(spec_data))
    args = ["run-stage", "--kind", "train", "--cache-dir", str(cache)]
    ddp = run_stage_cli([*args, "--spec", str(tmp_path / "spec.json")], tmp_path / "ddp", ranks=2)
    one = run_stage_cli([*args, "--spec", str(tmp_path / "eager.json")], tmp_path / "one")
    assert ddp["backends"]["compile"] is compiled and ddp["backends"]["world_size"] == 2
    assert ddp["summary"]["mode_steps"] == one["summary"]["mode_steps"]
    assert ddp["summary"]["tokens"] == one["summary"]["tokens"]
    a, b = weights(Path(ddp["artifacts"]["model"])), weights(Path(one["artifacts"]["model"]))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(ddp["metrics"], one["metrics"], rtol=1e-4, atol=1e-5)  # the ranks' shared evaluation


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2], ids=["one process", "torchrun, 2 ranks"])
def test_run_stage_stops_with_a_checkpoint_when_its_stdin_lifeline_closes(tmp_path, cache, ranks):
    """The supervisor's death closes the child's stdin; the stage stops as on SIGTERM (Cancelled, exit code 5) at a
    step boundary, with a checkpoint to resume from. torchrun's ranks inherit stdin and stop together."""
    (tmp_path / "spec.json").write_text(json.dumps({**TINY, "steps": 100_000, "checkpoint_every": 100_000}))
    proc = subprocess.Popen([*launcher(ranks), "run-stage", "--kind", "train", "--spec", str(tmp_path / "spec.json"),
                             "--workdir", str(tmp_path / "w"), "--cache-dir", str(cache), "--stdin-lifeline", "120"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    events = tmp_path / "w" / "events.jsonl"
    deadline = time.monotonic() + 240
    while not (events.exists() and '"progress"' in events.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.1)
    assert proc.stdin is not None
    proc.stdin.close()
    closed = time.monotonic()
    code = proc.wait(timeout=60)
    stderr = proc.stderr.read().decode()
    assert code == EXIT_CANCELLED if ranks == 1 else code != 0, stderr[-3000:]  # torchrun reports a failed rank as 1
    assert stderr.count("error: Cancelled: stopped at step") == ranks, stderr[-3000:]  # every rank, at a boundary
    assert time.monotonic() - closed < 60  # a step boundary, not the 120 s grace
    assert json.loads((tmp_path / "w" / "error.json").read_text())["type"] == "Cancelled"
    assert list((tmp_path / "w" / "checkpoints").iterdir())


@pytest.mark.slow
def test_stage_chain_and_result_records(tmp_path, cache):
    train_res = run_stage("train", {**TINY, "steps": 4}, tmp_path / "train", cache_dir=cache)
    for key in ("resolved_spec", "seed", "code_version", "manifest_hash", "spec_hash", "checkpoint"):
        assert train_res[key] is not None, key
    assert train_res["resolved_spec"]["model"]["vocab_size"] > 0
    backends = train_res["backends"]
    assert backends["device"] == "cpu" and backends["dtype"] == "float32" and backends["attention"] == "sdpa"
    assert backends["torch"] == torch.__version__ and backends["compile"] is False
    assert backends["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and backends["device_name"]
    assert backends["allocator"] in ("system", "jemalloc", "tcmalloc", "mimalloc")
    assert backends["python"] == platform.python_version() and backends["numpy"] == numpy.__version__
    assert backends["transformers"] == transformers.__version__ and backends["tokenizers"] == tokenizers.__version__
    ablated = run_stage("ablate", {"ablate": {"kind": "zero"}}, tmp_path / "ablate",
                        inputs={"model": tmp_path / "train"}, cache_dir=cache)
    ev = run_stage("evaluate", {"calibrate": {"steps": 3, "batch_size": 2}, "eval": {"max_batches": 1,
                                                                                     "n_samples": 4}},
                   tmp_path / "eval", inputs={"model": tmp_path / "ablate"}, cache_dir=cache)
    assert ablated["manifest_hash"] == train_res["manifest_hash"] == ev["manifest_hash"]
    assert {"eval/retain/loss", "eval_ablated/forget/loss", "eval_calibrated/forget/loss"} <= set(ev["metrics"])
    events = [json.loads(line) for line in (tmp_path / "train" / "events.jsonl").read_text().splitlines()]
    assert events[0]["type"] == "started" and events[-1]["type"] == "finished"
    assert any(e["type"] == "progress" for e in events)
    evaluation = [json.loads(line) for line in (tmp_path / "eval" / "events.jsonl").read_text().splitlines()]
    phases = [(e["phase"], e.get("step"), e.get("total")) for e in evaluation if e["type"] == "phase"]
    assert phases == [("preparing data", None, None), ("unablated", 0, 4), ("ablated", 1, 4), ("calibrating", 2, 4),
                      ("calibrated", 3, 4)]
    assert [(e["step"], e["total"]) for e in evaluation if e["type"] == "eval"] == [(4, 4)]


@pytest.mark.slow
def test_recipe_runs_with_nested_mlflow_runs(tmp_path, cache):
    recipe = load_recipe({"name": "t", "experiment": "tiny-runs", "stages": [
        {"name": "train", "kind": "train", "spec": {**TINY, "steps": 4}},
        {"name": "eval", "kind": "evaluate", "inputs": {"model": "train"},
         "spec": {"calibrate": {"steps": 2, "batch_size": 2}, "eval": {"max_batches": 1, "capability": False}}}]},
        overrides={"train.steps": 3})
    out = run_recipe(recipe, tmp_path / "run", cache_dir=cache)
    assert out["stages"]["train"]["summary"]["steps"] == 3
    from mlflow.tracking import MlflowClient

    client = MlflowClient(out["mlflow_uri"])
    assert client.get_experiment_by_name("t") is None  # the recipe names its experiment, as it does for the API
    runs = client.search_runs([client.get_experiment_by_name("tiny-runs").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    train_run = next(r for r in children if r.data.tags["sgtm.stage"] == "train")
    history = client.get_metric_history(train_run.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 3]
    backends = out["stages"]["train"]["backends"]
    assert {f"sgtm.{k}": str(v) for k, v in backends.items()}.items() <= train_run.data.tags.items()


def test_mlflow_tracker_batches_and_sanitizes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    t = MlflowTracker(uri, experiment="x", flush_every=1000)
    t.log_metrics({"eval/forget/Geografía, historia/loss": 1.5}, step=3)
    t.close()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(t.run_id)
    assert run.data.metrics == {"eval/forget/Geografia_ historia/loss": 1.5}
    assert run.info.status == "FINISHED"


def test_mlflow_tracker_writes_from_its_own_thread_in_order_and_survives_store_errors(tmp_path):
    import threading

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    t = MlflowTracker(uri, experiment="x", flush_every=1, retries=1)
    writers, real_log_batch = [], t.client.log_batch

    def recording_log_batch(*args, **kwargs):
        writers.append(threading.current_thread().name)
        return real_log_batch(*args, **kwargs)

    t.client.log_batch = recording_log_batch
    t.log_params({"lr": 1})
    t.log_params({"lr": 2})  # MLflow params are immutable: the store refuses this one (retried, then counted)
    for step in range(1, 6):
        t.log_metrics({"train/loss": float(step)}, step)
    t.close()
    assert t.failed_calls == 1
    assert writers and all(name.startswith("mlflow-") for name in writers)
    assert threading.current_thread().name not in writers
    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(t.run_id, "train/loss")] == [1.0, 2.0, 3.0, 4.0, 5.0]
    run = client.get_run(t.run_id)
    assert run.data.params == {"lr": "1"} and run.info.status == "FINISHED"


def test_export_loads_in_stock_transformers(tmp_path, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgtm_engine.export import export_model

    run_stage("train", {**TINY, "steps": 2}, tmp_path / "train", cache_dir=cache)
    out = export_model(tmp_path / "train", tmp_path / "export", ablate="zero")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Hola mundo", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == len(tok)


@pytest.mark.slow
def test_cli_reports_config_errors_with_exit_code(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"steps": 0, "masking": {"strategy": "nope"}}))
    proc = subprocess.run([sys.executable, "-m", "sgtm_engine", "run-stage", "--kind", "train", "--spec",
                           str(tmp_path / "bad.json"), "--workdir", str(tmp_path / "w")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "steps=0" in proc.stderr and "masking.strategy='nope'" in proc.stderr
    err = json.loads((tmp_path / "w" / "error.json").read_text())
    assert err["type"] == "ConfigError" and len(err["problems"]) == 2
    shutil.rmtree(tmp_path / "w")


def test_sgtm_run_refuses_a_misspelt_corpus_before_any_stage_starts(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sgtm_engine.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "wiki-bilingual-sgtm", "--set", "train.data.corpus=wiki-bilngual",
                                      "--no-track"])
    assert result.exit_code == 2
    assert "train.data.corpus='wiki-bilngual': unknown corpus; did you mean 'wiki-bilingual'?" in result.output
    assert not (tmp_path / "runs").exists()  # nothing ran, no folder made


def test_retain_mode_steps_train_the_retain_slice_only(tiny_data):
    """A sanity check on the loop's pieces: a retain step leaves the forget slice bit-identical."""
    spec, data = tiny_data
    model = build_model(spec, data.vocab_size, CPU.device)
    from sgtm_engine.model.optim import build_optimizer
    from sgtm_engine.train import _train_step

    opt = build_optimizer(model, model.partition, spec.optim, spec.masking.optimizer)
    rows = next(iter(data.pools.values())).examples[:4]
    inputs, labels = data.inputs_and_labels(rows)
    r = spec.model.mlp_dim - 32
    before = model.transformer.h[0].mlp.c_fc.weight[r:].clone()
    _train_step(model, model, opt, inputs, labels, MaskMode.RETAIN, spec, CPU)
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight[r:], before)


def test_batched_cloze_scores_equal_one_by_one_scoring(cache):
    """The cloze scores all five candidates in one padded batch; padding must not change any candidate's score."""
    from sgtm_engine.config import EvalSpec, Split
    from sgtm_engine.evaluate import cloze_accuracy, cloze_items

    spec = from_dict(TrainSpec, {**TINY, "model": {**TINY["model"], "context": 128},
                                 "data": {**TINY["data"], "test_docs_per_category": 4}})
    data = prepare_data(spec.data, spec.model.context, cache, spec.noise, spec.filter)
    model = build_model(spec, data.vocab_size, CPU.device).eval()
    eval_spec = EvalSpec(n_samples=6)
    items = cloze_items(data, Split.RETAIN, eval_spec.n_samples, eval_spec.seed)
    assert len(items) >= 3
    tok = data.tokenizer
    correct = 0
    for prompt, answer, distractors in items:
        scores = []
        for word in [answer, *distractors]:
            prefix, cont = tok.encode(prompt), tok.encode(" " + word)
            ids = torch.tensor([(prefix + cont)[-spec.model.context - 1:]])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[:, :-1])[0][0], -1)
            n = len(cont)
            scores.append(float(logp[-n:].gather(1, ids[0, -n:, None]).sum()))
        correct += int(max(range(5), key=scores.__getitem__) == 0)
    assert cloze_accuracy(model, data, Split.RETAIN, eval_spec, CPU) == pytest.approx(correct / len(items))
