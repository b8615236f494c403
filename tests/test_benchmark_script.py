"""Smoke test of scripts/benchmark.py: one tiny LeNet round, brewnet only (no torch needed)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def test_quick_lenet_round_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--nets", "lenet", "--quick", "--no-torch",
                           "--json-out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lenet (64)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["gemm_peak_gflops"] > 0
    assert report["settings"]["torch"] is False and report["settings"]["rounds"] == 1
    lenet = report["nets"]["lenet"]
    assert lenet["batch"] == 64
    bn = lenet["brewnet"]
    assert bn["img_per_s"] > 0 and len(bn["img_per_s_rounds"]) == 1
    assert bn["iterations"][0] >= 2
    # LeNet's training cost, counted from the net: 13.2 MFLOP per image
    assert abs(bn["flops_per_image"] - 13.18e6) < 0.05e6
    # the fraction is defined from the measured figures (two timings taken at different moments of a
    # noisy machine can put it anywhere, so only its definition is checked)
    fraction = bn["img_per_s"] * bn["flops_per_image"] / (report["gemm_peak_gflops"] * 1e9)
    assert abs(bn["gemm_peak_fraction"] - fraction) <= 1e-3 * fraction + 1e-6
    assert bn["rss_delta_mib"] >= 0 and bn["peak_rss_mib"] > 0
    assert bn["final_loss"] == bn["final_loss"]  # a finite number came back, not NaN
    assert lenet["pytorch"] is None and "ratio_brewnet_over_pytorch" not in lenet


def test_unknown_net_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--nets", "resnet", "--quick", "--no-torch",
                           "--json-out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown net" in proc.stderr
