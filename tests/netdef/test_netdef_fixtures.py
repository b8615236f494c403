"""Real Caffe files: every BVLC prototxt, every real .caffemodel (V1 and V2), HDF5 weights,
and the solver states Caffe wrote."""

import numpy
import pytest

from brewnet import netdef
from brewnet.netdef import caffe_pb2


def _prototxts(root):
    return sorted((root / "bvlc-caffe").rglob("*.prototxt"))


def test_every_bvlc_prototxt_parses_and_round_trips(fixtures, tmp_path):
    paths = _prototxts(fixtures)
    assert len(paths) >= 20
    solvers = 0
    for path in paths:
        kind, message = netdef.read_net_or_solver(path)
        solvers += kind == "solver"
        netdef.write_binary(message, tmp_path / "m.bin")
        again = type(message).FromString((tmp_path / "m.bin").read_bytes())
        netdef.write_text(again, tmp_path / "m.prototxt")
        back = netdef.read_text(tmp_path / "m.prototxt", type(message)())
        assert back == message, path
    assert 0 < solvers < len(paths)


def _caffemodels(root):
    return sorted(p for p in (root / "real-models").rglob("*.caffemodel"))


def _raw_net(path):
    return caffe_pb2.NetParameter.FromString(path.read_bytes())


def _blob_arrays(layers):
    return {layer.name: [netdef.blob_to_array(b) for b in layer.blobs] for layer in layers if len(layer.blobs)}


def test_every_real_caffemodel_parses_and_v1_upgrades_keep_blobs(fixtures):
    paths = _caffemodels(fixtures)
    assert len(paths) >= 10
    v1_models = 0
    for path in paths:
        raw = _raw_net(path)
        net = netdef.read_weights(path)
        assert len(net.layer) > 0 and not net.layers, path
        assert all(layer.type for layer in net.layer), path
        if len(raw.layers):
            v1_models += 1
            before, after = _blob_arrays(raw.layers), _blob_arrays(net.layer)
        else:
            before, after = _blob_arrays(raw.layer), _blob_arrays(net.layer)
        assert before.keys() == after.keys() and before, path
        for name in before:
            for old, new in zip(before[name], after[name], strict=True):
                numpy.testing.assert_array_equal(old, new)
    assert v1_models >= 3  # everpeace+caffe's LeNet and CIFAR-10 nets


def test_v1_lenet_types_after_upgrade(fixtures):
    path = fixtures / "real-models/everpeace+caffe/examples/mnist/lenet_iter_10000.caffemodel"
    net = netdef.read_weights(path)
    assert [layer.type for layer in net.layer] == [
        "Data", "Convolution", "Pooling", "Convolution", "Pooling", "InnerProduct", "ReLU",
        "InnerProduct", "SoftmaxWithLoss"]
    assert netdef.blob_to_array(net.layer[1].blobs[0]).shape == (20, 1, 5, 5)


ARM = "real-models/ARM-software+ML-examples/cmsisnn-cifar10/models"


@pytest.mark.parametrize("h5_name, binary_name", [
    ("cifar10_m4_iter_70000.caffemodel.h5", "quantized_cifar10_m4_iter_70000.caffemodel"),
    ("cifar10_m7_iter_300000.caffemodel.h5", "quantized_cifar10_m7_iter_300000.caffemodel"),
])
def test_hdf5_caffemodels_read_and_match_the_binary_version(fixtures, h5_name, binary_name):
    h5 = _blob_arrays(netdef.read_weights(fixtures / ARM / h5_name).layer)
    binary = _blob_arrays(netdef.read_weights(fixtures / ARM / binary_name).layer)
    assert h5.keys() == binary.keys() and len(h5) == 4
    for name in h5:
        # the binary files hold the same run's weights after 8-bit fixed-point quantization
        # (with saturation; some biases became 0), so they agree in layout, and weights closely
        assert [a.shape for a in h5[name]] == [b.shape for b in binary[name]], name
        weights, quantized = h5[name][0], binary[name][0]
        assert weights.dtype == numpy.float32
        assert numpy.linalg.norm(weights - quantized) < 0.05 * numpy.linalg.norm(weights), name


def test_hdf5_weights_round_trip_equals_binary(fixtures, tmp_path):
    net = netdef.read_weights(fixtures / ARM / "quantized_cifar10_m4_iter_70000.caffemodel")
    netdef.write_weights(net, tmp_path / "w.caffemodel.h5")
    back = netdef.read_weights(tmp_path / "w.caffemodel.h5")
    assert _blob_arrays(back.layer).keys() == _blob_arrays(net.layer).keys()
    for name, blobs in _blob_arrays(net.layer).items():
        for a, b in zip(blobs, _blob_arrays(back.layer)[name], strict=True):
            numpy.testing.assert_array_equal(a, b)
    assert sorted(layer.name for layer in back.layer) == sorted(layer.name for layer in net.layer)


def test_solver_fixture_solverstates_read(fixtures):
    paths = sorted((fixtures / "caffe-reference/solvers").glob("*/snap_iter_6.solverstate"))
    assert len(paths) >= 10
    for path in paths:
        state = netdef.read_solverstate(path)
        assert state.iter == 6 and state.learned_net.endswith("snap_iter_6.caffemodel")
        shapes = [netdef.blob_to_array(h).shape for h in state.history]
        assert shapes[:4] == [(3, 2, 3, 3), (3,), (4, 27), (4,)], path


def test_solverstate_round_trips_binary_and_hdf5(fixtures, tmp_path):
    state = netdef.read_solverstate(fixtures / "caffe-reference/solvers/adam/snap_iter_6.solverstate")
    netdef.write_solverstate(state, tmp_path / "s.solverstate")
    assert netdef.read_solverstate(tmp_path / "s.solverstate") == state
    netdef.write_solverstate(state, tmp_path / "s.solverstate.h5")
    back = netdef.read_solverstate(tmp_path / "s.solverstate.h5")
    assert (back.iter, back.learned_net, back.current_step) == (state.iter, state.learned_net, state.current_step)
    assert len(back.history) == len(state.history) == 8
    for a, b in zip(state.history, back.history):
        numpy.testing.assert_array_equal(netdef.blob_to_array(a), netdef.blob_to_array(b))


def test_legacy_enum_solver_fixture_upgrades(fixtures):
    solver = netdef.read_solver(fixtures / "caffe-reference/solvers/legacy_enum_adagrad/solver.prototxt")
    assert solver.type == "AdaGrad" and not solver.HasField("solver_type")
