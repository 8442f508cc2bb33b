"""benchmarks/gpu_check: its --cpu mode runs every part that can run on the CPU (so that the GPU check cannot rot
between the rare sessions with a GPU), and a part that fails or hangs is a row of the table, not the end of it."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO

from benchmarks import gpu_check


@pytest.mark.slow
def test_the_cpu_mode_runs_every_part_that_can_run_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check"), "--cpu", "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    parts = json.loads(out.read_text())["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    assert {k: v["status"] for k, v in parts.items()} == {k: "skip" if k in gpu_check.GPU_ONLY else "ok"
                                                          for k in gpu_check.PARTS}, p.stdout[-4000:]
    for name in gpu_check.PARTS:
        assert f"| {name} | " in p.stdout
    smoke = parts["smoke"]
    assert all(smoke[f"{t} no"] == "ok" for t in gpu_check.SMOKE_TASKS) and smoke["sst2 bf16"] == "ok"
    assert parts["sigterm"]["exit"] == 0 and parts["sigterm"]["resumed_to"] == parts["sigterm"]["checkpoint_step"] + 5
    assert parts["compile"]["steps"] == 24
    assert parts["syncs"]["sst2"]["steps"] == parts["syncs"]["pretrain"]["steps"] == 20
    assert any(k.startswith("finetune") for k in parts["speed"]) and any(k.startswith("pretrain") for k in
                                                                         parts["speed"])


def test_a_part_that_hangs_is_a_failed_row_and_the_table_still_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.LIMITS, "env", 0.2)  # x3 under --cpu
    out = tmp_path / "r.json"
    assert gpu_check.main(["--cpu", "--only", "env,fsdp", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "| env | fail |" in text and "timed out after 0.6 s" in text and "| fsdp | skip |" in text
    parts = json.loads(out.read_text())["parts"]
    assert parts["env"]["status"] == "fail" and parts["fsdp"]["status"] == "skip"
