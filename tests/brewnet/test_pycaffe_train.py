"""A Python layer module written for Caffe (`import caffe`, `class X(caffe.Layer)`,
param_str, blobs.add_blob) used unchanged from a prototxt by `brewnet train`,
spelled as `caffe train` is."""

import os
import pathlib
import subprocess
import sys

from brewnet.netdef import read_weights

ROOT = pathlib.Path(__file__).resolve().parents[2]

# a layer as pycaffe users write them: nothing of brewnet's in it
CAFFE_LAYER = '''
import caffe
import numpy as np


class LearnedScale(caffe.Layer):
    """top = s * w * bottom: s from param_str, w one learnable value (starts at 1)."""

    def setup(self, bottom, top):
        if len(bottom) != 1:
            raise Exception("LearnedScale takes one bottom")
        self.s = float(self.param_str)
        self.blobs.add_blob(1)
        self.blobs[0].data[...] = 1
        with open("phase.txt", "a") as f:
            f.write("%d\\n" % self.phase)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.s * self.blobs[0].data[0] * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] += self.s * np.sum(top[0].diff * bottom[0].data)
        if propagate_down[0]:
            bottom[0].diff[...] = self.s * self.blobs[0].data[0] * top[0].diff
'''

NET = '''name: "pynet"
layer { name: "data" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 8 dim: 4 } shape { dim: 8 dim: 3 }
                     data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 0.5 } } }
layer { name: "scale" type: "Python" bottom: "x" top: "sx"
  python_param { module: "caffe_layers" layer: "LearnedScale" param_str: "2" } }
layer { name: "ip" type: "InnerProduct" bottom: "sx" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
'''

SOLVER = '''net: "net.prototxt"
test_iter: 1 test_interval: 5
base_lr: 0.05 lr_policy: "fixed" momentum: 0.9
max_iter: 5 display: 1 random_seed: 7
snapshot_prefix: "snap"
'''


def test_brewnet_train_runs_a_caffe_python_layer_unchanged(tmp_path):
    (tmp_path / "caffe_layers.py").write_text(CAFFE_LAYER)
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(SOLVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's brewnet; the layer module comes from the cwd
    # Caffe's spellings: -solver, -sigint_effect (gflags' single dash, Caffe's underscore)
    proc = subprocess.run([sys.executable, "-m", "brewnet", "train", "-solver", "solver.prototxt",
                           "-sigint_effect", "snapshot", "--sighup_effect=none"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "`import caffe` gives brewnet.pycaffe (a Python layer's module imports caffe)" in proc.stderr
    assert "Iteration 5, loss = " in proc.stderr and "Optimization Done." in proc.stderr
    assert (tmp_path / "phase.txt").read_text().split() == ["0", "1"]  # the train net, then the test net
    weights = {layer.name: layer for layer in read_weights(str(tmp_path / "snap_iter_5.caffemodel")).layer}
    learned = weights["scale"].blobs[0].data  # the layer's add_blob parameter was trained and saved
    assert len(learned) == 1 and learned[0] != 1.0


def test_device_query_is_an_alias_of_device():
    from click.testing import CliRunner

    from brewnet.cli import main

    plain = CliRunner().invoke(main, ["device"])
    for name in ("device_query", "device-query"):
        result = CliRunner().invoke(main, [name])
        assert result.exit_code == 0 and result.output.splitlines()[0] == plain.output.splitlines()[0]
