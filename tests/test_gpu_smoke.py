"""``benchmarks/gpu_smoke.py --reduced`` on the CPU: the GPU smoke script runs end to end here
(tiny shapes, same functions), so it cannot rot between the days a GPU is lent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_smoke_reduced_runs_on_the_cpu_and_its_checks_hold():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
    run = subprocess.run([sys.executable, "benchmarks/gpu_smoke.py", "--reduced", "--device", "cpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {m.group(1).strip(): m.group(2).strip() for m in re.finditer(r"^│ (.+?) │ +(.+?) │", run.stdout, re.M)}
    assert re.fullmatch(r"True \(killed at \d+ of 8 shards\)", rows["kill -9, resume: bit-identical to an uninterrupted run"]), run.stdout
    error = float(rows["tiny Gemma-2 softcapped: bf16 on device vs fp32 CPU (worst rel. error)"])
    assert 0 < error < 0.05, run.stdout
    for figure in ("forward, early exit (tokens/s)", "harvest, all layers to the store (tokens/s)"):
        assert float(rows[figure].replace(",", "")) > 0, run.stdout
    assert float(rows["harvest / forward, end to end"]) > 0.2, run.stdout
    training = {k: v for k, v in rows.items() if k.startswith("TopK 1k latents") and "tokens/s" in k}
    assert len(training) == 4 and all(float(v.split(" / ")[0].replace(",", "")) > 0 for v in training.values()), run.stdout
    streamed = [float(v.replace(",", "")) for k, v in rows.items() if k.startswith("stream into cpu memory")]
    assert len(streamed) == 2 and min(streamed) > 0, run.stdout
    assert float(rows["TopK sparse step vs fp64 dense reference on cpu (torch), worst rel. error"]) < 1e-3, run.stdout
