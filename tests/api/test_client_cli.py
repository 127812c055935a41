"""The service's CLI as a person sees it: `sgtm watch` draws a job from its server-sent events, `sgtm jobs` keeps
ids whole in a narrow terminal, `sgtm show` and `sgtm logs`, and `sgtm serve` leaves successful reads out of its
access log. The API runs in-process (TestClient, an httpx client) on a real SQLite ledger."""

from __future__ import annotations

import logging
import logging.config
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from fastapi.testclient import TestClient
from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker

import api.client_jobs as client_jobs
from api.client_cli import QuietReads, serve_log_config
from api.config import Settings
from api.db import jobs as repo
from tests.api.test_routes import TINY


@pytest.fixture
def screen(monkeypatch: pytest.MonkeyPatch) -> Console:
    """What the client commands print, recorded (a terminal 100 columns wide)."""
    console = Console(record=True, width=100, force_terminal=False)
    monkeypatch.setattr(client_jobs, "console", console)
    monkeypatch.setattr(client_jobs, "err", console)
    return console


def _run_job(factory: sessionmaker[Session], job_id: str, *, fail: bool = False) -> None:
    """What a supervisor writes for a train job of 20 steps: claim, the engine's events, the final state."""
    with factory() as session:
        attempt = repo.claim(session, job_id=job_id, owner="test")
        assert attempt == 1
        events = [{"type": "started", "kind": "train"}, {"type": "phase", "phase": "preparing data"},
                  {"type": "progress", "step": 10, "total": 20, "metrics": {"train/loss": 5.5}},
                  {"type": "progress", "step": 20, "total": 20, "metrics": {"train/loss": 4.25}},
                  {"type": "phase", "phase": "unablated"},
                  {"type": "eval", "step": 20, "total": 20, "metrics": {"eval/retain/loss": 4.1,
                                                                        "eval/forget/loss": 4.3}}]
        if not fail:
            events.append({"type": "finished", "kind": "train"})
        repo.record_progress(session, job_id=job_id, attempt=attempt, step=20, total=20,
                             metrics={"eval/retain/loss": 4.1, "eval/forget/loss": 4.3}, events=events)
        if fail:
            repo.mark_failed(session, job_id=job_id, attempt=attempt, error_type="TrainingDiverged",
                             error_message="Traceback ...\nloss is nan at step 17", exit_code=4)
        else:
            repo.mark_succeeded(session, job_id=job_id, attempt=attempt, result={
                "summary": {"steps": 20}, "metrics": {"eval/retain/loss": 4.1, "eval/forget/loss": 4.3}})
        session.commit()


def test_watch_draws_a_job_from_its_event_stream(client: TestClient, factory: sessionmaker[Session],
                                                 screen: Console) -> None:
    job = client.post("/api/v1/jobs", json={"kind": "train", "spec": TINY}).json()
    _run_job(factory, job["id"])
    assert client_jobs.follow(client, [job["id"][:8]]) == 0  # a prefix, as `sgtm jobs` users type it
    shown = screen.export_text()
    assert f"train {job['id'][:8]}: done in" in shown and "retain 4.100 forget 4.300" in shown


