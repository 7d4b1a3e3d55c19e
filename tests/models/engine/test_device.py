"""Device selection, mixed precision and out-of-memory detection (models.engine.device), on the CPU.

What needs a GPU to be true (training and inference on CUDA, CPU/GPU parity) is in tests/gpu/.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from models.config import ModelConfig, TrainConfig
from models.data.coco import CocoAnnotations
from models.data.dataset import CocoDataset
from models.data.transforms import TransformConfig
from models.engine import device as devices
from models.engine.device import DeviceError, Precision
from models.engine.train import TrainHooks, train
from models.errors import ConfigError
from models.nets.build import build_model

TINY = dict(backbone_weights="none", width=32, num_kernels=8, num_stages=2, num_heads=4, ffn_dim=64, gn_groups=8)


def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int, memory_gb: float = 80, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    props = SimpleNamespace(name="Fake GPU", total_memory=int(memory_gb * 1024**3))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: props)


def test_auto_takes_the_cpu_without_a_gpu_and_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_gpu(monkeypatch)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device(" CPU ") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match="no CUDA GPU") as info:
            devices.resolve_device(spec)
        assert info.value.code == "device_unavailable" and isinstance(info.value, ConfigError)


def test_auto_takes_the_gpu_and_a_missing_index_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpus(monkeypatch, 2)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"only 2 GPU\(s\).*cuda:0..cuda:1"):
        devices.resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "mps", ""])
def test_unknown_device_names_are_refused(spec: str) -> None:
    with pytest.raises(DeviceError, match="auto, cpu, cuda or cuda:N"):
        devices.resolve_device(spec)
    with pytest.raises(ConfigError, match="device"):
        TrainConfig(device=spec).validate()


def test_precision_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.precision_for("cpu") == Precision(False) and devices.precision_for("cpu").name == "fp32"
    assert devices.precision_for("cpu", amp=True) == Precision(True, torch.bfloat16)
    _fake_gpus(monkeypatch, 1, bf16=True)
    assert devices.precision_for("cuda:0").name == "bf16" and not devices.precision_for("cuda:0").scaled
    assert devices.precision_for("cuda:0", amp=False) == Precision(False)
    _fake_gpus(monkeypatch, 1, bf16=False)  # a pre-Ampere GPU: fp16 needs its gradients scaled
    assert devices.precision_for("cuda:0") == Precision(True, torch.float16, scaled=True)
    assert devices.grad_scaler("cpu", Precision(True, torch.float16, scaled=True)).is_enabled()
    assert not devices.grad_scaler("cpu", Precision(True, torch.bfloat16)).is_enabled()


def test_batch_size_and_loader_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.default_batch_size("cpu") == 2 and devices.loader_workers("cpu") == 0
    assert devices.loader_workers("cpu", asked=3) == 3
    _fake_gpus(monkeypatch, 1, memory_gb=24)
    assert devices.default_batch_size("cuda:0") == 8
    _fake_gpus(monkeypatch, 1, memory_gb=80)
    assert devices.default_batch_size("cuda:0") == 16
    assert devices.device_info("cuda:0") == {"device": "cuda:0", "name": "Fake GPU", "memory_gb": 80.0}


def test_finetune_params_resolve_the_device_and_its_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from models.pipeline import FinetuneParams

    _no_gpu(monkeypatch)
    params = FinetuneParams().validate().on_device()
    assert (params.device, params.batch_size) == ("cpu", 2)
    assert FinetuneParams(batch_size=5).on_device().batch_size == 5
    with pytest.raises(DeviceError):
        FinetuneParams(device="cuda").on_device()
    _fake_gpus(monkeypatch, 1, memory_gb=24)
    assert (FinetuneParams().on_device().device, FinetuneParams().on_device().batch_size) == ("cuda:0", 8)
    with pytest.raises(ConfigError, match="batch_size"):
        FinetuneParams(batch_size=-1).validate()


def test_out_of_memory_is_recognised() -> None:
    assert devices.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert devices.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert devices.is_out_of_memory(MemoryError())
    assert not devices.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not devices.is_out_of_memory(ValueError("CUDA out of memory"))


@pytest.fixture(scope="module")
def voc(voc_coco):
    return CocoAnnotations(*voc_coco)


@pytest.mark.parametrize("precision", [Precision(True, torch.bfloat16), Precision(True, torch.float16, scaled=True)],
                         ids=["bf16", "fp16-scaled"])
def test_mixed_precision_steps_train(voc, precision: Precision, monkeypatch: pytest.MonkeyPatch) -> None:
    """The autocast + gradient-scaler path of the loop (what CUDA runs by default), exercised on the CPU:
    the losses stay finite and the weights move. fp16's scaler starts at 2^16 and skips the first steps,
    whose scaled gradients overflow, halving its scale each time: 12 steps leave room for that."""
    monkeypatch.setattr(devices, "precision_for", lambda device, amp=None: precision)
    mcfg = ModelConfig(num_classes=len(voc.categories), **TINY)
    tcfg = TrainConfig(epochs=12, batch_size=1, short_side=96, max_long_side=128, warmup_iters=1, lr=1e-3)
    torch.manual_seed(0)
    model = build_model(mcfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses: list[float] = []
    state = train(model, CocoDataset(voc, TransformConfig(96, 128), train=True), mcfg, tcfg, voc.categories.to_coco(),
                  hooks=TrainHooks(progress=False, on_step=lambda e, i, n, loss: losses.append(loss["loss"])))
    assert state.step == 12 and len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never casts the weights


def _saved_locations(path) -> set[str]:
    """The device tags a checkpoint file gives its tensors' storages."""
    locations: set[str] = set()
    torch.load(path, map_location=lambda storage, location: (locations.add(location), storage)[1], weights_only=False)
    return locations


