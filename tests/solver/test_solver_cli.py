"""`brewnet train`, `brewnet test` and `brewnet device` end to end."""

import importlib.util
import io
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from brewnet.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[2]
GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} \d+ \S+:\d+\] ")
BODY = ('base_lr: 0.1 lr_policy: "step" gamma: 0.5 stepsize: 4 momentum: 0.9 max_iter: 8 display: 2 snapshot: 4 '
        'snapshot_prefix: "snaps/tiny" test_iter: 4 test_interval: 4')
HAS_CUPY = importlib.util.find_spec("cupy") is not None


def brewnet(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_train_prints_caffe_lines_and_snapshots_then_test_scores(tiny):
    (tiny.folder / "snaps").mkdir()
    path = tiny.solver(BODY)
    result = brewnet("train", "--solver", path)
    assert result.exit_code == 0, result.output
    err = result.stderr
    for pattern in (r"Iteration 0 \([\d.e+-]+ iter/s, [\d.e+-]+s/2 iters\), loss = [\d.]+",
                    r"    Train net output #0: loss = [\d.]+ \(\* 1 = [\d.]+ loss\)",
                    r"Iteration 4, lr = 0\.05\n", r"Iteration 4, Testing net \(#0\)",
                    r"    Test net output #0: acc = [\d.]+\n", r"    Test net output #1: loss = [\d.]+ \(\* 1 = ",
                    r"Snapshotting to binary proto file snaps/tiny_iter_4\.caffemodel",
                    r"Snapshotting solver state to binary proto file snaps/tiny_iter_8\.solverstate",
                    r"Iteration 8, loss = [\d.]+", r"Optimization Done\.", r"Solving tiny"):
        assert re.search(pattern, err), pattern
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(GLOG.match(line) for line in lines), [line for line in lines if not GLOG.match(line)][:3]
    assert "\r" not in err  # no progress line when stderr is not a terminal
    names = sorted(p.name for p in (tiny.folder / "snaps").iterdir())
    logs = [n for n in names if re.fullmatch(r"tiny\.\d{8}-\d{6}\.\d+\.log", n)]
    assert names == sorted(logs + ["tiny.INFO",
        "tiny_iter_4.caffemodel", "tiny_iter_4.solverstate", "tiny_iter_4.solverstate.resume.json",
        "tiny_iter_8.caffemodel", "tiny_iter_8.solverstate", "tiny_iter_8.solverstate.resume.json"])
    # the default log, as caffe.INFO: the console's lines, and PREFIX.INFO links to it
    assert len(logs) == 1 and os.readlink(tiny.folder / "snaps" / "tiny.INFO") == logs[0]
    in_file = (tiny.folder / "snaps" / logs[0]).read_text().splitlines()
    assert [line[line.index("]"):] for line in in_file] == [line[line.index("]"):] for line in lines]

    scored = brewnet("test", "--model", "net.prototxt", "--weights", "snaps/tiny_iter_8.caffemodel",
                     "--iterations", 4)
    assert scored.exit_code == 0, scored.output
    assert len(re.findall(r"Batch \d, acc = ", scored.stderr)) == 4
    assert re.search(r"\] acc = [\d.]+\n", scored.stderr)
    assert re.search(r"\] loss = [\d.]+ \(\* 1 = [\d.]+ loss\)", scored.stderr)


def test_resume_and_finetune_flags(tiny):
    (tiny.folder / "snaps").mkdir()
    path = tiny.solver(BODY)
    assert brewnet("train", "--solver", path).exit_code == 0
    resumed = brewnet("train", "--solver", path, "--snapshot", "snaps/tiny_iter_4.solverstate")
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming from snaps/tiny_iter_4.solverstate" in resumed.stderr
    assert "Iteration 0, Testing" not in resumed.stderr and "Iteration 4, Testing net (#0)" in resumed.stderr

    tuned = brewnet("train", "--solver", path, "--weights", "snaps/tiny_iter_8.caffemodel")
    assert tuned.exit_code == 0, tuned.output
    assert "Finetuning from snaps/tiny_iter_8.caffemodel" in tuned.stderr
    assert "Copied weights for layers: ip1, ip2" in tuned.stderr

    both = brewnet("train", "--solver", path, "--weights", "a.caffemodel", "--snapshot", "b.solverstate")
    assert both.exit_code == 1
    assert "brewnet: error: give --snapshot to resume training or --weights to finetune, not both" in both.stderr
    assert "Traceback" not in both.output


def test_log_file_tensorboard_eta_and_repeated_test_data(tiny, request):
    (tiny.folder / "snaps").mkdir()
    path = tiny.solver(BODY)
    options = ["--log", "run.log"]
    has_board = importlib.util.find_spec("tensorboardX") is not None
    if has_board:
        options += ["--tensorboard", "tb"]
    result = brewnet("train", "--solver", path, *options)
    assert result.exit_code == 0, result.output
    # the ETA of the display lines: a line of its own after the outputs, once a rate is known
    assert re.search(r"\]     ETA \d+:\d\d:\d\d: 6 iterations to go at [\d.e+-]+ iter/s\n", result.stderr)
    assert "ETA" not in result.stderr.split("Iteration 2 (")[0]
    assert (tiny.folder / "run.log").read_text().count("Test net output #0: acc = ") == 3
    assert not [p for p in (tiny.folder / "snaps").iterdir() if p.name.endswith((".log", ".INFO"))]
    if has_board:
        scalars = request.getfixturevalue("read_scalars")(tiny.folder / "tb")
        assert [step for step, _ in scalars["test/acc"]] == [0, 4, 8]
        assert [step for step, _ in scalars["train/loss"]] == [0, 2, 4, 6]
        assert scalars["learning_rate"] == [(0, 0.1), (2, 0.1), (4, 0.05), (6, 0.05)]
    assert brewnet("train", "--solver", path, "--log", "none").exit_code == 0
    assert not [p for p in (tiny.folder / "snaps").iterdir() if p.name.endswith(".log")]
    bad = brewnet("train", "--solver", path, "--log", "snaps")
    assert bad.exit_code == 1 and bad.stderr.startswith("brewnet: error: snaps: --log: cannot write the log file")

    # 16 samples in batches of 4: 4 iterations read them once, 6 read them 1.5 times
    once = brewnet("test", "--model", "net.prototxt", "--weights", "snaps/tiny_iter_8.caffemodel", "--iterations", 4)
    assert once.exit_code == 0 and "reads it" not in once.stderr
    twice = brewnet("test", "--model", "net.prototxt", "--weights", "snaps/tiny_iter_8.caffemodel", "--iterations", 6)
    assert twice.exit_code == 0
    assert ("--iterations 6 x batch 4 = 24 samples, but the data of layer 'data' holds 16: the test reads it 1.5 "
            "times over (--iterations 4 covers it once)") in twice.stderr


def test_user_mistakes_are_one_line(tiny):
    (tiny.folder / "snaps").mkdir()
    missing_net = tiny.solver(BODY, net="nope.prototxt")
    result = brewnet("train", "--solver", missing_net)
    assert result.exit_code == 1
    assert "brewnet: error: " in result.stderr and "net: net file 'nope.prototxt' not found" in result.stderr
    assert "Traceback" not in result.output
    result = brewnet("train", "--solver", "absent.prototxt")
    assert result.exit_code == 1 and "absent.prototxt: solver file not found" in result.stderr
    result = brewnet("test", "--model", "net.prototxt", "--weights", "absent.caffemodel")
    assert result.exit_code == 1 and "absent.caffemodel: weights file not found" in result.stderr


def test_divergence_is_one_line(tiny):
    (tiny.folder / "snaps").mkdir()
    path = tiny.solver(BODY.replace("base_lr: 0.1", "base_lr: 1e30"))
    result = brewnet("train", "--solver", path)
    assert result.exit_code == 1
    [line] = [l for l in result.stderr.splitlines() if l.startswith("brewnet: error:")]
    assert "training diverged" in line and "at iteration" in line and "layer '" in line
    assert "Traceback" not in result.output


@pytest.mark.skipif(HAS_CUPY, reason="checks the behaviour without cupy")
def test_gpu_without_cupy(tiny):
    (tiny.folder / "snaps").mkdir()
    gpu_file = tiny.solver(BODY.replace("max_iter: 8", "max_iter: 1") + " solver_mode: GPU", name="gpu.prototxt")
    text = gpu_file.read_text().replace("solver_mode: CPU\n", "")
    gpu_file.write_text(text)
    result = brewnet("train", "--solver", gpu_file)
    assert result.exit_code == 0, result.output
    assert "solver_mode GPU requested but no GPU is available; running on CPU" in result.stderr
    forced = brewnet("train", "--solver", gpu_file, "--gpu", "0")
    assert forced.exit_code == 1
    assert "pip install 'brewnet[gpu]'" in forced.stderr and "Traceback" not in forced.output


def test_device_lists_numpy_and_gpus():
    result = brewnet("device")
    assert result.exit_code == 0, result.output
    assert re.search(r"^numpy: \d", result.stdout, re.M)
    assert "BLAS: " in result.stdout and "CPU threads: " in result.stdout
    assert "GPU" in result.stdout
    from brewnet.layers.kernels import onednn

    want = onednn.library().path if onednn.available() else "not installed"
    assert re.search(r"^oneDNN convolutions: " + re.escape(want), result.stdout, re.M), result.stdout


def test_device_says_when_onednn_is_turned_off(monkeypatch):
    monkeypatch.setenv("BREWNET_ONEDNN", "0")
    result = brewnet("device")
    assert "oneDNN convolutions: off (BREWNET_ONEDNN=0)" in result.stdout


def test_sigint_stops_a_running_train_with_a_snapshot(tiny):
    (tiny.folder / "snaps").mkdir()
    path = tiny.solver(BODY.replace("max_iter: 8", "max_iter: 1000000").replace("snapshot: 4", "snapshot: 0")
                       .replace("test_iter: 4 test_interval: 4", ""))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "brewnet", "train", "--solver", str(path)], cwd=tiny.folder,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = ""
        deadline = time.monotonic() + 60
        while "Iteration 2 (" not in seen and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        assert "Iteration 2 (" in seen, seen
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "Optimization stopped early." in rest
    snaps = sorted(p.name for p in (tiny.folder / "snaps").iterdir() if not p.name.endswith((".log", ".INFO")))
    assert len(snaps) == 3 and snaps[0].endswith(".caffemodel") and snaps[1].endswith(".solverstate")
    assert snaps[2] == snaps[1] + ".resume.json"
    assert not [p for p in tiny.folder.iterdir() if ".tmp" in p.name]


class FakeTerminal:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_line_on_terminals_stays_below_log_lines():
    import logging

    from brewnet.solver.log import GlogHandler, Progress

    term = FakeTerminal()
    progress = Progress(term, min_interval=0)
    handler = GlogHandler(term)
    handler.progress = progress
    progress.start(0, 10)
    progress.update(5)
    assert term.text.startswith("\r\033[Kiter 5/10  ") and "it/s  ETA " in term.text
    drawn = len(term.text)
    handler.emit(logging.LogRecord("brewnet.solver", logging.INFO, "solver.py", 1, "Iteration 5, lr = 0.1", None,
                                   None))
    after = term.text[drawn:]
    # erase the progress line, print the record on its own line, redraw the progress line
    assert after.startswith("\r\033[K")
    assert re.search(r"\r\033\[KI\d{4} .*\] Iteration 5, lr = 0\.1\niter 5/10", after)
    progress.close()
    assert term.text.endswith("\r\033[K")
    assert not Progress(io.StringIO()).enabled  # pipes and files get no progress line
