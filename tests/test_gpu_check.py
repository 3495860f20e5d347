"""scripts/gpu_check.sh --cpu: the GPU check's every step, with small configs, on the CPU."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_cpu_run_of_the_gpu_check_passes_and_writes_its_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    names = [s["name"] for s in summary["steps"]]
    assert names[:2] == ["bench_demo_text", "bench_gpt_tiny"] and "sample_image" in names
    assert all(s["ok"] for s in summary["steps"])
    bench = next(s for s in summary["steps"] if s["name"] == "bench_gpt_tiny")
    assert {(r["batch"], r["cache"]) for r in bench["rows"]} == {(1, True), (1, False), (16, True), (16, False)}
    assert next(s for s in summary["steps"] if s["name"] == "train_vqvae")["steps_per_s"] > 0
    assert "| sample_image | ok |" in (tmp_path / "table.md").read_text()
