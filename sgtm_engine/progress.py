"""Progress bars for stages, drawn from their events: `sgtm run`, `sgtm demo` / `sgtm sweep --local` and the
service's `sgtm watch` (which reads the same events from the job's event stream) show stages the same way.

Choices made here:
- One bar per stage, under a label the caller chooses (a stage name, a job id). Its total is the stage's steps
  (training, the attack, RMU) or its evaluation phases (the evaluate stage, whose `phase` events carry a step); its
  text says what the stage does now: the phase it is in, the last loss, the last evaluation.
- Events are the engine's (`stage.py`): `started`, `resumed`, `phase`, `progress`, `eval`, `checkpoint`,
  `finished`; from whatever runs the stages, `failed` for a stage that raised (it cannot report that itself) and
  `kept` for a stage that had finished in an earlier run of the same folder. Any other type is ignored, so a newer
  engine never breaks an older display.
- When a stage finishes (or fails) one plain line is printed above the bars; off a terminal rich draws no live bars,
  so those lines are what a log file keeps.
- `headline` turns a run's results into the table a person reads at the end: retain/forget/adjacent loss and the
  capability measures of each view (unablated, ablated, calibrated).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from sgtm_engine.mlflow_keys import VIEWS, headline_columns

#: Where a stage sends its events (stage.py documents them); the engine's modules import it for annotations only.
Emit = Callable[[dict[str, Any]], None]



class StageBars:
    """Bars for stages; `bars.stage(label)` is the event callback of one stage."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), _StageClock(), console=self.console)
        self._tasks: dict[str, TaskID] = {}
        self._started: dict[str, float] = {}
        self._last: dict[str, str] = {}
        self._finished: set[str] = set()
        self._stamps: dict[str, float | None] = {}

    def __enter__(self) -> StageBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def log_handler(self) -> logging.Handler:
        """A logging handler that prints above the bars (a plain stderr handler would tear them)."""
        return RichHandler(console=self.console, show_path=False, show_time=False)

    def stage(self, label: str) -> Emit:
        return lambda event: self.update(label, event)

    def update(self, label: str, event: Mapping[str, Any]) -> None:
        """Show one event of stage `label` (its bar is made on the stage's first event)."""
        kind = event.get("type")
        if kind == "failed":
            self.end(label, "failed", str(event.get("error") or ""))
            return
        if kind == "kept":
            self.progress.update(self._bar(label), total=1, completed=1, info="kept from an earlier run",
                                 ended=self.progress.get_time(), took=0.0)
            self._finished.add(label)
            self.console.print(f"{label}: kept (it finished in an earlier run of this folder)")
            return
        task = self._bar(label)
        fields: dict[str, Any] = {}
        if isinstance(event.get("total"), int) and event["total"] > 0:
            fields["total"] = event["total"]
        if isinstance(event.get("step"), int):
            fields["completed"] = event["step"]
        info = None
        if kind == "started":  # the stage's clock starts here (a watched job may have waited in the queue)
            self._started[label] = self.progress.get_time()
            self._stamps[label] = event.get("t")
            self.progress.reset(task, total=None)
            info = f"{event.get('kind', '')} started"
        elif kind == "resumed":
            info = f"resumed at step {event.get('step')}"
        elif kind == "phase":
            info = _phase_text(event)
        elif kind == "progress":
            info = _loss_text(event.get("metrics") or {})
        elif kind == "eval":
            info = "eval " + _eval_text(event.get("metrics") or {})
        elif kind == "finished":
            total = self.progress.tasks[task].total or 1
            fields.update(total=total, completed=total)
            info = self._last.get(label) or "done"
            fields["ended"] = self.progress.get_time()
            fields["took"] = self._took(label, event)
            self._finished.add(label)
            self.console.print(f"{label}: done in {fields['took'] or self._elapsed(label):.1f} s"
                               + (f" ({escape(info)})" if info != "done" else ""))
        if info is not None:
            fields["info"] = info
            if kind in ("progress", "eval") and info.strip() not in ("", "eval"):
                self._last[label] = info
        self.progress.update(task, **fields)

    def note(self, label: str, text: str) -> None:
        """Show `text` on stage `label`'s bar (a state the stage's own events do not tell: queued, running)."""
        self._bar(label)
        self.progress.update(self._tasks[label], info=text)

    def end(self, label: str, status: str, message: str = "") -> None:
        """Stage `label` ended as `status` (succeeded, failed, cancelled, interrupted) without a `finished` event of
        its own."""
        if label in self._finished:
            return
        if status == "succeeded":
            self.update(label, {"type": "finished"})
            return
        self._bar(label)
        colour = "red" if status == "failed" else "yellow"
        self.progress.update(self._tasks[label], info=f"[{colour}]{status}[/]", ended=self.progress.get_time())
        self.console.print(f"{label}: [{colour}]{status}[/] after {self._elapsed(label):.1f} s"
                           + (f" ({escape(message)})" if message else ""))
        self._finished.add(label)

    def end_running(self, status: str, message: str = "") -> None:
        """End the stages that started and did not finish as `status` (failed, interrupted): the run stopped under
        them, and a stage that stops that way sends no event for it."""
        for label in self._started.keys() - self._finished:
            self.end(label, status, message)

    def _bar(self, label: str) -> TaskID:
        if label not in self._tasks:
            self._tasks[label] = self.progress.add_task(label, total=None, info="", ended=None, took=None)
            self._started[label] = self.progress.get_time()
        return self._tasks[label]

    def _elapsed(self, label: str) -> float:
        return self.progress.get_time() - self._started[label]

    def _took(self, label: str, finished: Mapping[str, Any]) -> float | None:
        """The stage's duration by its events' own clock (`t`), which holds when the events are replayed later
        (`sgtm watch` of a finished job); None without those stamps."""
        start, end = self._stamps.get(label), finished.get("t")
        return end - start if isinstance(start, int | float) and isinstance(end, int | float) else None


