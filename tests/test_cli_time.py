"""`brewnet time`: the per-layer benchmark table, like `caffe time`."""

import re

from click.testing import CliRunner

from brewnet.cli import main


def test_time_prints_the_per_layer_table(fixtures):
    model = fixtures / "bvlc-caffe" / "examples" / "mnist" / "lenet.prototxt"
    result = CliRunner().invoke(main, ["time", "--model", str(model), "--iterations", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "type"])
    rows = [line.split() for line in lines[header + 1:header + 10]]
    assert [r[0] for r in rows] == ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"]
    assert rows[1][1] == "Convolution" and all(float(r[2]) >= 0 and float(r[3]) >= 0 for r in rows)
    assert float(rows[1][2]) > 0  # a convolution of 64 images takes measurable time
    for label in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward"):
        assert re.search(rf"^{label}: [0-9.]+ ms\.$", result.output, re.M), label
    assert re.search(r"^Throughput: [0-9.]+ images/s \(batch 64\)$", result.output, re.M)


def test_time_reports_user_errors_in_one_line(tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer { name: "a" type: "ReLU" bottom: "missing" top: "a" }\n')
    result = CliRunner().invoke(main, ["time", "--model", str(bad), "--iterations", "1"])
    assert result.exit_code == 1
    assert "unknown bottom blob 'missing'" in result.output and "Traceback" not in result.output
