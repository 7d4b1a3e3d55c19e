"""Celery settings for hour-long jobs (late ack, reject on lost worker, prefetch 1, visibility timeout)."""

from __future__ import annotations

from app.core.config import Settings
from worker.celery_app import FINETUNE_TASK, SEGMENT_TASK, make_celery


def test_long_job_settings() -> None:
    s = Settings(redis_url="redis://127.0.0.1:6399/0", job_time_limit_s=7200)
    conf = make_celery(s).conf
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > s.job_time_limit_s
    assert conf.task_soft_time_limit == 7200 and conf.task_time_limit > conf.task_soft_time_limit
    assert {q.name for q in conf.task_queues} == {"train", "infer"}
    assert conf.task_routes[FINETUNE_TASK]["queue"] == "train" and conf.task_routes[SEGMENT_TASK]["queue"] == "infer"
    assert conf.broker_url == s.redis_url and not conf.task_always_eager
