"""The Celery app: Redis broker, the reliability settings of docs/architecture.md, queues per device kind, beat.

    celery -A workers.celery_app worker            # consumes SGTM_WORKER_QUEUES (default gpu,cpu), one job at a time
    celery -A workers.celery_app worker -B --max-tasks-per-child 1000   # with SGTM_WORKER_QUEUES=control: beat + reaper

Celery is only the doorbell: no result backend is read, a message is a job id, and duplicates are absorbed by the
claim. Module import reads settings but connects to nothing.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from api.config import Settings
from api.queue import CONTROL_QUEUE, REAP_TASK

settings = Settings()
settings.data_root.mkdir(parents=True, exist_ok=True)  # beat writes its schedule file there

app = Celery("sgtm", broker=settings.broker_url, include=["workers.tasks"])
app.conf.update(
    # A job is acknowledged only when its supervisor returns, and re-queued if the worker process dies mid-job.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # One job at a time, one process per GPU: no prefetching a second long job behind the first. Every job's
    # engine runs in a fresh child process (fresh memory, no leaked CUDA handles); the supervising pool process
    # never imports torch and is kept across messages, so a backlog of stale messages (cancelled jobs,
    # duplicates) is acked in milliseconds each instead of paying a process start per message.
    worker_prefetch_multiplier=1,
    worker_max_tasks_per_child=100,
    worker_concurrency=1,
    # Redis redelivers unacknowledged messages after the visibility timeout: keep it above the longest job. A
    # redelivery that still happens is a logged no-op (the claim), and lost work is the reaper's job, not Redis'.
    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    task_ignore_result=True,
    task_track_started=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    # A Redis blip must not abort a supervised job (it would be redelivered and then skipped as a duplicate).
    worker_cancel_long_running_tasks_on_connection_loss=False,
    task_queues=[Queue(settings.queue_name(q)) for q in settings.worker_queues],
    task_default_queue=settings.queue_name(settings.default_queue),
    task_routes={REAP_TASK: {"queue": settings.queue_name(CONTROL_QUEUE)}},
    beat_schedule={
        "reap-stale-jobs": {
            "task": REAP_TASK,
            "schedule": settings.reap_interval_s,
            # an unconsumed reap is worthless after the next one is due: let it expire instead of piling up
            "options": {"expires": settings.reap_interval_s, "queue": settings.queue_name(CONTROL_QUEUE)},
        },
    },
    worker_hijack_root_logger=False,
    # beat's schedule state lives with the service's data, not in the working directory
    beat_schedule_filename=str(settings.data_root / "celerybeat-schedule"),
)
