"""docker-compose.yml and docker/Dockerfile, checked without a Docker engine (none on the dev machines)."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_volumes_and_healthcheck() -> None:
    c = _compose()
    assert {"redis", "api", "worker-train", "worker-infer", "worker-gpu"} <= set(c["services"])
    assert "healthcheck" in c["services"]["redis"] and "redis-data:/data" in c["services"]["redis"]["volumes"]
    for name in ("api", "worker-train", "worker-infer", "worker-gpu"):
        svc = c["services"][name]
        assert "artifacts:/data" in svc["volumes"], name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
    gpu = c["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_commands_point_at_real_entry_points() -> None:
    for name, svc in _compose()["services"].items():
        cmd = svc["command"]
        if cmd[:3] == ["python", "-m", "app"]:
            assert callable(importlib.import_module("app.__main__").main), name
            assert callable(importlib.import_module("app.main").create_app), name
        elif cmd[0] == "celery":
            module = cmd[cmd.index("-A") + 1]
            assert hasattr(importlib.import_module(module), "celery_app"), name
            queues = set(cmd[cmd.index("-Q") + 1].split(","))
            assert queues <= {"train", "infer"}, name


def test_environment_names_exist_in_settings() -> None:
    names = Settings.env_names()
    for svc in _compose()["services"].values():
        for key in svc.get("environment", {}):
            assert key in names or key.startswith("AWS_"), key  # AWS_*: the standard variables boto3 reads


def test_s3_profile_runs_an_object_store_and_creates_its_bucket() -> None:
    c = _compose()["services"]
    weed, init = c["seaweedfs"], c["s3-init"]
    assert weed["profiles"] == ["s3"] == init["profiles"]
    assert "weed server" in weed["command"][0] and "-s3.config=/tmp/s3.json" in weed["command"][0]
    assert init["command"] == ["python", "-m", "app.storage", "create-bucket"]
    assert init["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    # the stack reads the store's settings from .env; local files unless they are set
    env = c["api"]["environment"]
    assert env["UPLVP_ARTIFACTS"] == "${UPLVP_ARTIFACTS:-local}" and "UPLVP_S3_ENDPOINT_URL" in env
    assert Settings(s3_endpoint_url="").s3_endpoint_url is None  # compose's empty default means AWS, as unset


def test_dockerfile_build_args() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and "ARG CLIP_WEIGHTS" in text and "UPLVP_CLIP_PRETRAINED" in text
    assert '"-m", "app"' in text


def test_dockerfile_copies_every_package() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        name = pattern.rstrip("*")
        assert f"COPY {name} ./{name}" in text, name
