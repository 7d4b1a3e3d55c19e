"""Helpers shared by the benchmarks: where the data is, machine description, peak memory."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UPLVP_BENCH_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "bench" / "results"


def require_data() -> Path:
    if not (DATA / "coco128").is_dir():
        raise SystemExit(f"benchmark data not found at {DATA} (set UPLVP_BENCH_DATA to the shared/data folder)")
    return DATA


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    import torch

    return {"cpu": cpu, "isa": cpu_isa(), "cores_visible": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit}


def cpu_isa() -> str:
    """The widest vector extension oneDNN can use here ("avx512", "avx2" or ""): two CPUs that both call
    themselves "AMD EPYC" ran the same training step 2x apart because one had AVX-512."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return ""
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else ""


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
