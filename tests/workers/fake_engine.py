"""A stand-in for `python -m sgtm_engine run-stage` that honours the child contract (the seam the supervisor is
tested against): it parses the same flags, appends events to events.jsonl, checkpoints, resumes from a checkpoint,
stops on SIGTERM at a step boundary with exit code 5, stops the same way when its stdin lifeline closes (exiting
after the grace period if no boundary comes), and writes result.json.

Behaviour comes from the spec's `fake` mapping: steps, sleep (s per step), exit_code (at the end instead of 0),
crash_at (step at which to SIGKILL itself, first attempt only), hang_at (step after which it sleeps an hour),
ignore_sigterm, checkpoint_every, no_result, dump_env (write the environment it was given to env.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from sgtm_engine.lifeline import watch_stdin

stop = False


def on_term(_signum, _frame):
    global stop
    stop = True


def orphaned(grace_s: float) -> None:
    global stop
    stop = True
    time.sleep(grace_s)
    os._exit(5)


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run-stage")
    run.add_argument("--kind", required=True)
    run.add_argument("--spec", required=True)
    run.add_argument("--workdir", required=True)
    run.add_argument("--input", action="append", default=[])
    run.add_argument("--mlflow-uri")
    run.add_argument("--mlflow-run-id")
    run.add_argument("--cache-dir")
    run.add_argument("--stdin-lifeline", type=float)
    args = parser.parse_args()
    if args.stdin_lifeline is not None:
        watch_stdin(lambda: orphaned(args.stdin_lifeline))

    workdir = Path(args.workdir)
    spec = json.loads(Path(args.spec).read_text())
    fake = spec.get("fake", {})
    steps = int(fake.get("steps", 5))
    every = int(fake.get("checkpoint_every", 2))
    ckdir = workdir / "checkpoints"
    ckdir.mkdir(exist_ok=True)
    if fake.get("dump_env"):
        (workdir / "env.json").write_text(json.dumps(dict(os.environ)))
    attempts = sorted(workdir.glob("argv-*.json"))
    attempt = len(attempts) + 1
    (workdir / f"argv-{attempt}.json").write_text(json.dumps(sys.argv[1:]))
    if fake.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_term)

    start = max((int(p.stem.split("-")[1]) for p in ckdir.glob("step-*.ck")), default=0)
    events = (workdir / "events.jsonl").open("a")

    def emit(**event):
        event["t"] = time.time()
        events.write(json.dumps(event) + "\n")
        events.flush()

    emit(type="started", step=start, total=steps, metrics={"resumed_from": start})
    for step in range(start + 1, steps + 1):
        time.sleep(float(fake.get("sleep", 0.01)))
        emit(type="progress", step=step, total=steps, metrics={"train/loss": 1.0 / step})
        if fake.get("hang_at") == step:  # a phase without step boundaries (data preparation, a long evaluation)
            time.sleep(3600)
        if fake.get("crash_at") == step and attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if step % every == 0 or step == steps:
            path = ckdir / f"step-{step}.ck"
            path.write_text(str(step))
            emit(type="checkpoint", step=step, total=steps, path=str(path),
                 sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        if stop:
            path = ckdir / f"step-{step}.ck"
            path.write_text(str(step))
            return 5
    code = int(fake.get("exit_code", 0))
    if code:
        print(f"fake engine failing with {code}", file=sys.stderr)
        if fake.get("error_json"):
            (workdir / "error.json").write_text(json.dumps({"type": "ConfigError", "message": "steps=0: must be >= 1",
                                                           "problems": ["steps=0: must be >= 1", "lr=-1: > 0"]}))
        return code
    emit(type="finished", step=steps, total=steps, metrics={"train/loss": 1.0 / steps, **fake.get("final_metrics", {})})
    if not fake.get("no_result"):
        final = ckdir / f"step-{steps}.ck"
        result = {"kind": args.kind, "summary": {"steps": steps, "resumed_from": start, "inputs": args.input},
                  "metrics": {"train/loss": 1.0 / steps, **fake.get("final_metrics", {})}, "artifacts": {},
                  "checkpoint": {"path": str(final), "sha256": hashlib.sha256(final.read_bytes()).hexdigest()},
                  "resolved_spec": spec, "code_version": "fake", "manifest_hash": "m0"}
        (workdir / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
