"""The job and model registry on Redis (shared by the API and the worker; no torch, no FastAPI).

Keys (prefix ``uplvp:``):

- ``job:{id}`` hash: the job record (scalar fields as strings, structured ones as JSON).
- ``jobs`` zset (id -> created time) and ``jobs:name:{name}`` zset: listing and paging.
- ``jobs:active`` set: queued or running jobs (for "version in use" checks).
- ``job:{id}:lock`` string with expiry: the run lock; only its holder trains the job.
- ``models`` zset (name -> created time); ``model:{name}:versions`` zset (version -> created time);
  ``model:{name}:v:{n}`` hash: one version; ``model:{name}:aliases`` hash (alias -> version);
  ``model:{name}:seq`` counter for version numbers.
- ``worker:{hostname}`` string with expiry: worker heartbeats (readiness).
- ``webhooks:due`` zset (delivery id -> when due) and ``webhook:{delivery id}`` hash: the webhook outbox
  (app/webhooks.py).

State changes that race (start vs cancel) are Lua scripts, so they are atomic in Redis.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from datetime import UTC, datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from app.core.config import Settings
from app.storage import ArtifactError, ArtifactStore, LocalStore, build_store

log = logging.getLogger("uplvp.registry")

P = "uplvp:"
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
STAGES = ("validating", "teaching", "proposing", "pretraining", "finetuning", "evaluating", "exporting")
_JSON_FIELDS = ("params", "losses", "error", "result", "dataset", "output", "webhook", "device")
JOB_KINDS = ("finetune", "pretrain", "segment")

_START = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return 'missing' end
if s == 'queued' then
  if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
    redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1], 'updated_at', ARGV[1])
    redis.call('SREM', KEYS[2], ARGV[2])
    return 'cancelled'
  end
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1], 'updated_at', ARGV[1], 'stage', 'validating')
  return 'started'
end
return s
"""

_CANCEL = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return 'missing' end
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'cancel_requested', '1', 'finished_at', ARGV[1], 'updated_at', ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[2])
  return 'cancelled_now'
end
if s == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[1])
  return 'requested'
end
return s
"""

# A running job whose run lock is gone lost its worker (a live run refreshes the lock every ttl/5
# from a keep-alive thread): put it back in the queue, or fail it after too many attempts.
_REQUEUE_ORPHAN = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 'not_running' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'alive' end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if attempts >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_at', ARGV[1], 'updated_at', ARGV[1], 'error', ARGV[3])
  redis.call('SREM', KEYS[3], ARGV[4])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'updated_at', ARGV[1])
return 'requeued'
"""

