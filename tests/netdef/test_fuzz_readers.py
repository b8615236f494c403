"""Fuzzing the public readers: damaged prototxt text, binary .caffemodel, .solverstate,
.binaryproto, HDF5 weights and Datum records must end in a DefinitionError (one line for
the CLI), never another exception.

Inputs are real files of each kind with bytes flipped, inserted, deleted or cut, plus
random text. CI runs BREWNET_FUZZ_EXAMPLES cases per reader (default 60, derandomized
so a run is repeatable); a longer local run: BREWNET_FUZZ_EXAMPLES=5000 python -m pytest
tests/netdef/test_fuzz_readers.py.
"""

import os
import pathlib
import tempfile

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brewnet import netdef
from brewnet.layers.dataio import db
from brewnet.netdef import DefinitionError, caffe_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("BREWNET_FUZZ_EXAMPLES", 60))
FUZZ = settings(max_examples=EXAMPLES, derandomize=EXAMPLES <= 200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NET_TEXT = (ROOT / "configs" / "lenet" / "lenet_train_test.prototxt").read_text()
SOLVER_TEXT = (ROOT / "configs" / "lenet" / "lenet_solver.prototxt").read_text()
V1_TEXT = """name: "v1"
layers { name: "data" type: DATA top: "data" top: "label" data_param { source: "x" batch_size: 2 }
         transform_param { scale: 0.5 } }
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" blobs_lr: 1 weight_decay: 1
         convolution_param { num_output: 2 kernel_size: 3 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "conv" bottom: "label" }
"""


def _small_weights():
    net = caffe_pb2.NetParameter(name="w")
    for name, shape in (("conv1", (2, 1, 3, 3)), ("ip", (3, 4))):
        layer = net.layer.add(name=name, type="InnerProduct")
        layer.blobs.append(netdef.array_to_blob(numpy.arange(numpy.prod(shape), dtype=numpy.float32).reshape(shape)))
        layer.blobs.append(netdef.array_to_blob(numpy.ones(shape[0], numpy.float32)))
    return net


def _seed_files():
    folder = pathlib.Path(tempfile.mkdtemp(prefix="brewnet-fuzz-seeds-"))
    weights = _small_weights()
    netdef.write_weights(weights, folder / "w.caffemodel")
    netdef.write_weights(weights, folder / "w.caffemodel.h5")
    state = caffe_pb2.SolverState(iter=5, learned_net="w.caffemodel", current_step=1)
    state.history.append(netdef.array_to_blob(numpy.ones((2, 3), numpy.float32)))
    netdef.write_solverstate(state, folder / "s.solverstate")
    netdef.write_blobproto(numpy.ones((1, 3, 4, 4), numpy.float32), folder / "mean.binaryproto")
    return {name: (folder / name).read_bytes()
            for name in ("w.caffemodel", "w.caffemodel.h5", "s.solverstate", "mean.binaryproto")}


SEEDS = _seed_files()
DATUMS = [db.array_to_datum(numpy.arange(24, dtype=numpy.uint8).reshape(2, 3, 4), 3).SerializeToString(),
          db.array_to_datum(numpy.ones((1, 2, 2), numpy.float32), 1).SerializeToString()]


@st.composite
def damaged(draw, seed):
    """``seed`` with a few random edits: flips, insertions, deletions, a cut."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "cut", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "cut":
            del data[at:]
        elif kind == "splice":  # a varint-sized run of 0xff: absurd lengths and counts
            data[at:at] = b"\xff" * draw(st.integers(1, 10))
    return bytes(data)


def _only_definition_errors(read, *args):
    try:
        read(*args)
    except DefinitionError as exc:
        assert "\n" not in str(exc), f"a multi-line message: {exc}"


def _through_a_file(data, suffix, read):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz" + suffix)
        with open(path, "wb") as handle:
            handle.write(data)
        _only_definition_errors(read, path)


@FUZZ
@given(st.one_of(damaged(NET_TEXT.encode()), damaged(V1_TEXT.encode()), damaged(SOLVER_TEXT.encode()),
                 st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_prototxt_text(data):
    text = netdef.io.decode_text(data)
    _only_definition_errors(netdef.parse_net, text)
    _only_definition_errors(netdef.parse_solver, text)
    _through_a_file(data, ".prototxt", netdef.read_net_or_solver)


@FUZZ
@given(st.one_of(damaged(SEEDS["w.caffemodel"]), st.binary(max_size=300)))
def test_binary_weights(data):
    _through_a_file(data, ".caffemodel", netdef.read_weights)


@FUZZ
@given(damaged(SEEDS["w.caffemodel.h5"]))
def test_hdf5_weights(data):
    _through_a_file(data, ".caffemodel.h5", netdef.read_weights)


@FUZZ
@given(st.one_of(damaged(SEEDS["s.solverstate"]), st.binary(max_size=200)))
def test_solverstate(data):
    _through_a_file(data, ".solverstate", netdef.read_solverstate)


@FUZZ
@given(st.one_of(damaged(SEEDS["mean.binaryproto"]), st.binary(max_size=200)))
def test_binaryproto(data):
    _through_a_file(data, ".binaryproto", netdef.read_blobproto)
    _through_a_file(data, ".binaryproto", db.read_mean_file)


@FUZZ
@given(st.one_of(damaged(DATUMS[0]), damaged(DATUMS[1]), st.binary(max_size=100)))
def test_datum_records(data):
    def read(record):
        datum = db.parse_datum(record)
        db.datum_to_array(datum)
        db.datums_to_batch([datum, datum])

    _only_definition_errors(read, data)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_the_seeds_themselves_read(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(SEEDS[name])
    read = {".caffemodel": netdef.read_weights, ".h5": netdef.read_weights, ".solverstate": netdef.read_solverstate,
            ".binaryproto": netdef.read_blobproto}[path.suffix]
    assert read(str(path)) is not None