def test_watch_exits_1_and_names_the_cause_of_a_failed_job(client: TestClient, factory: sessionmaker[Session],
                                                          screen: Console) -> None:
    job = client.post("/api/v1/jobs", json={"kind": "train", "spec": TINY}).json()
    _run_job(factory, job["id"], fail=True)
    assert client_jobs.follow(client, [job["id"]]) == 1
    shown = screen.export_text()
    assert "failed" in shown and "TrainingDiverged: loss is nan at step 17" in shown


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, even where the tests run as a shell's background job: that
    starts with SIGINT ignored, and `_thread.interrupt_main` then does nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_stops_only_the_watching_and_says_how_to_follow_again(client: TestClient, screen: Console,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import _thread
    import time

    job = client.post("/api/v1/jobs", json={"kind": "train", "spec": TINY}).json()  # queued: nothing runs it
    monkeypatch.setattr(client_jobs, "_follow_one", lambda *_: (time.sleep(0.1), _thread.interrupt_main()))
    with pytest.raises(KeyboardInterrupt):
        client_jobs.follow(client, [job["id"][:8]])
    shown = " ".join(screen.export_text().split())
    assert f"stopped watching; the service keeps running 1 job(s). Follow them again: sgtm watch {job['id']};" in shown
    assert client.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "queued"  # the job itself is untouched


def test_watch_of_an_unknown_job_exits_2(client: TestClient, screen: Console) -> None:
    with pytest.raises(typer.Exit) as e:
        client_jobs.follow(client, ["0123abcd"])
    assert e.value.exit_code == 2


def test_the_jobs_table_keeps_ids_whole_and_gives_up_columns_in_a_narrow_terminal(client: TestClient) -> None:
    body = {"stages": [{"name": "reference", "kind": "train", "spec": TINY},
                       {"name": "ablate", "kind": "ablate", "inputs": {"model": "reference"}}]}
    client.post("/api/v1/pipelines", json=body)
    items = client.get("/api/v1/jobs").json()["items"]
    wide = ["id", "stage", "status", "progress", "method", "created"]
    for width, columns in ((80, ["id", "stage", "status"]), (140, wide)):
        console = Console(record=True, width=width)
        console.print(client_jobs.jobs_table(items, width))
        lines = [line for line in console.export_text().splitlines() if line.strip()]
        assert all(j["id"] in "".join(lines) for j in items), lines
        assert max(len(line.rstrip()) for line in lines) <= width
        header = lines[0].split()
        assert header[:len(columns)] == columns and ("method" in header) == ("method" in columns), header
        assert "…" not in "".join(lines)  # nothing shown cut short
    narrow = Console(record=True, width=50)
    narrow.print(client_jobs.jobs_table(items, 50))
    shown = narrow.export_text()
    assert all(j["id"] in shown for j in items), shown  # the id stays whole even where nothing else fits
    assert "reference (train)" in "".join(lines)


def test_show_prints_status_metrics_workdir_and_spec(client: TestClient, factory: sessionmaker[Session],
                                                     settings: Settings, screen: Console) -> None:
    job = client.post("/api/v1/jobs", json={"kind": "train", "spec": TINY}).json()
    _run_job(factory, job["id"])
    client_jobs.show_job(client.get(f"/api/v1/jobs/{job['id']}").json(), out=screen)
    shown = screen.export_text()
    assert job["id"] in shown and "succeeded" in shown and str(settings.workdir(job["id"])) in shown
    assert "unablated" in shown and "4.100" in shown and "4.300" in shown  # the headline table
    assert '"n_layer": 2' in shown  # the spec


def test_serve_leaves_successful_reads_out_of_the_access_log() -> None:
    def line(method: str, status: int) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5", method, "/api/v1/jobs/x", "1.1", status), None)

    quiet = QuietReads()
    assert not quiet.filter(line("GET", 200)) and not quiet.filter(line("HEAD", 200))
    assert quiet.filter(line("POST", 202)) and quiet.filter(line("GET", 404)) and quiet.filter(line("GET", 500))
    config = serve_log_config()
    logging.config.dictConfig(config)  # uvicorn's own shape, so it loads; the access handler holds the filter
    access = logging.getLogger("uvicorn.access").handlers[0]
    assert any(isinstance(f, QuietReads) for f in access.filters)


def test_logs_prints_the_tail_of_the_engine_log(client: TestClient, factory: sessionmaker[Session],
                                                settings: Settings, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from api.client_cli import logs

    job = client.post("/api/v1/jobs", json={"kind": "train", "spec": TINY}).json()
    _run_job(factory, job["id"])
    folder = settings.workdir(job["id"]) / "logs"
    folder.mkdir(parents=True)
    (folder / "attempt-1.log").write_text("step 1\nstep 2\n")
    import api.client_cli as cli

    original = cli.connect
    cli.connect = lambda url, token, data_root: client  # the in-process API instead of a URL
    try:
        logs(job["id"][:8], attempt=None, tail=1024, url="", token=None, data_root=tmp_path)
    finally:
        cli.connect = original
    assert capsys.readouterr().out == "step 1\nstep 2\n"


def test_ctrl_c_while_waiting_for_a_sweep_says_the_service_keeps_running_it(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import api.client_cli as cli
    from tests.api.test_sweeps import sweep_body

    console = Console(record=True, width=100, force_terminal=False)
    monkeypatch.setattr(cli, "console", console)
    monkeypatch.setattr(cli, "err", console)

    def interrupted(_seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "time", types.SimpleNamespace(strftime=lambda *_: "12:00:00", sleep=interrupted))
    sweep = client.post("/api/v1/sweeps", json=sweep_body()).json()  # queued: nothing runs its cells
    with pytest.raises(KeyboardInterrupt):
        cli._wait_sweep(client, sweep["id"])
    shown = " ".join(console.export_text().split())
    assert f"sweep {sweep['id'][:8]}: " in shown  # it had reported the counts before
    assert (f"stopped waiting; the service keeps running sweep {sweep['id']}. Its cells: sgtm sweep-status "
            f"{sweep['id']}; stop it: sgtm sweep-cancel {sweep['id']}") in shown


def test_a_422_prints_each_problem_once_naming_its_field(client: TestClient, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    import api.client_http as client_http

    screen = Console(record=True, width=200, force_terminal=False)
    monkeypatch.setattr(client_http, "err", screen)
    client_http.explain(client.post("/api/v1/jobs", json={"knd": "train", "spec": {"steps": 1e308}}))
    client_http.explain(client.post("/api/v1/jobs", json={"spec": {}}))
    assert screen.export_text().splitlines() == [
        "422: the request is invalid:",
        "  - knd: unknown field of a job; did you mean 'kind'?",
        "422: the request is invalid:",
        "  - kind: Field required",
    ]


@pytest.mark.parametrize(("command", "flag"), [(["report", "abcdef12", "--url", "http://127.0.0.1:1"], "--out"),
                                             (["serve", "--port", "1"], "--data-root")])
def test_a_folder_option_naming_a_file_is_refused_before_anything_starts(tmp_path: Path, command: list[str],
                                                                        flag: str) -> None:
    """`sgtm report SWEEP --out notes.txt`, `sgtm serve --data-root notes.txt`: a config error naming the option (it
    was a FileExistsError traceback), the file untouched, no request made and no server started."""
    from typer.testing import CliRunner

    from api.client_cli import service_app

    (tmp_path / "notes.txt").write_text("mine\n")
    result = CliRunner().invoke(service_app, [*command, flag, str(tmp_path / "notes.txt")])
    assert result.exit_code == 2 and f"{flag}=" in result.output, result.output
    assert "a file, not a folder" in result.output and "cannot reach" not in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_the_sweep_table_leaves_the_seed_blank_for_a_sweep_without_seeds(client: TestClient, screen: Console,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import api.client_cli as cli
    from tests.api.test_sweeps import sweep_body

    monkeypatch.setattr(cli, "console", screen)

    seeded = client.post("/api/v1/sweeps", json=sweep_body(seeds=[3], grid=None)).json()
    unseeded = client.post("/api/v1/sweeps", json=sweep_body(seeds=None, grid=None, name="unseeded")).json()
    cli._print_sweep(seeded)
    rows = [line for line in screen.export_text().splitlines() if "sgtm" in line and "queued" in line]
    assert rows and all(" 3 " in row for row in rows)
    cli._print_sweep(unseeded)
    text = screen.export_text()
    assert "None" not in text and "unseeded" in text