# A queued job whose message expired before any worker started it will never run: fail it.
_FAIL_UNSTARTED = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 'not_queued' end
redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_at', ARGV[1], 'updated_at', ARGV[1], 'error', ARGV[2])
redis.call('SREM', KEYS[2], ARGV[3])
return 'failed'
"""

_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


ISO_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # the registry's timestamps (created_at, updated_at, ...)


def now_iso() -> str:
    """UTC timestamp, ISO 8601 with a Z."""
    return datetime.now(UTC).strftime(ISO_FORMAT)


def _dump(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"))


class NotFound(KeyError):
    """A job, model or version that does not exist (the message says which)."""


class Conflict(RuntimeError):
    """An operation the current state forbids (the message says why)."""


def from_settings(settings: Settings) -> Registry:
    """The registry these settings describe (Redis client + artifact store)."""
    from app.webhooks import Notifier

    return Registry(connect(settings.redis_url), settings.data_dir,
                    build_store(settings.artifacts, settings.data_dir, settings.s3_endpoint_url),
                    on_finish=Notifier(settings))


def connect(url: str) -> redis.Redis:
    """A Redis client that decodes strings and rides out a Redis restart.

    Every command (scripts and pipelines too) is retried on connection errors and timeouts with
    exponential backoff, about 20 s in all: a restarted Redis (append-only file) is back long
    before that, so training steps, job updates and API requests wait instead of failing.
    """
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5, socket_timeout=30,
                                health_check_interval=30,
                                retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=25))


class Registry:
    """Jobs and model versions in Redis; artifacts on the shared filesystem under `data_dir`."""

    def __init__(self, client: redis.Redis, data_dir: str | Path, store: ArtifactStore | None = None,
                 on_finish: Callable[[Registry, dict[str, Any]], Any] | None = None) -> None:
        self.r = client
        # called with the job's record whenever a job reaches a terminal state, wherever that happens
        # (a worker, the API's cancel of a queued job, the orphan sweep): the webhooks (app/webhooks.py)
        self.on_finish = on_finish
        self.data_dir = Path(data_dir)
        self.store: ArtifactStore = store or LocalStore(self.data_dir)
        self._start = client.register_script(_START)
        self._cancel = client.register_script(_CANCEL)
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)
        self._requeue_orphan = client.register_script(_REQUEUE_ORPHAN)
        self._fail_unstarted = client.register_script(_FAIL_UNSTARTED)

    # ------------------------------------------------------------------ jobs

    @staticmethod
    def new_job_id() -> str:
        """A fresh job id (also the Celery task id)."""
        return uuid.uuid4().hex

    def job_dir(self, job_id: str) -> Path:
        """The job's work dir (dataset, split, checkpoints); deleted when the job ends."""
        return self.data_dir / "jobs" / job_id

    # ------------------------------------------------------------------ job files in the store
    # With a remote store (S3Store) the store is the truth for what a job needs, and a host's work dir is a
    # cache: the API puts the uploaded zips there, the training worker puts the resume checkpoint there
    # (JOB_CHECKPOINT), and a worker on any host rebuilds the work dir from them (worker.tasks.job_files).

    JOB_CHECKPOINT = "checkpoint.pt"  # the fine-tuning's resume checkpoint, at jobs/<id>/checkpoint.pt
    # Every file that lets another host resume a job where it stopped, by its store name, with its path under
    # the job's work dir (as models.pipeline lays a run out in run/): the fine-tuning's resume checkpoint and a
    # UPLVP job's stages before it (the `self` engine's teacher, the pseudo masks, the pre-training's checkpoint),
    # so that a job whose host dies after its proposals does not propose again elsewhere.
    JOB_RESUME_FILES: ClassVar[dict[str, str]] = {
        JOB_CHECKPOINT: "run/checkpoint.pt",
        "teacher_checkpoint.pt": "run/teacher/checkpoint.pt",
        "teacher.pt": "run/teacher/model.pt",
        "pseudo.json": "run/pretrain/pseudo.json",
        "pretrain.pt": "run/pretrain/pretrain.pt",
    }

    @property
    def remote_store(self) -> bool:
        """Whether the store is somewhere else than this host's data dir (job files then go through it)."""
        return not isinstance(self.store, LocalStore)

    @staticmethod
    def job_key(job_id: str, name: str) -> str:
        """The store key of one of a job's files."""
        return f"jobs/{job_id}/{name}"

    def put_job_file(self, job_id: str, src: Path, name: str) -> dict[str, Any]:
        """Store one of a job's files (a remote store only); returns {key, sha256, size_bytes}."""
        stored = self.store.put(Path(src), self.job_key(job_id, name))
        return {"key": stored.key, "sha256": stored.sha256, "size_bytes": stored.size_bytes}

    def delete_job_files(self, job: dict[str, Any]) -> None:
        """Remove a finished job's files from a remote store: its uploads and its resume files."""
        if not self.remote_store:
            return
        uploads = (job.get("dataset") or {}).get("uploads") or {}
        for key in [u["key"] for u in uploads.values()] + [self.job_key(job["id"], n) for n in self.JOB_RESUME_FILES]:
            self.store.delete(key)

    def create_job(self, job_id: str, name: str, params: dict[str, Any], dataset: dict[str, Any],
                   base: str | None, kind: str = "finetune", owner: str = "",
                   webhook_url: str | None = None) -> dict[str, Any]:
        """Record a queued job of `kind` (finetune, pretrain or segment) submitted by `owner` (a key id);
        `webhook_url` is called when it ends (app/webhooks.py)."""
        assert kind in JOB_KINDS, kind
        ts, score = now_iso(), time.time()
        record = {"id": job_id, "kind": kind, "owner": owner, "name": name, "state": "queued", "stage": "", "progress": "0", "epoch": "0",
                  "epochs": str(params.get("epochs", 0)), "step": "0", "steps_per_epoch": "0",
                  "created_at": ts, "updated_at": ts, "cancel_requested": "0", "base": base or "",
                  "params": _dump(params), "dataset": _dump(dataset), "attempts": "0",
                  "webhook_url": webhook_url or ""}
        pipe = self.r.pipeline()
        pipe.hset(f"{P}job:{job_id}", mapping=record)
        pipe.zadd(f"{P}jobs", {job_id: score})
        pipe.zadd(f"{P}jobs:name:{name}", {job_id: score})
        pipe.sadd(f"{P}jobs:active", job_id)
        pipe.execute()
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> dict[str, Any]:
        """The job record with JSON fields decoded; NotFound for an unknown id."""
        raw = self.r.hgetall(f"{P}job:{job_id}")
        if not raw:
            raise NotFound(f"job {job_id!r} not found")
        return self._decode_job(raw)

    @staticmethod
    def _decode_job(raw: dict[str, str]) -> dict[str, Any]:
        job: dict[str, Any] = dict(raw)
        for k in _JSON_FIELDS:
            job[k] = json.loads(raw[k]) if raw.get(k) else None
        for k in ("epoch", "epochs", "step", "steps_per_epoch", "attempts"):
            job[k] = int(raw.get(k) or 0)
        job["progress"] = float(raw.get("progress") or 0)
        job["eta_s"] = float(raw["eta_s"]) if raw.get("eta_s") else None
        job["cancel_requested"] = raw.get("cancel_requested") == "1"
        job["stage"] = raw.get("stage") or None
        job["base"] = raw.get("base") or None
        job["kind"] = raw.get("kind") or "finetune"
        job["webhook_url"] = raw.get("webhook_url") or None
        return job

    def list_jobs(self, state: str | None = None, name: str | None = None, offset: int = 0,
                  limit: int = 50) -> tuple[list[dict[str, Any]], int]:
        """Newest first, filtered by state and/or name; returns (page, total matching)."""
        index = f"{P}jobs:name:{name}" if name else f"{P}jobs"
        ids = self.r.zrevrange(index, 0, -1)
        if state is None:
            total = len(ids)
            page_ids = ids[offset: offset + limit]
            pipe = self.r.pipeline()
            for i in page_ids:
                pipe.hgetall(f"{P}job:{i}")
            return [self._decode_job(raw) for raw in pipe.execute() if raw], total
        matched: list[dict[str, Any]] = []
        for start in range(0, len(ids), 200):
            pipe = self.r.pipeline()
            for i in ids[start: start + 200]:
                pipe.hget(f"{P}job:{i}", "state")
            matched.extend(i for i, s in zip(ids[start: start + 200], pipe.execute()) if s == state)
        pipe = self.r.pipeline()
        for i in matched[offset: offset + limit]:
            pipe.hgetall(f"{P}job:{i}")
        return [self._decode_job(raw) for raw in pipe.execute() if raw], len(matched)

    def append_history(self, job_id: str, entry: dict[str, Any]) -> None:
        """One epoch's summary ({stage, epoch, loss, ...}) for the job's learning curve."""
        self.r.rpush(f"{P}job:{job_id}:history", _dump(entry))

    def history(self, job_id: str) -> list[dict[str, Any]]:
        """The job's epoch summaries, oldest first."""
        return [json.loads(e) for e in self.r.lrange(f"{P}job:{job_id}:history", 0, -1)]

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Set fields of a job (dicts/lists stored as JSON) and bump updated_at."""
        mapping = {k: (_dump(v) if k in _JSON_FIELDS else ("" if v is None else str(v))) for k, v in fields.items()}
        mapping["updated_at"] = now_iso()
        self.r.hset(f"{P}job:{job_id}", mapping=mapping)

    def start_job(self, job_id: str) -> str:
        """Atomically queued -> running. Returns 'started', 'cancelled' (was cancelled while queued),
        'missing', or the current state when it was not queued ('running' = a redelivery)."""
        res = self._start(keys=[f"{P}job:{job_id}", f"{P}jobs:active"], args=[now_iso(), job_id])
        if res in ("started", "running"):
            self.r.hincrby(f"{P}job:{job_id}", "attempts", 1)
        return str(res)

    def request_cancel(self, job_id: str) -> str:
        """'cancelled_now' (was queued), 'requested' (running: stops within one step), or the terminal state."""
        res = str(self._cancel(keys=[f"{P}job:{job_id}", f"{P}jobs:active"], args=[now_iso(), job_id]))
        if res == "missing":
            raise NotFound(f"job {job_id!r} not found")
        if res == "cancelled_now":
            self._finished(job_id)
        return res

    def cancel_requested(self, job_id: str) -> bool:
        """The cooperative cancel flag (checked every training step)."""
        return self.r.hget(f"{P}job:{job_id}", "cancel_requested") == "1"

    def finish_job(self, job_id: str, state: str, error: dict[str, Any] | None = None,
                   result: dict[str, Any] | None = None, output: dict[str, Any] | None = None) -> None:
        """Move a job to a terminal state (`output`: an async segment job's instances)."""
        assert state in TERMINAL, state
        fields: dict[str, Any] = {"state": state, "finished_at": now_iso(), "eta_s": ""}
        if error is not None:
            fields["error"] = error
        if result is not None:
            fields["result"] = result
        if output is not None:
            fields["output"] = output
        if state == "succeeded":
            fields["progress"] = 1.0
        self.update_job(job_id, **fields)
        self.r.srem(f"{P}jobs:active", job_id)
        self._finished(job_id)

    def _finished(self, job_id: str) -> None:
        """After every terminal transition (a worker's end, a cancel while queued, the reaper's failures): the
        job's files leave a remote store here, whoever ended the job (a job failed by the reaper after its
        host died had left its uploads and checkpoint behind), then the on_finish hook."""
        try:
            job = self.get_job(job_id)
        except NotFound:
            return
        if job.get("kind") != "segment":  # a segment job's images travel in its task, never through the store
            try:
                self.delete_job_files(job)
            except OSError as exc:  # the store is away: the objects stay, the state change stands
                log.warning("job %s: its files could not be removed from the store (%s)", job_id, exc)
        if self.on_finish is None:
            return
        try:
            self.on_finish(self, job)
        except Exception:  # a hook never breaks a state change  # noqa: BLE001
            log.exception("on_finish hook of job %s failed", job_id)

    def job_counts(self) -> dict[tuple[str, str], int]:
        """{(kind, state): number of jobs} over every job on record (GET /metrics)."""
        counts: dict[tuple[str, str], int] = {}
        ids = self.r.zrange(f"{P}jobs", 0, -1)
        for start in range(0, len(ids), 500):
            pipe = self.r.pipeline(transaction=False)
            for job_id in ids[start:start + 500]:
                pipe.hmget(f"{P}job:{job_id}", "kind", "state")
            for kind, state in pipe.execute():
                if state:
                    key = (kind or "finetune", state)
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def active_jobs(self) -> list[dict[str, Any]]:
        """Queued and running jobs."""
        out = []
        for i in self.r.smembers(f"{P}jobs:active"):
            try:
                out.append(self.get_job(i))
            except NotFound:
                self.r.srem(f"{P}jobs:active", i)
        return out

    # -- run lock: never two runs of one job at once

    def acquire_lock(self, job_id: str, ttl_s: int) -> str | None:
        """A token if this caller now holds the job's run lock, else None."""
        token = secrets.token_hex(8)
        return token if self.r.set(f"{P}job:{job_id}:lock", token, nx=True, ex=ttl_s) else None

    def refresh_lock(self, job_id: str, token: str, ttl_s: int) -> bool:
        """Extend the lock; False if it was lost (expired and taken by someone else)."""
        return bool(self._refresh(keys=[f"{P}job:{job_id}:lock"], args=[token, ttl_s]))

    def release_lock(self, job_id: str, token: str) -> None:
        """Release the lock if this token still holds it."""
        self._release(keys=[f"{P}job:{job_id}:lock"], args=[token])

    def requeue_orphans(self, max_attempts: int) -> list[tuple[str, str, str]]:
        """Running jobs whose lock expired (their worker died): back to queued, or failed after
        `max_attempts` runs (an async segment job fails at once: its images are not kept). Returns
        [(job id, kind, "requeued" | "failed")]; the caller re-sends the requeued ones' tasks. Atomic per job, so several workers may call it at once."""
        out = []
        for job_id in self.r.smembers(f"{P}jobs:active"):
            state, kind = self.r.hmget(f"{P}job:{job_id}", "state", "kind")
            if state != "running":
                continue
            if kind == "segment":  # its images travel in the task only: it cannot run again, it fails at once
                attempts, error = 0, _dump({"code": "worker_lost", "message": "the infer worker segmenting these "
                                            "images died (killed, out of memory, or the machine went away); "
                                            "send them again"})
            else:
                attempts, error = max_attempts, _dump({
                    "code": "worker_lost", "message": f"the worker running this job died {max_attempts} times "
                    "(killed, out of memory, or the machine went away); see the worker logs"})
            res = str(self._requeue_orphan(keys=[f"{P}job:{job_id}", f"{P}job:{job_id}:lock", f"{P}jobs:active"],
                                           args=[now_iso(), attempts, error, job_id]))
            if res in ("requeued", "failed"):
                out.append((job_id, kind or "finetune", res))
            if res == "failed":
                self._finished(job_id)
        return out

    def fail_unstarted(self, max_age_s: float) -> list[str]:
        """Async segment jobs still queued `max_age_s` after they were created (their message expired with
        them: it was lost with a worker killed after taking it, or no infer worker came in time): failed
        with not_started, since nothing will run them. Returns their ids. Atomic per job (a worker that
        starts one at the same moment either runs it or finds it failed)."""
        out = []
        limit = datetime.now(UTC).timestamp() - max_age_s
        for job_id in self.r.smembers(f"{P}jobs:active"):
            state, kind, created = self.r.hmget(f"{P}job:{job_id}", "state", "kind", "created_at")
            if state != "queued" or kind != "segment" or not created:
                continue
            if datetime.strptime(created, ISO_FORMAT).replace(tzinfo=UTC).timestamp() > limit:
                continue
            error = _dump({"code": "not_started", "message": f"no infer worker started this job within {max_age_s:g} s "
                           "(UPLVP_SEGMENT_JOB_EXPIRY_S): its message was lost or no infer worker is up; send the "
                           "images again"})
            if str(self._fail_unstarted(keys=[f"{P}job:{job_id}", f"{P}jobs:active"],
                                        args=[now_iso(), error, job_id])) == "failed":
                out.append(job_id)
                self._finished(job_id)
        return out

    # ------------------------------------------------------------------ models

    def model_names(self) -> list[str]:
        """Model names, oldest first."""
        return list(self.r.zrange(f"{P}models", 0, -1))

    def versions(self, name: str) -> list[int]:
        """Version numbers of a model, ascending; NotFound for an unknown model."""
        vs = [int(v) for v in self.r.zrange(f"{P}model:{name}:versions", 0, -1)]
        if not vs and not self.r.zscore(f"{P}models", name):
            raise NotFound(f"model {name!r} not found")
        return sorted(vs)

    def aliases(self, name: str) -> dict[str, int]:
        """Alias -> version (e.g. {"production": 3})."""
        return {k: int(v) for k, v in self.r.hgetall(f"{P}model:{name}:aliases").items()}

    def get_version(self, name: str, version: int) -> dict[str, Any]:
        """One version's record; NotFound names what is missing."""
        raw = self.r.hgetall(f"{P}model:{name}:v:{version}")
        if not raw:
            self.versions(name)  # raises for an unknown model
            raise NotFound(f"model {name!r} has no version {version}")
        rec: dict[str, Any] = dict(raw)
        rec["version"] = int(raw["version"])
        rec["size_bytes"] = int(raw["size_bytes"])
        for k in ("metrics", "categories", "params", "parent", "reports", "exports"):
            rec[k] = json.loads(raw[k]) if raw.get(k) else None
        rec["exports"] = rec["exports"] or {}
        rec["reports"] = sorted(rec["reports"] or {})
        aliases = self.aliases(name)
        rec["aliases"] = sorted(a for a, v in aliases.items() if v == rec["version"])
        rec["kind"] = raw.get("kind") or "finetuned"
        return rec

    def resolve(self, name: str, version: int | None = None) -> dict[str, Any]:
        """`version`, else the version aliased production, else the latest."""
        if version is None:
            prod = self.aliases(name).get("production")
            if prod is not None:
                version = prod
            else:
                vs = self.versions(name)
                if not vs:
                    raise NotFound(f"model {name!r} has no versions")
                version = vs[-1]
        return self.get_version(name, version)

    def fetch_artifact(self, record: dict[str, Any]) -> Path:
        """A local file of a version's checkpoint, checked against its sha256 (ArtifactError if not)."""
        return self.store.fetch(record["artifact"], record["sha256"])

    def fetch_export(self, record: dict[str, Any], fmt: str) -> tuple[dict[str, Any], Path] | None:
        """A version's stored export in `fmt` as ({key, sha256, size_bytes}, its local file), checked against
        its sha256; None when there is none, or when the stored file no longer matches (it is to be made again,
        never used)."""
        entry = record["exports"].get(fmt)
        if entry is None:
            return None
        try:
            return entry, self.store.fetch(entry["key"], entry["sha256"])
        except ArtifactError as exc:
            log.warning("stored %s export of %s v%s is unusable: %s", fmt, record["name"], record["version"], exc)
            return None

    def register_version(self, name: str, src: str | Path, metrics: dict[str, Any],
                         categories: list[dict[str, Any]], params: dict[str, Any], parent: dict[str, Any] | None,
                         dataset_sha256: str, job_id: str, kind: str = "finetuned",
                         reports: dict[str, Path] | None = None) -> dict[str, Any]:
        """Put an artifact into the store and record it as the next version of `name`.

        Idempotent on `job_id`: a job that already registered its version gets that version back.
        `kind` is "finetuned" or "pretrained" (a UPLVP pre-training, to use as a base); `reports`
        are PNG pictures ("curves", "evaluation") stored beside the checkpoint.
        """
        done = self.r.get(f"{P}job:{job_id}:version")
        if done:
            return self.get_version(name, int(done))
        version = int(self.r.incr(f"{P}model:{name}:seq"))
        stored = self.store.put(Path(src), f"models/{name}/v{version}/model.pt")
        report_keys = {what: self.store.put(Path(p), f"models/{name}/v{version}/{what}.png").key
                       for what, p in (reports or {}).items()}
        ts = time.time()
        rec = {"name": name, "version": str(version), "created_at": now_iso(), "artifact": stored.key,
               "sha256": stored.sha256, "size_bytes": str(stored.size_bytes), "metrics": _dump(metrics),
               "categories": _dump(categories), "params": _dump(params), "parent": _dump(parent),
               "dataset_sha256": dataset_sha256, "job_id": job_id, "kind": kind, "reports": _dump(report_keys)}
        pipe = self.r.pipeline()
        pipe.hset(f"{P}model:{name}:v:{version}", mapping=rec)
        pipe.zadd(f"{P}model:{name}:versions", {str(version): version})
        pipe.zadd(f"{P}models", {name: ts}, nx=True)
        pipe.set(f"{P}job:{job_id}:version", str(version))
        pipe.execute()
        return self.get_version(name, version)

    def record_export(self, name: str, version: int, fmt: str, src: str | Path) -> dict[str, Any]:
        """Store `src` as the version's export in `fmt` (beside its checkpoint) and record its key and
        sha256 in the version; returns {"key", "sha256", "size_bytes"}."""
        rec = self.get_version(name, version)
        stored = self.store.put(Path(src), f"models/{name}/v{version}/model.{fmt}")
        entry = {"key": stored.key, "sha256": stored.sha256, "size_bytes": stored.size_bytes}
        self.r.hset(f"{P}model:{name}:v:{version}", "exports", _dump({**rec["exports"], fmt: entry}))
        return entry

    def promote(self, name: str, version: int, alias: str = "production") -> dict[str, Any]:
        """Point `alias` at `version` (rollback = promote an older version)."""
        self.get_version(name, version)
        self.r.hset(f"{P}model:{name}:aliases", alias, str(version))
        return self.get_version(name, version)

    def jobs_using(self, name: str, version: int) -> list[str]:
        """Queued/running jobs whose base is this version."""
        ref = f"{name}:{version}"
        return [j["id"] for j in self.active_jobs() if j.get("base") == ref]

    def delete_version(self, name: str, version: int) -> None:
        """Delete a version and its artifact; Conflict if it is aliased or used by an active job."""
        rec = self.get_version(name, version)
        if rec["aliases"]:
            raise Conflict(f"{name} v{version} is aliased {', '.join(rec['aliases'])}; promote another version first")
        users = self.jobs_using(name, version)
        if users:
            raise Conflict(f"{name} v{version} is the base of active job(s) {', '.join(users)}; wait or cancel them")
        pipe = self.r.pipeline()
        pipe.delete(f"{P}model:{name}:v:{version}")
        pipe.zrem(f"{P}model:{name}:versions", str(version))
        pipe.execute()
        self.store.delete(rec["artifact"])
        for entry in rec["exports"].values():
            self.store.delete(entry["key"])
        for kind in rec["reports"]:
            self.store.delete(f"models/{name}/v{version}/{kind}.png")

    # ------------------------------------------------------------------ workers

    def heartbeat(self, hostname: str, ttl_s: int, info: dict[str, Any]) -> None:
        """Mark a worker alive for ttl_s seconds."""
        self.r.set(f"{P}worker:{hostname}", _dump({**info, "at": now_iso()}), ex=ttl_s)

    def drop_heartbeat(self, hostname: str) -> None:
        """Forget a worker that shuts down."""
        self.r.delete(f"{P}worker:{hostname}")

    def reachable(self, timeout_s: float = 2.0) -> bool:
        """Whether Redis answers one PING within `timeout_s`, with none of the client's retries: the client
        rides out a restart for ~20 s (connect()), but a readiness probe must say "not ready" at once."""
        pool = self.r.connection_pool
        kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0),
                  "socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}
        once = redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
        try:
            return bool(redis.Redis(connection_pool=once).ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            once.disconnect()  # a client on a pool it did not make leaves the pool's sockets open

    def workers(self) -> dict[str, dict[str, Any]]:
        """Workers with a live heartbeat: hostname -> info."""
        out = {}
        for key in self.r.scan_iter(f"{P}worker:*"):
            val = self.r.get(key)
            if val:
                out[key[len(f"{P}worker:"):]] = json.loads(val)
        return out
