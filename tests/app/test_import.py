"""The API process never imports torch (the ML runs in the worker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_app_does_not_import_torch() -> None:
    code = ("import sys; from app.main import create_app; from app.core.config import Settings; "
            "create_app(Settings(redis_url='redis://127.0.0.1:1/0')); "
            "heavy = [m for m in ('torch', 'torchvision', 'models.pipeline') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_settings_validation() -> None:
    import pytest
    from pydantic import ValidationError

    from app.core.config import Settings

    with pytest.raises(ValidationError, match="REDIS_URL"):
        Settings(redis_url="http://localhost")
    with pytest.raises(ValidationError):
        Settings(max_upload_mb=0)
    with pytest.raises(ValidationError, match="device"):
        Settings(device="gpu")
    assert Settings(device="cuda:1").device == "cuda:1" and Settings().device == "auto"
    s = Settings(job_time_limit_s=100)
    assert s.visibility_timeout_s > s.job_time_limit_s and s.data_dir.is_absolute()
    assert {"REDIS_URL", "UPLVP_DATA_DIR", "UPLVP_MAX_UPLOAD_MB", "UPLVP_JOB_TIME_LIMIT_S",
            "UPLVP_DEVICE"} <= Settings.env_names()
