"""Reading training logs (brewnet.solver.logparse) and the recent-window rate of the ETA."""

import os
import pathlib

import pytest

from brewnet.solver import logparse
from brewnet.solver.log import RecentRate, format_eta

FIXTURES = os.environ.get("BREWNET_FIXTURES")
CAFFE_LOG = pathlib.Path(FIXTURES or "/nonexistent") / "caffe-logs" / "caffe_lenet_train.log"
OLD_CAFFE_LOG = pathlib.Path(FIXTURES or "/nonexistent") / "real-models/everpeace+caffe/examples/cifar10/train_log.txt"


def _parse_lines(lines, year=2020):
    parser = logparse.LogParser(year=year)
    for line in lines:
        parser.feed(line)
    return parser.finish()


@pytest.mark.skipif(not CAFFE_LOG.is_file(), reason="needs BREWNET_FIXTURES (caffe-logs)")
def test_real_caffe_log_with_the_year_in_its_prefix():
    parsed = logparse.parse_log(CAFFE_LOG)
    # display every 50 iterations up to 550 (the last one, 600, prints no outputs); tests every 200
    assert [row["NumIters"] for row in parsed.train] == list(range(0, 600, 50))
    assert [row["NumIters"] for row in parsed.test] == [0, 200, 400, 600]
    assert logparse.columns(parsed.test) == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    first, last = parsed.test[0], parsed.test[-1]
    assert (first["accuracy"], first["loss"]) == (0.1024, 2.31613)
    assert (last["accuracy"], last["loss"]) == (0.9699, 0.0958716)
    # seconds since "Solving LeNet" at 14:38:01.193626; each row's own iteration's rate
    assert first["Seconds"] == pytest.approx(3.047129 - 1.193626)
    assert parsed.train[1]["LearningRate"] == 0.00996266 and parsed.train[0]["LearningRate"] == 0.01
    assert parsed.test[1]["LearningRate"] == 0.00985258
    assert parsed.train[-1]["loss"] == 0.109095
    # the display lines' smoothed loss, the final one included
    assert parsed.display_loss[0][::2] == (0, 2.34514) and parsed.display_loss[-1][::2] == (600, 0.098751)
    seconds = [row["Seconds"] for row in parsed.train]
    assert seconds == sorted(seconds)


@pytest.mark.skipif(not OLD_CAFFE_LOG.is_file(), reason="needs BREWNET_FIXTURES (real-models)")
def test_old_caffe_log_without_rates_in_the_display_line():
    parsed = logparse.parse_log(OLD_CAFFE_LOG)
    assert parsed.test[0]["NumIters"] == 0 and parsed.test[-1]["NumIters"] == 5000
    assert parsed.test[-1]["accuracy"] == 0.7491
    assert parsed.train[-1]["NumIters"] == 4900
    assert parsed.display_loss[0][::2] == (0, 2.30245)


def test_year_rollover_test_nets_and_rates():
    lines = [
        "I1231 23:59:58.000000 1 solver.cpp:1] Solving net",
        "I1231 23:59:58.500000 1 solver.cpp:1] Iteration 0, Testing net (#0)",
        "I1231 23:59:59.000000 1 solver.cpp:1]     Test net output #0: loss = 2",
        "I1231 23:59:59.100000 1 solver.cpp:1] Iteration 0, Testing net (#1)",
        "I1231 23:59:59.200000 1 solver.cpp:1]     Test net output #0: loss = 3",
        "I1231 23:59:59.300000 1 solver.cpp:1] Iteration 0 (0 iter/s, 0.1s/10 iters), loss = 2.5",
        "I1231 23:59:59.400000 1 solver.cpp:1]     Train net output #0: loss = 2.5 (* 1 = 2.5 loss)",
        "I1231 23:59:59.500000 1 solver.cpp:1] Iteration 0, lr = 0.1",
        "not a log line: Iteration 99, lr = 7",
        "I0101 00:00:01.000000 1 solver.cpp:1] Iteration 10 (1 iter/s, 1s/10 iters), loss = 1e-3",
        "I0101 00:00:01.100000 1 solver.cpp:1]     Train net output #0: loss = 1.5e-03",
        "I0101 00:00:01.200000 1 solver.cpp:1]     ETA 0:00:10: 10 iterations to go at 1 iter/s",
        "I0101 00:00:01.300000 1 solver.cpp:1] Iteration 10, lr = 0.05",
        "I0101 00:00:02.000000 1 solver.cpp:1] Iteration 15, Testing net (#0)",
        "I0101 00:00:02.500000 1 solver.cpp:1]     Test net output #0: loss = nan",
    ]
    parsed = _parse_lines(lines)
    assert [dict(r) for r in parsed.train] == [
        {"NumIters": 0, "Seconds": 1.4, "LearningRate": 0.1, "loss": 2.5},
        {"NumIters": 10, "Seconds": 3.1, "LearningRate": 0.05, "loss": 0.0015}]
    assert list(parsed.test[0].items()) == [("NumIters", 0), ("Seconds", 1.0), ("LearningRate", 0.1), ("loss", 2.0),
                                            ("loss#1", 3.0)]
    # a test between displays has the last rate read
    assert parsed.test[1]["NumIters"] == 15 and parsed.test[1]["LearningRate"] == 0.05
    assert parsed.test[1]["loss"] != parsed.test[1]["loss"]  # nan
    assert parsed.display_loss == [(0, 1.3, 2.5), (10, 3.0, 1e-3)]


def test_csv_files_as_parse_log_writes_them(tmp_path):
    parsed = _parse_lines([
        "I20200101 00:00:00.000000 1 s.cpp:1] Solving x",
        "I20200101 00:00:01.000000 1 s.cpp:1] Iteration 0, Testing net (#0)",
        "I20200101 00:00:02.000000 1 s.cpp:1]     Test net output #0: accuracy = 0.5",
    ])
    written = logparse.save_csv_files(tmp_path / "run.log", tmp_path, parsed)
    assert written == [str(tmp_path / "run.log.test")]  # no train outputs: no train file
    assert (tmp_path / "run.log.test").read_bytes() == b"NumIters,Seconds,LearningRate,accuracy\r\n0,2.0,nan,0.5\r\n"


def test_recent_rate_forgets_the_slow_start():
    rate = RecentRate(window=10)
    rate.add(0, now=0.0)
    rate.add(1, now=20.0)  # compiling, the first test
    for second in range(21, 51):
        rate.add(1 + 10 * (second - 20), now=float(second))
    assert rate.rate() == pytest.approx(10.0)
    assert rate.eta(100) == pytest.approx(10.0)
    assert format_eta(rate.eta(36000)) == "1:00:00" and format_eta(None) == "--:--:--"
    assert RecentRate().rate() is None
