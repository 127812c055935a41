"""Stage bars as a person reads them: what each engine event shows, the line a finished or failed stage leaves,
and the headline table at the end of a run."""

from __future__ import annotations

import re

from rich.console import Console

from sgtm_engine.progress import StageBars, headline


def _bars() -> tuple[StageBars, Console]:
    console = Console(record=True, width=120, force_terminal=False)
    return StageBars(console), console


def test_a_stage_bar_follows_training_evaluation_and_the_end():
    bars, console = _bars()
    with bars:
        emit = bars.stage("train")
        emit({"type": "started", "kind": "train"})
        emit({"type": "phase", "phase": "preparing data"})
        emit({"type": "progress", "step": 10, "total": 30, "metrics": {"train/loss": 5.25, "train/lr": 0.003}})
        task = bars.progress.tasks[0]
        assert (task.completed, task.total, task.fields["info"]) == (10, 30, "loss 5.250")  # no lr: a loss only
        emit({"type": "phase", "phase": "calibrating", "index": 2, "count": 4})  # no step: training's count stays
        assert task.completed == 10 and task.fields["info"] == "calibrating the ablated model"
        emit({"type": "eval", "step": 30, "total": 30, "metrics": {"eval/retain/loss": 4.0, "eval/forget/loss": 6.0,
                                                                   "eval_ablated/retain/loss": 4.1,
                                                                   "eval_ablated/forget/loss": 7.5}})
        assert task.fields["info"] == "eval (ablated) retain 4.100 forget 7.500"
        emit({"type": "finished", "kind": "train"})
        assert task.finished
    assert re.search(r"train: done in \d+\.\d s \(eval \(ablated\) retain 4\.100 forget 7\.500\)",
                     console.export_text())


def test_the_evaluate_stage_counts_its_phases_and_unknown_events_are_ignored():
    bars, _ = _bars()
    with bars:
        emit = bars.stage("evaluate")
        emit({"type": "phase", "phase": "ablated", "index": 1, "count": 4, "step": 1, "total": 4})
        emit({"type": "from-a-newer-engine", "step": 2})
        task = bars.progress.tasks[0]
        assert (task.completed, task.total, task.fields["info"]) == (2, 4, "evaluating the ablated model")


def test_a_failed_run_marks_the_stage_that_was_running_and_only_that():
    bars, console = _bars()
    with bars:
        for name in ("train", "evaluate"):
            bars.stage(name)({"type": "started", "kind": name})
        bars.stage("train")({"type": "finished", "kind": "train"})
        bars.end_running("failed", "DataError: corpus file is corrupt")
    text = console.export_text()
    assert "evaluate: failed after" in text and "DataError: corpus file is corrupt" in text
    assert "train: failed" not in text


def test_an_interrupted_run_marks_its_running_stages_interrupted_not_failed():
    bars, console = _bars()
    with bars:
        bars.stage("train")({"type": "started", "kind": "train"})
        bars.end_running("interrupted")
        assert "interrupted" in bars.progress.tasks[0].fields["info"]
    assert "train: interrupted after" in console.export_text() and "failed" not in console.export_text()


def test_a_failed_event_stops_that_stages_bar_and_says_why():
    bars, console = _bars()
    with bars:
        bars.stage("attack")({"type": "started", "kind": "attack"})
        bars.stage("attack")({"type": "progress", "step": 3, "total": 10, "metrics": {"train/loss": 5.0}})
        bars.stage("attack")({"type": "failed", "error": "RuntimeError: out of memory"})
        task = bars.progress.tasks[0]
        assert task.fields["ended"] is not None and "failed" in task.fields["info"]
    assert re.search(r"attack: failed after \d+\.\d s \(RuntimeError: out of memory\)", console.export_text())


def test_headline_has_a_row_per_view_and_the_losses_before_capability():
    metrics = {"eval/retain/loss": 3.0, "eval/forget/loss": 3.5, "eval_calibrated/retain/loss": 3.1,
               "eval_calibrated/forget/loss": 9.0, "eval_calibrated/capability/forget_es_share": 0.0,
               "eval/capability/forget_es_share": 0.7, "train/loss": 2.0}
    console = Console(record=True, width=120)
    console.print(headline(metrics, title="run"))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if "view" in line)
    assert header.index("retain loss") < header.index("forget loss") < header.index("forget es share")
    assert "adjacent" not in header  # no view measured it
    unablated = next(line for line in lines if "unablated" in line)
    calibrated = next(line for line in lines if "calibrated" in line and "unablated" not in line)
    assert "3.000" in unablated and "0.700" in unablated and "9.000" in calibrated
    assert not any(line.startswith("│ ablated ") for line in lines)  # no metric of that view
    assert headline({"train/loss": 2.0}) is None


def test_headline_headers_wrap_in_an_80_column_terminal_instead_of_being_cut():
    names = ("retain/loss", "forget/loss", "capability/forget_cloze_acc", "capability/forget_es_share",
             "capability/retain_cloze_acc")
    metrics = {f"{view}/{name}": 0.5 for view in ("eval", "eval_ablated", "eval_calibrated") for name in names}
    console = Console(record=True, width=80)
    console.print(headline(metrics))
    text = console.export_text()
    assert "…" not in text and "cloze" in text and text.count("0.500") == 15


def test_a_full_bar_keeps_its_clock_running_until_the_stage_ends():
    """Training's bar is full at its last step while the final evaluation still runs (rich stops its own clock)."""
    bars, _ = _bars()
    now = [0.0]
    bars.progress.get_time = lambda: now[0]
    emit = bars.stage("train")
    emit({"type": "started", "kind": "train"})
    now[0] = 100.0
    emit({"type": "progress", "step": 30, "total": 30, "metrics": {}})
    task, clock = bars.progress.tasks[0], bars.progress.columns[-1]
    now[0] = 150.0
    assert task.finished and str(clock.render(task)) == "0:02:30"  # still counting
    emit({"type": "finished", "kind": "train"})
    now[0] = 500.0
    assert str(clock.render(task)) == "0:02:30"  # stopped when the stage ended


def test_a_watched_job_is_timed_from_its_start_not_from_its_time_in_the_queue():
    bars, console = _bars()
    now = [0.0]
    bars.progress.get_time = lambda: now[0]
    bars.note("ablate 1234abcd", "queued")
    now[0] = 50.0
    bars.update("ablate 1234abcd", {"type": "started", "kind": "ablate"})
    now[0] = 80.0
    bars.end("ablate 1234abcd", "succeeded")
    assert "ablate 1234abcd: done in 30.0 s" in console.export_text()
    assert str(bars.progress.columns[-1].render(bars.progress.tasks[0])) == "0:00:30"


def test_a_replayed_stage_is_timed_by_its_events_own_clock():
    """`sgtm watch` of a finished job receives all its events at once: their `t` stamps give the duration."""
    bars, console = _bars()
    bars.update("train 1234abcd", {"type": "started", "kind": "train", "t": 1000.0})
    bars.update("train 1234abcd", {"type": "finished", "kind": "train", "t": 1092.5})
    assert "train 1234abcd: done in 92.5 s" in console.export_text()
    assert str(bars.progress.columns[-1].render(bars.progress.tasks[0])) == "0:01:32"


def test_a_kept_stage_shows_a_full_bar_and_says_it_ran_before():
    bars, console = _bars()
    with bars:
        bars.stage("train")({"type": "kept", "kind": "train"})
        task = bars.progress.tasks[0]
        assert task.finished and task.fields["info"] == "kept from an earlier run"
    assert "train: kept (it finished in an earlier run of this folder)" in console.export_text()
