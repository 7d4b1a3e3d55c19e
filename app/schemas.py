"""Response models of the API (they also document the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobStage = Literal["validating", "teaching", "proposing", "pretraining", "finetuning", "evaluating", "exporting",
                   "segmenting"]
JobKind = Literal["finetune", "pretrain", "segment"]


class ErrorDetail(BaseModel):
    code: str = Field(examples=["missing_images"])
    message: str = Field(examples=["annotations.json: image 3: voc_3.jpg is referenced but not in the zip"])
    details: Any = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body."""

    error: ErrorDetail


class Instance(BaseModel):
    category_id: int
    category_name: str
    score: float
    bbox: list[float] = Field(description="x, y, width, height in pixels")
    area: int
    segmentation: dict[str, Any] = Field(description="COCO compressed RLE {size, counts}")
    polygons: list[list[float]] | None = None


class ImageResult(BaseModel):
    file_name: str
    width: int
    height: int
    instances: list[Instance]


class SegmentResponse(BaseModel):
    model: str
    version: int
    backend: Literal["onnx", "torch"] | None = Field(
        None, description="what ran the model: onnx (its ONNX export under ONNX Runtime) or torch (PyTorch)")
    images: list[ImageResult]


class JobError(BaseModel):
    code: str
    message: str


class JobResult(BaseModel):
    model: str
    version: int
    metrics: dict[str, Any]
    num_train_images: int = 0
    num_val_images: int = 0
    resumed_from_epoch: int = Field(0, description="> 0 when a redelivered job continued from its checkpoint")
    init: dict[str, Any] | None = Field(None, description="what loading the base / pre-trained weights did")


class Job(BaseModel):
    """A job: fine-tuning, UPLVP pre-training or an async segmentation. `progress` is 0..1 over
    the whole job; `eta_s` estimates the time left."""

    id: str = Field(examples=["5f0c3b0e9a4d4e7f8a1b2c3d4e5f6a7b"])
    kind: JobKind = "finetune"
    name: str = Field(examples=["shelves"])
    state: JobState
    stage: JobStage | None = None
    progress: float = Field(0.0, ge=0, le=1)
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    losses: dict[str, float] | None = Field(None, examples=[{"loss": 3.2, "s1_dice": 0.8}])
    eta_s: float | None = None
    created_at: str
    started_at: str | None = None
    updated_at: str | None = None
    finished_at: str | None = None
    cancel_requested: bool = False
    base: str | None = Field(None, description="the model version training started from, as name:version")
    params: dict[str, Any] | None = None
    dataset: dict[str, Any] | None = None
    error: JobError | None = None
    result: JobResult | None = Field(None, description="finetune / pretrain: the model version produced")
    output: SegmentResponse | None = Field(None, description="segment (async=true): the instances per image")
    attempts: int = 0
    device: dict[str, Any] | None = Field(None, description="where the job ran (its last attempt): device (cpu or "
                                          "cuda:N), name, memory_gb of a GPU or threads of the CPU, and the Celery worker's "
                                          "name (`worker`: which host)",
                                          examples=[{"device": "cuda:0", "name": "NVIDIA H100", "memory_gb": 79.2}])
    history: list[dict[str, Any]] = Field(default_factory=list, description="per epoch: stage, epoch, mean loss "
                                          "(the learning curve)")
    webhook_url: str | None = Field(None, description="called with a signed POST when the job ends")
    webhook: dict[str, Any] | None = Field(None, description="the delivery of that POST: event, delivered, attempts, "
                                           "status, error")


class JobAccepted(BaseModel):
    id: str
    state: JobState = "queued"
    location: str = Field(examples=["/jobs/5f0c3b0e9a4d4e7f8a1b2c3d4e5f6a7b"])
    report: dict[str, Any] | None = Field(None, description="POST /finetune: what the upload holds, per split "
                                          "(images, instances, per class, per image, size shares) and `warnings` "
                                          "[{code, message}]; GET /jobs/{id} keeps it as dataset.report")


class JobPage(BaseModel):
    items: list[Job]
    total: int
    offset: int
    limit: int


class ModelVersion(BaseModel):
    name: str
    version: int
    created_at: str
    aliases: list[str] = Field(default_factory=list, examples=[["production"]])
    metrics: dict[str, Any] | None = None
    parent: dict[str, Any] | None = Field(None, description="the base version it was fine-tuned from")
    dataset_sha256: str
    sha256: str = Field(description="sha256 of the checkpoint file")
    size_bytes: int
    categories: list[dict[str, Any]] | None = None
    params: dict[str, Any] | None = None
    job_id: str
    reports: list[str] = Field(default_factory=list, description="pictures at .../reports/{name}.png: `curves` "
                               "(loss per epoch), `evaluation` (val images, ground truth vs predictions)")
    kind: Literal["finetuned", "pretrained"] = Field("finetuned", description="pretrained: a UPLVP pre-training "
                                                     "(POST /pretrain), meant as the `base` of a fine-tune")


class ModelSummary(BaseModel):
    name: str
    versions: list[int]
    aliases: dict[str, int]
    latest: int | None


class ModelDetail(ModelSummary):
    items: list[ModelVersion]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    redis: bool
    workers: list[str]
    store: bool = Field(True, description="the artifact store answers (UPLVP_ARTIFACTS: its folder is writable, "
                        "or its bucket exists and takes our credentials)")
    store_error: str | None = Field(None, description="why the store does not answer: no bucket, refused credentials, "
                                    "no endpoint")
    devices: dict[str, str] = Field(default_factory=dict, description="each live worker's device: cpu or cuda:N "
                                    "(with the GPU's name)", examples=[{"train-gpu0@host": "cuda:0 (NVIDIA H100)"}])
