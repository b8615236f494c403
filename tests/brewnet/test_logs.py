"""`brewnet parse-log` and `brewnet plot` on real Caffe logs and brewnet's."""

import csv
import importlib.util
import os
import pathlib
import sys

import pytest
from click.testing import CliRunner

from brewnet.cli import main

FIXTURES = os.environ.get("BREWNET_FIXTURES")
CAFFE_LOG = pathlib.Path(FIXTURES or "/nonexistent") / "caffe-logs" / "caffe_lenet_train.log"
needs_log = pytest.mark.skipif(not CAFFE_LOG.is_file(), reason="needs BREWNET_FIXTURES (caffe-logs)")
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"

BREWNET_LOG = """\
I1204 10:00:00.000000 7 solver.py:1] Solving tiny
I1204 10:00:00.100000 7 solver.py:1] Iteration 0, Testing net (#0)
I1204 10:00:00.200000 7 solver.py:1]     Test net output #0: acc = 0.25
I1204 10:00:00.200100 7 solver.py:1]     Test net output #1: loss = 1.5 (* 1 = 1.5 loss)
I1204 10:00:00.300000 7 solver.py:1] Iteration 0 (0 iter/s, 0.3s/2 iters), loss = 1.4
I1204 10:00:00.300100 7 solver.py:1]     Train net output #0: loss = 1.4 (* 1 = 1.4 loss)
I1204 10:00:00.300200 7 solver.py:1] Iteration 0, lr = 0.1
I1204 10:00:01.300000 7 solver.py:1] Iteration 2 (2 iter/s, 1s/2 iters), loss = 1.1
I1204 10:00:01.300100 7 solver.py:1]     Train net output #0: loss = 1.1 (* 1 = 1.1 loss)
I1204 10:00:01.300150 7 solver.py:1]     ETA 0:00:01: 2 iterations to go at 2 iter/s
I1204 10:00:01.300200 7 solver.py:1] Iteration 2, lr = 0.05
I1204 10:00:02.000000 7 solver.py:1] Iteration 4, loss = 0.9
I1204 10:00:02.100000 7 solver.py:1] Iteration 4, Testing net (#0)
I1204 10:00:02.200000 7 solver.py:1]     Test net output #0: acc = 0.75
I1204 10:00:02.200100 7 solver.py:1]     Test net output #1: loss = 0.5 (* 1 = 0.5 loss)
"""


def brewnet(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@needs_log
def test_parse_log_of_a_real_caffe_log(tmp_path):
    result = brewnet("parse-log", CAFFE_LOG, tmp_path / "out", "--verbose")
    assert result.exit_code == 0, result.output
    train, test = tmp_path / "out/caffe_lenet_train.log.train", tmp_path / "out/caffe_lenet_train.log.test"
    assert result.output.splitlines() == [f"Wrote {train}", f"Wrote {test}"]
    rows = _rows(test)
    assert rows[0] == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    assert [r[0] for r in rows[1:]] == ["0", "200", "400", "600"] and rows[-1][3:] == ["0.9699", "0.0958716"]
    assert _rows(train)[1] == ["0", "1.881912", "0.01", "2.34514"]
    tabbed = brewnet("parse_log", CAFFE_LOG, tmp_path, "--delimiter", "\t")
    assert tabbed.exit_code == 0 and tabbed.output == ""
    assert (tmp_path / "caffe_lenet_train.log.train").read_text().startswith("NumIters\tSeconds\tLearningRate\tloss")


def test_parse_log_of_a_brewnet_log_and_its_errors(tmp_path):
    log = tmp_path / "tiny.log"
    log.write_text(BREWNET_LOG)
    assert brewnet("parse-log", log, tmp_path).exit_code == 0
    assert _rows(tmp_path / "tiny.log.train") == [["NumIters", "Seconds", "LearningRate", "loss"],
                                                  ["0", "0.3001", "0.1", "1.4"], ["2", "1.3001", "0.05", "1.1"]]
    assert _rows(tmp_path / "tiny.log.test")[1:] == [["0", "0.2", "0.1", "0.25", "1.5"], ["4", "2.2", "0.05", "0.75", "0.5"]]
    (tmp_path / "empty.log").write_text("nothing here\n")
    result = brewnet("parse-log", tmp_path / "empty.log", tmp_path)
    assert result.exit_code == 0 and "Not writing the train table" in result.output
    missing = brewnet("parse-log", tmp_path / "none.log", tmp_path)
    assert missing.exit_code == 1 and missing.output.strip() == f"brewnet: error: {tmp_path / 'none.log'}: log file not found"


@needs_matplotlib
@needs_log
def test_plot_several_logs_in_both_argument_orders(tmp_path):
    log = tmp_path / "tiny.log"
    log.write_text(BREWNET_LOG)
    result = brewnet("plot", log, CAFFE_LOG, tmp_path / "acc.png")
    assert result.exit_code == 0, result.output
    assert "Test accuracy vs. Iters of 2 log(s)" in result.output
    assert (tmp_path / "acc.png").read_bytes().startswith(PNG)
    caffe_order = brewnet("plot", "7", tmp_path / "loss.png", log, CAFFE_LOG)  # train loss vs. seconds
    assert caffe_order.exit_code == 0 and "Train loss vs. Seconds" in caffe_order.output
    for args in (["--y", "lr", "--x", "seconds"], ["--chart", "2"], ["--field", "loss#0"][:0] + ["--field", "acc"]):
        assert brewnet("plot", log, tmp_path / "x.svg", *args).exit_code == 0, args
    assert (tmp_path / "x.svg").read_text().lstrip().startswith("<?xml")


@needs_matplotlib
def test_plot_errors_are_one_line(tmp_path):
    log = tmp_path / "tiny.log"
    log.write_text(BREWNET_LOG.replace("acc =", "top1 ="))
    result = brewnet("plot", log, tmp_path / "acc.png")
    assert result.exit_code == 1
    assert result.output.strip() == (f"brewnet: error: {log}: no test output 'accuracy' in this log "
                                     "(test outputs: top1, loss); choose one with --field")
    assert "the last argument must be the image" in brewnet("plot", log, tmp_path / "out.csv").output
    assert "log file not found" in brewnet("plot", tmp_path / "no.log", tmp_path / "a.png").output


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    log = tmp_path / "tiny.log"
    log.write_text(BREWNET_LOG)
    result = brewnet("plot", log, tmp_path / "a.png")
    assert result.exit_code == 1
    assert result.output.strip() == "brewnet: error: brewnet plot needs matplotlib: pip install 'brewnet[plot]'"


@needs_matplotlib
def test_plot_writes_tensorboard_scalars(tmp_path, read_scalars):
    log = tmp_path / "tiny.log"
    log.write_text(BREWNET_LOG)
    result = brewnet("plot", log, tmp_path / "a.png", "--tensorboard", tmp_path / "tb")
    assert result.exit_code == 0, result.output
    scalars = read_scalars(tmp_path / "tb" / "tiny")
    assert sorted(scalars) == ["learning_rate", "test/acc", "test/loss", "train/loss", "train/smoothed_loss"]
    assert scalars["test/acc"] == [(0, 0.25), (4, 0.75)]



def test_tensorboard_without_tensorboardx_names_the_extra(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    log = tmp_path / "tiny.log"
    log.write_text(BREWNET_LOG)
    result = brewnet("plot", log, tmp_path / "a.png", "--tensorboard", tmp_path / "tb")
    assert result.exit_code == 1
    assert result.output.strip() == ("brewnet: error: --tensorboard needs tensorboardX: "
                                              "pip install 'brewnet[tensorboard]'")