class _StageClock(ProgressColumn):
    """Time since the stage's first event, until it ends: a training bar is full at its last step while the final
    evaluation still runs, and rich's own clock stops at a full bar."""

    def render(self, task: Task) -> Text:
        start = task.start_time if task.start_time is not None else task.get_time()
        took = task.fields.get("took")
        seconds = int(took if took is not None else (task.fields.get("ended") or task.get_time()) - start)
        return Text(f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}", style="progress.elapsed")


def _phase_text(event: Mapping[str, Any]) -> str:
    phase = str(event.get("phase", ""))
    if phase in ("unablated", "ablated", "calibrated"):
        return f"evaluating the {phase} model"
    return {"calibrating": "calibrating the ablated model"}.get(phase, phase)


def _loss_text(metrics: Mapping[str, Any]) -> str:
    """The losses of a progress event: `loss 3.214` (train), `train_loss 4.1` (attack), `forget_loss 1.2 …` (RMU)."""
    parts = [f"{key.rsplit('/', 1)[-1]} {value:.3f}" for key, value in metrics.items()
             if key.endswith("loss") and isinstance(value, int | float)]
    return " ".join(parts)


def _eval_text(metrics: Mapping[str, Any]) -> str:
    """The split losses of an evaluation: of the most processed view (calibrated, else ablated, else unablated)."""
    for view in reversed(VIEWS):
        losses = {k.split("/")[1]: v for k, v in metrics.items()
                  if k.startswith(f"{view}/") and k.endswith("/loss") and isinstance(v, int | float)}
        if losses:
            return f"({VIEWS[view]}) " + " ".join(f"{split} {v:.3f}" for split, v in losses.items())
    return " ".join(f"{k.removesuffix('/loss')} {v:.3f}" for k, v in metrics.items() if isinstance(v, int | float))


# ---------------------------------------------------------------------------------------------------------------------
# The summary at the end of a run


def headline(metrics: Mapping[str, Any], title: str = "") -> Table | None:
    """A table of an evaluation's headline metrics: a row per view, the split losses and capability measures as
    columns; None when `metrics` holds no evaluation."""
    rows = {view: {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{view}/")} for view in VIEWS}
    rows = {view: values for view, values in rows.items() if values}
    if not rows:
        return None
    columns = headline_columns(n for values in rows.values() for n in values)
    # `forget_cloze_acc` as `forget cloze acc`: a header with spaces wraps in a narrow terminal instead of being cut
    table = Table("view", *(header.replace("_", " ") for header in columns.values()), title=title)
    for view, values in rows.items():
        table.add_row(VIEWS[view], *(_number(values.get(n)) for n in columns))
    return table


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "–"
