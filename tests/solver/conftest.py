"""Small synthetic training setups for the solver tests: an HDF5 data set in
tmp_path, a net reading it, and solver files."""

import logging

import h5py
import numpy
import pytest

N_SAMPLES = 16  # batch 4: one epoch is 4 iterations
BATCH = 4

NET = """
name: "tiny"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "train_list.txt" batch_size: %(batch)d } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc" include { phase: TEST } }
"""


class TinySetup:
    """Writes data.h5 + train_list.txt + net.prototxt into ``folder`` and solver files on demand."""

    def __init__(self, folder):
        self.folder = folder
        rng = numpy.random.default_rng(0)
        data = rng.normal(size=(N_SAMPLES, 6)).astype(numpy.float32)
        label = rng.integers(0, 3, size=N_SAMPLES).astype(numpy.float32)
        self.write_data(data, label)
        (folder / "net.prototxt").write_text(NET % {"batch": BATCH})

    def write_data(self, data, label):
        with h5py.File(self.folder / "data.h5", "w") as f:
            f["data"] = data
            f["label"] = label
        (self.folder / "train_list.txt").write_text("data.h5\n")

    def solver(self, body, name="solver.prototxt", net="net.prototxt", seed=3):
        text = f'net: "{net}"\nsolver_mode: CPU\nrandom_seed: {seed}\n{body}\n'
        path = self.folder / name
        path.write_text(text)
        return path


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A TinySetup in tmp_path, which is also the current folder (Caffe resolves from there)."""
    monkeypatch.chdir(tmp_path)
    return TinySetup(tmp_path)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI installs a glog handler on the 'brewnet' logger; take it off again."""
    logger = logging.getLogger("brewnet")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate
    from brewnet.layers.kernels import backend

    backend.set_mode_cpu()
