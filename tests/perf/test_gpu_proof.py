"""The GPU proof command runs end to end at seconds-sized settings and reports honestly: on a
machine without CUDA it says it is a dry run, and the GPU tests count as skipped, never passed."""

import json

from sora_dist.cli import main


def test_gpu_proof_dry_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "proof"
    assert main(["gpu-proof", "--out", str(out), "--small", "--parts", "env", "tests", "demo", "train", "calibrate", "loader"]) == 0
    report = json.loads((out / "gpu_proof.json").read_text())
    text = (out / "gpu_proof.md").read_text()
    assert report["cuda"] is False and "not a GPU proof" in text
    assert report["env"]["torch"] and report["env"]["gpu"].startswith("none")
    tests = report["tests"]
    assert tests["passed"] == 0 and tests["failed"] == 0 and tests["skipped"] >= 50
    assert any("needs a CUDA GPU" in reason for reason in tests["skip_reasons"])
    demo = report["demo"]
    assert demo["exit_code"] == 0 and demo["last_tenth"] < demo["first_tenth"]
    rows = report["train"]["rows"]
    assert [(r["fused_requested"], r["compile"]) for r in rows] == [("reference", False), ("auto", False)]
    assert [r["fused"] for r in rows] == ["reference", "reference"]  # auto picks the reference kernels on a CPU
    assert all(r["exit_code"] == 0 and r["step_s_median"] > 0 for r in rows)
    calibration = report["calibrate"]
    assert calibration["exit_code"] == 0 and calibration["flops_rate"] > 0
    [prediction] = calibration["predictions"]  # the eager run with the fused kernels, the calibration's settings
    assert prediction["measured_s"] == rows[1]["step_s_median"] and prediction["predicted_s"] > 0
    assert prediction["error"] == prediction["predicted_s"] / prediction["measured_s"] - 1
    assert "| debug 64 | single device | 1 |" in text
    assert report["loader"]["exit_code"] == 0 and report["loader"]["rows"]
    assert "| debug | 64 | reference | False |" in text


def test_parts_run_separately_add_up(tmp_path):
    out = tmp_path / "proof"
    assert main(["gpu-proof", "--out", str(out), "--small", "--parts", "env"]) == 0
    assert main(["gpu-proof", "--out", str(out), "--small", "--parts", "kernels"]) == 0
    report = json.loads((out / "gpu_proof.json").read_text())
    assert report["parts"] == ["env", "kernels"] and report["kernels"]["attention"]
