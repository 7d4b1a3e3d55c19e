"""The Celery application: Redis broker and backend, two queues (train, infer), settings for long jobs.

Start a worker with ``celery -A worker.celery_app worker -Q train,infer -c 1``. Tasks are
imported by the worker only (``include``): the API sends them by name and never imports torch.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_ready, worker_shutdown
from kombu import Queue

from app.core.config import Settings, get_settings

log = logging.getLogger("uplvp.worker")

FINETUNE_TASK = "uplvp.finetune"
PRETRAIN_TASK = "uplvp.pretrain"
SEGMENT_TASK = "uplvp.segment"
SEGMENT_JOB_TASK = "uplvp.segment_job"
EXPORT_TASK = "uplvp.export"
WARM_TASK = "uplvp.warm"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for these settings (the API uses it to send tasks, the worker to run them)."""
    app = Celery("uplvp", broker=settings.redis_url, backend=settings.redis_url, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        # Late ack + reject on a lost worker: a job whose worker dies is redelivered, and the task is
        # idempotent on its job id (it resumes from its last checkpoint).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker never hoards jobs another could run
        # Redis redelivers an unacked message after the visibility timeout: keep it above the longest job.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_expires=3600,
        task_track_started=True,
        task_queues=(Queue("train"), Queue("infer")),
        task_default_queue="train",
        task_routes={FINETUNE_TASK: {"queue": "train"}, PRETRAIN_TASK: {"queue": "train"},
                     SEGMENT_TASK: {"queue": "infer"}, SEGMENT_JOB_TASK: {"queue": "infer"},
                     EXPORT_TASK: {"queue": "infer"}, WARM_TASK: {"queue": "infer"}},
        task_time_limit=settings.job_time_limit_s + 300,
        task_soft_time_limit=settings.job_time_limit_s,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


celery_app = make_celery(get_settings())

_stop = threading.Event()


def _heartbeat_loop(hostname: str) -> None:
    from app.registry import from_settings
    from app.webhooks import start_dispatcher

    s = get_settings()
    registry = from_settings(s)
    start_dispatcher(registry)  # webhook events whose process died are delivered from here too
    tasks = {"finetune": FINETUNE_TASK, "pretrain": PRETRAIN_TASK}
    while not _stop.is_set():
        try:
            from worker.tasks import loaded_models, worker_device_info

            registry.heartbeat(hostname, 3 * s.heartbeat_s, {"pid_host": socket.gethostname(),
                                                             "models_loaded": loaded_models(),
                                                             "device": worker_device_info()})
            # The reaper: jobs whose worker died (their lock expired) go back to the queue.
            for job_id, kind, outcome in registry.requeue_orphans(s.max_job_attempts):
                log.warning("job %s lost its worker: %s", job_id, outcome)
                if outcome == "requeued" and kind in tasks:
                    celery_app.send_task(tasks[kind], args=[job_id], queue="train")
            for job_id in registry.fail_unstarted(s.segment_job_expiry_s):
                log.warning("async segment job %s was never started: failed (not_started)", job_id)
        except Exception as exc:  # noqa: BLE001 - Redis down for a moment: try again next period
            log.warning("heartbeat failed (%s); retrying in %s s", exc, s.heartbeat_s)
        _stop.wait(s.heartbeat_s)
    try:
        registry.drop_heartbeat(hostname)
    except Exception as exc:  # noqa: BLE001 - it expires by itself
        log.info("could not drop the heartbeat (%s); it expires in %s s", exc, 3 * s.heartbeat_s)


def send_warm(app: Celery, name: str | None = None, version: int | None = None) -> None:
    """Queue a warm-up on the infer queue (worker.tasks.warm): `name` v`version`, or every production version.
    A failure to queue only means that the model loads on its first request instead."""
    try:
        app.send_task(WARM_TASK, args=[name, version], queue="infer")
    except Exception as exc:  # noqa: BLE001 - broker down for a moment
        log.warning("could not queue the warm-up of %s: %s", f"{name} v{version}" if name else "production", exc)


@worker_init.connect
def _check_startup(**_: Any) -> None:
    """Refuse to start a worker that could only fail its jobs: one whose UPLVP_DEVICE names a GPU that is not
    here (it must not train on the CPU for hours while its user thinks it is on a GPU), or whose artifact
    store does not answer (a missing bucket or a refused credential would fail the first job, not the start).
    The exit code is 3; the message says what to change."""
    from worker.tasks import registry, worker_device

    s = get_settings()
    try:
        device = worker_device()
    except Exception as exc:  # noqa: BLE001 - DeviceError, or a CUDA driver that fails to initialise
        _refuse(f"UPLVP_DEVICE={s.device}: {exc}")
    try:
        registry().store.check()
    except OSError as exc:
        _refuse(f"UPLVP_ARTIFACTS={s.artifacts}: {exc}")
    log.info("worker device: %s; artifacts: %s", device, s.artifacts)


def _refuse(reason: str) -> None:
    import os
    import sys

    log.critical("%s. This worker does not start.", reason)
    sys.stderr.flush()
    os._exit(3)  # Celery catches SystemExit raised from a signal handler and would start anyway


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    threading.Thread(target=_heartbeat_loop, args=(hostname,), name="uplvp-heartbeat", daemon=True).start()
    if "infer" in celery_app.amqp.queues.consume_from:
        send_warm(celery_app)  # an infer worker: load every production version before the first request asks


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    _stop.set()
