"""Service settings (pydantic-settings), read from the environment and validated at start.

The API and the worker read the same settings; every name is listed in README.md ("The service").
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Environment configuration. Env names: REDIS_URL and UPLVP_* (see `env_names`)."""

    model_config = SettingsConfigDict(env_prefix="UPLVP_", extra="ignore", populate_by_name=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL", "UPLVP_REDIS_URL"),
                           description="Redis: Celery broker, result backend, job and model registry")
    artifacts: str = Field("local", validation_alias=AliasChoices("UPLVP_ARTIFACTS", "UPLVP_ARTIFACT_STORE"),
                           description="where checkpoints live: `local` = files under the data dir (a shared filesystem "
                           "between machines), or `s3://bucket/prefix` = objects in an S3-compatible bucket "
                           "(UPLVP_S3_ENDPOINT_URL; credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); "
                           "see app/storage.py")
    s3_endpoint_url: str | None = Field(None, description="the S3 endpoint of an s3:// UPLVP_ARTIFACTS (SeaweedFS, "
                                        "MinIO, ...); unset: AWS")
    checkpoint_upload_s: float = Field(60.0, ge=0, description="with an s3:// store: a fine-tune's resume checkpoint "
                                       "goes to the store at most this often (0: after every epoch), so that a job "
                                       "whose host dies resumes on another from there")
    data_dir: Path = Field(Path("data"), description="uploads, job work dirs and model artifacts (share it between machines)")
    max_upload_mb: float = Field(500.0, gt=0, description="cap on one uploaded dataset zip / image batch (413 above)")
    max_zip_members: int = Field(20000, gt=0, description="cap on the number of files in a dataset zip")
    max_unzipped_mb: float = Field(4000.0, gt=0, description="cap on the total uncompressed size of a dataset zip")
    max_compression_ratio: float = Field(200.0, gt=1, description="per-member cap (zip-bomb guard)")
    job_time_limit_s: int = Field(6 * 3600, gt=0, description="soft time limit of one fine-tuning job")
    default_time_budget_min: float = Field(15.0, ge=1.0, description="training minutes of a POST /finetune that gives "
                                           "neither epochs nor time_budget_min (the schedule is laid out for them)")
    segment_timeout_s: float = Field(60.0, gt=0, description="POST /segment waits this long for the infer worker")
    segment_job_expiry_s: float = Field(3600.0, gt=0, description="an async segment job that no infer worker started "
                                        "within this long (its message lost with a killed worker, or no infer worker "
                                        "up) fails with not_started; its message expires with it")
    export_timeout_s: float = Field(300.0, gt=0, description="a download with format=onnx waits this long for the "
                                    "infer worker to export the version (once; later downloads read the stored file)")
    max_segment_images: int = Field(16, gt=0, description="images per POST /segment request")
    model_cache_size: int = Field(4, gt=0, description="models an infer worker keeps loaded (LRU)")
    infer_backend: Literal["onnx", "torch"] = Field(
        "onnx", description="onnx: infer workers run a K-Net's ONNX export under ONNX Runtime (made once per version, "
        "stored beside the checkpoint; faster on CPU); torch: PyTorch. Mask R-CNN always runs under PyTorch")
    worker_threads: int = Field(0, ge=0, description="torch threads in the worker (0: torch's default)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="where a worker runs training, pre-training, proposals and inference: auto (CUDA "
                        "when torch sees a GPU, else the CPU), cpu, cuda or cuda:N; a worker asked for CUDA where "
                        "there is none refuses to start. One train worker per GPU: set CUDA_VISIBLE_DEVICES")
    job_lock_ttl_s: int = Field(60, ge=2, description="expiry of a job's run lock, refreshed every ttl/5 while the job "
                                "runs; a job whose worker died is re-queued within about this long")
    max_job_attempts: int = Field(3, ge=1, description="runs of a job whose worker keeps dying before it is failed")
    heartbeat_s: int = Field(10, gt=0, description="worker heartbeat period; a worker counts as alive for 3 periods")

    # A secret: never shown in reprs or validation errors; checked by create_app (parse_api_keys).
    api_keys: SecretStr = Field(SecretStr(""), description="comma-separated API keys; `KEY:read` is read-only; empty = no auth "
                          "(then the API listens on loopback only)")
    rate_segment_per_min: int = Field(600, ge=0, description="POST /segment requests per key per minute (0: no limit)")
    rate_jobs_per_hour: int = Field(60, ge=0, description="job submissions per key per hour (0: no limit)")
    max_active_jobs_per_key: int = Field(8, gt=0, description="queued + running training jobs per key")
    max_image_pixels: int = Field(50_000_000, gt=0, description="pixels per image (decompression-bomb guard)")
    # Webhooks (app/webhooks.py): a job's webhook_url gets a POST signed with this secret when the job ends.
    webhook_secret: SecretStr = Field(SecretStr(""), description="HMAC-SHA256 key that signs webhook bodies (at "
                                      "least 16 characters); empty = jobs cannot ask for a webhook")
    webhook_allow_private: bool = Field(False, description="1 = webhooks may call private, loopback and "
                                        "link-local addresses (SSRF guard off: a receiver on your own network)")
    webhook_attempts: int = Field(4, ge=1, le=20, description="deliveries tried per event (network errors, "
                                  "timeouts, 408, 429 and 5xx are retried)")
    webhook_backoff_s: float = Field(2.0, ge=0, le=600, description="wait before the first retry, doubled for each one")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"REDIS_URL must start with redis://, rediss:// or unix://, got {v!r}")
        return v

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_or_none(cls, v: str | None) -> str | None:
        return v or None  # empty (compose's ${UPLVP_S3_ENDPOINT_URL:-}): AWS, as unset

    @field_validator("artifacts")
    @classmethod
    def _artifacts_scheme(cls, v: str) -> str:
        from app.storage import parse_artifacts

        parse_artifacts(v)  # ValueError names the supported forms
        return v.strip()

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_length(cls, v: SecretStr) -> SecretStr:
        if 0 < len(v.get_secret_value()) < 16:
            raise ValueError("UPLVP_WEBHOOK_SECRET must be at least 16 characters (or empty: no webhooks)")
        return v

    @model_validator(mode="after")
    def _absolute_data_dir(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        return self

    @property
    def visibility_timeout_s(self) -> int:
        """Redis redelivers unacked messages after this; it must exceed the longest job (+1 h margin)."""
        return self.job_time_limit_s + 3600

    @classmethod
    def env_names(cls) -> set[str]:
        """Every environment variable these settings read."""
        names: set[str] = set()
        for name, f in cls.model_fields.items():
            alias = f.validation_alias
            if isinstance(alias, AliasChoices):
                names.update(str(a) for a in alias.choices)
            else:
                names.add(f"UPLVP_{name.upper()}")
        return names


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (validated on first use)."""
    return Settings()