def test_a_checkpoint_written_on_a_gpu_loads_on_the_cpu(voc, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose tensors are tagged cuda:0 (as one saved on a GPU is) loads here, with no GPU, through
    load_checkpoint / load_model / the Predictor (map_location), and our own saves are tagged cpu."""
    import torch.serialization as ser

    from models.engine.checkpoint import load_checkpoint, load_model, save_checkpoint
    from models.engine.inference import Predictor

    _no_gpu(monkeypatch)
    mcfg = ModelConfig(num_classes=len(voc.categories), **TINY)
    model = build_model(mcfg)
    ours = save_checkpoint(tmp_path / "ours.pt", model, mcfg, TrainConfig(), voc.categories.to_coco(), [])
    assert _saved_locations(ours) == {"cpu"}
    # a tagger that writes cuda:0 for every storage: what torch.save does on a GPU
    monkeypatch.setattr(ser, "_package_registry", [(-1, lambda obj: "cuda:0", lambda obj, loc: None),
                                                   *ser._package_registry])
    state = {"format": "uplvp-checkpoint/1", "model_config": vars(mcfg), "train_config": vars(TrainConfig()),
             "categories": voc.categories.to_coco(), "history": [], "model": model.state_dict(), "optimizer": None,
             "epoch": 1, "step": 1, "extra": {}}
    torch.save(state, tmp_path / "gpu.pt")
    monkeypatch.undo()
    _no_gpu(monkeypatch)
    assert _saved_locations(tmp_path / "gpu.pt") == {"cuda:0"}
    with pytest.raises(RuntimeError, match="CUDA"):  # what a load without map_location does here
        torch.load(tmp_path / "gpu.pt", weights_only=False)
    assert {v.device.type for v in load_checkpoint(tmp_path / "gpu.pt")["model"].values()} == {"cpu"}
    loaded, _ = load_model(tmp_path / "gpu.pt")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert Predictor(tmp_path / "gpu.pt").device == torch.device("cpu")
