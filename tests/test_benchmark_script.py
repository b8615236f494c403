"""Smoke test of scripts/benchmark.py: one tiny LeNet round, brewnet only (no torch needed),
quiet and beside a busy process (--contend); the busy processes' cleanup."""

import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def _gone(pid):
    """Whether process ``pid`` has ended (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pids, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.05)
    return all(_gone(p) for p in pids)


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_lenet_round_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--nets", "lenet", "--quick", "--no-torch",
                           "--contend", "1", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "lenet (64)" in proc.stdout
    assert "bn slow" in proc.stdout and "with 1 busy" in proc.stderr
    report = json.loads(out.read_text())
    # --contend 1: the same measurement again beside one busy process, which is gone afterwards
    assert report["settings"]["contend"] == 1
    pids = report["settings"]["busy_pids"]
    assert len(pids) == 1 and _wait_gone(pids)
    busy = report["nets"]["lenet"]["contended"]
    assert busy["processes"] == 1 and busy["pytorch"] is None
    bn_busy = busy["brewnet"]
    assert bn_busy["img_per_s"] > 0 and len(bn_busy["slowdown_rounds"]) == 1
    quiet_time = sorted(report["raw"]["lenet"]["brewnet"][0]["times"])
    busy_time = sorted(report["raw_contended"]["lenet"]["brewnet"][0]["times"])
    median = lambda t: (t[(len(t) - 1) // 2] + t[len(t) // 2]) / 2  # noqa: E731
    assert abs(bn_busy["slowdown"] - median(busy_time) / median(quiet_time)) < 1e-9
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


@pytest.mark.parametrize("how", ["exception", "sigterm"])
def test_busy_processes_end_with_the_block_however_it_ends(how, tmp_path):
    if how == "exception":
        bench = _benchmark_module()
        with pytest.raises(KeyboardInterrupt):
            with bench.busy_processes(2) as pids:
                assert len(pids) == 2 and not any(_gone(p) for p in pids)
                raise KeyboardInterrupt  # as Ctrl-C would
        assert _wait_gone(pids, 0.1)  # killed and reaped before the block returned
        return
    # SIGTERM to a script inside the block: the block's cleanup still runs
    code = (f"import sys, time; sys.path.insert(0, {str(SCRIPT.parent)!r}); import benchmark\n"
            "with benchmark.busy_processes(1) as pids:\n"
            "    print(pids[0], flush=True)\n"
            "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    pid = int(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert _wait_gone([pid], 0.1)


def test_a_busy_process_ends_by_itself_when_its_parent_is_killed():
    bench = _benchmark_module()
    # the parent is a shell that starts one spinner and is then killed outright (SIGKILL)
    parent = subprocess.Popen([sys.executable, "-c", f"import os, subprocess, sys, time\n"
                               f"p = subprocess.Popen([sys.executable, '-c', {bench.SPIN!r}, str(os.getpid())])\n"
                               f"print(p.pid, flush=True)\ntime.sleep(60)\n"],
                              stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    spinner = int(parent.stdout.readline())
    assert not _gone(spinner)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert _wait_gone([spinner])


# a stand-in for BVLC Caffe's binary: checks its arguments and the solver it is given, then logs an
# iteration line every 20 ms of *stamped* time (so the rate it reports is exact) until it is killed
FAKE_CAFFE = r'''#!{python}
import sys, time
assert sys.argv[1:3] == ["train", "-solver"], sys.argv
solver = open(sys.argv[3]).read()
assert "display: 1" in solver and "momentum: 0.9" in solver and 'net: "' in solver, solver
net = open(solver.split('net: "')[1].split('"')[0]).read()
assert 'type: "SoftmaxWithLoss"' in net, net
start = 23 * 3600 + 59 * 60 + 59.9  # the stamps cross midnight on the way
for k in range(10 ** 6):
    stamp = (start + 0.02 * k) % 86400
    hh, mm, ss = int(stamp // 3600), int(stamp % 3600 // 60), stamp % 60
    sys.stderr.write(f"I20261205 {{hh:02d}}:{{mm:02d}}:{{ss:09.6f}}  4242 solver.cpp:239] Iteration {{k}} "
                     f"(50 iter/s, 0.02s/1 iters), loss = {{2.3 - k * 1e-3:.6f}}\n")
    sys.stderr.write(f"I20261205 {{hh:02d}}:{{mm:02d}}:{{ss:09.6f}}  4242 sgd_solver.cpp:112] Iteration {{k}}, lr = 0.01\n")
    sys.stderr.flush()
    time.sleep(0.001)
'''


def test_caffe_column_from_its_log_stamps(tmp_path):
    caffe = tmp_path / "caffe"
    caffe.write_text(FAKE_CAFFE.format(python=sys.executable))
    caffe.chmod(0o755)
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--nets", "lenet", "--quick", "--no-torch",
                           "--caffe", str(caffe), "--json-out", str(out)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "Caffe img/s" in proc.stdout and "bn/caffe" in proc.stdout
    report = json.loads(out.read_text())
    lenet = report["nets"]["lenet"]
    # 64 images per 20 ms of stamps, midnight included
    assert lenet["caffe"]["img_per_s"] == pytest.approx(3200.0, rel=1e-6)
    assert lenet["caffe"]["final_loss"] < 2.3
    raw = report["raw"]["lenet"]
    expected = statistics.median(raw["caffe"][0]["times"]) / statistics.median(raw["brewnet"][0]["times"])
    assert lenet["ratio_brewnet_over_caffe"] == pytest.approx(expected)
    assert report["settings"]["caffe"] == str(caffe)


def test_caffe_that_fails_is_reported_not_fatal(tmp_path):
    caffe = tmp_path / "caffe"
    caffe.write_text(f"#!{sys.executable}\nimport sys\nsys.stderr.write('F1205 solver.cpp:1] Check failed: bad net\\n')\n"
                     "sys.exit(134)\n")
    caffe.chmod(0o755)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--nets", "lenet", "--quick", "--no-torch",
                           "--caffe", str(caffe), "--json-out", str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "caffe error" in proc.stdout and "Check failed: bad net" in proc.stdout
