"""brewnet.pycaffe, pycaffe's `caffe` module: Net and solvers with pycaffe's semantics
(a solver's nets are the Net users construct), caffe.io, NetSpec text, coord_map,
caffe.draw, Classifier/Detector and the module functions."""

import collections
import pathlib
import textwrap

import numpy
import pytest

import brewnet
import brewnet.pycaffe as caffe
from brewnet.netdef import caffe_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]

NET = """name: "tiny" force_backward: true
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 2 dim: 3 dim: 3 } shape { dim: 4 }
                     data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 2 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

DEPLOY = """name: "deploy"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 3 dim: 8 dim: 8 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    return path


@pytest.fixture
def solver_file(tmp_path, net_file):
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{net_file}" test_iter: 2 test_interval: 100 base_lr: 0.1 momentum: 0.9 '
                    f'lr_policy: "step" gamma: 0.5 stepsize: 2 max_iter: 4 display: 0 '
                    f'snapshot_after_train: false snapshot_prefix: "{tmp_path / "snap"}"\n')
    return path


def test_the_module_has_pycaffes_names():
    for name in ("Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
                 "AdamSolver", "get_solver", "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed",
                 "layer_type_list", "Layer", "NetSpec", "layers", "params", "to_proto", "Classifier", "Detector",
                 "has_nccl", "Timer", "NCCL", "init_log", "log", "io", "draw", "net_spec", "coord_map", "proto",
                 "TRAIN", "TEST", "solver_count", "set_solver_count", "solver_rank", "set_solver_rank"):
        assert hasattr(caffe, name), name
    assert caffe.Net is brewnet.Net and caffe.SGDSolver is brewnet.SGDSolver and caffe.Layer is brewnet.Layer
    assert caffe.proto.caffe_pb2 is caffe_pb2 and (caffe.TRAIN, caffe.TEST) == (0, 1)
    assert {"Python", "Data", "Convolution", "InnerProduct"} <= set(caffe.layer_type_list())
    assert caffe.has_nccl() is False
    timer = caffe.Timer()
    timer.start()
    timer.stop()
    assert timer.ms >= 0


def test_solver_nets_are_the_net_users_construct(solver_file):
    solver = caffe.SGDSolver(str(solver_file))
    assert type(solver.net) is caffe.Net and all(type(n) is caffe.Net for n in solver.test_nets)
    assert type(caffe.get_solver(str(solver_file))) is caffe.SGDSolver
    out = solver.net.forward()
    assert set(out) == {"loss"} and isinstance(out["loss"], numpy.ndarray)  # pycaffe's dict, not a loss float
    assert solver.lr == pytest.approx(0.1)
    calls = []
    solver.add_callback(lambda: calls.append("start"), lambda: calls.append("grads"))
    solver.step(3)
    assert calls == ["start", "grads"] * 3 and solver.iter == 3
    assert solver.lr == pytest.approx(0.05)  # step policy: gamma^(3 // 2)
    other = caffe.Net(str(solver_file.parent / "net.prototxt"), caffe.TEST)
    solver.share_weights(other)
    assert other.params["ip"][0] is solver.net.params["ip"][0]


def test_net_views_and_passes(net_file):
    net = caffe.Net(str(net_file), caffe.TRAIN)
    assert list(net.layer_dict) == net._layer_names == ["data", "conv", "ip", "loss"]
    assert net.top_names == collections.OrderedDict(
        [("data", ["data", "label"]), ("conv", ["conv"]), ("ip", ["ip"]), ("loss", ["loss"])])
    assert net.bottom_names["loss"] == ["ip", "label"] and net.bottom_names["data"] == []
    assert net.blob_loss_weights["loss"] == 1 and net.blob_loss_weights["ip"] == 0
    blob = net.blobs["data"]
    assert (blob.num, blob.channels, blob.height, blob.width, blob.count) == (4, 2, 3, 3, 72)
    assert (net.blobs["ip"].height, net.blobs["ip"].width) == (1, 1)

    seen = []
    for hook in ("before_forward", "after_forward", "before_backward", "after_backward"):
        getattr(net, hook)(lambda i, hook=hook: seen.append((hook, i)))
    out = net.forward(start="conv", end="ip", blobs=["conv"])
    assert set(out) == {"ip", "conv"}
    assert seen == [("before_forward", 1), ("after_forward", 1), ("before_forward", 2), ("after_forward", 2)]
    seen.clear()
    net.forward()
    diffs = net.backward(diffs=["ip"])
    assert set(diffs) == {"ip"} and numpy.any(diffs["ip"])
    assert [i for h, i in seen if h == "before_backward"] == [3, 2, 1, 0]

    # clear_param_diffs zeroes the arrays a user already holds
    held = net.params["conv"][0].diff
    assert numpy.any(held)
    net.clear_param_diffs()
    assert not numpy.any(held)


def test_forward_backward_all_batches_and_trims(tmp_path):
    path = tmp_path / "deploy.prototxt"
    path.write_text("force_backward: true\n" + DEPLOY)
    net = caffe.Net(str(path), caffe.TEST)
    x = numpy.random.default_rng(0).standard_normal((7, 3, 8, 8)).astype(numpy.float32)
    outs, diffs = net.forward_backward_all(data=x, prob=numpy.ones((7, 4), numpy.float32))
    assert outs["prob"].shape == (7, 4) and diffs["data"].shape == (7, 3, 8, 8)
    numpy.testing.assert_allclose(outs["prob"], net.forward_all(data=x)["prob"], rtol=1e-6)


def test_weights_round_trip_binary_and_hdf5(tmp_path, net_file):
    net = caffe.Net(str(net_file), caffe.TRAIN)
    net.save(str(tmp_path / "w"))  # no extension: binary, as pycaffe's save
    net.save_hdf5(str(tmp_path / "h"))  # no .h5 extension: HDF5 all the same
    for other in (caffe.Net(str(net_file), str(tmp_path / "w"), caffe.TRAIN),
                  caffe.Net(str(net_file), caffe.TRAIN, weights=str(tmp_path / "w"))):
        numpy.testing.assert_array_equal(other.params["ip"][0].data, net.params["ip"][0].data)
    loaded = caffe.Net(str(net_file), caffe.TRAIN)
    loaded.load_hdf5(str(tmp_path / "h"))
    numpy.testing.assert_array_equal(loaded.params["conv"][0].data, net.params["conv"][0].data)


LAYER_MODULE = '''
import caffe


class Bias(caffe.Layer):
    """top = bottom + b, b one learnable value added by add_blob; param_str is b's start."""

    def setup(self, bottom, top):
        self.blobs.add_blob(1)
        self.blobs[0].data[0] = float(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data + self.blobs[0].data[0]

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] = top[0].diff.sum()
        bottom[0].diff[...] = top[0].diff
'''


def test_a_caffe_python_layer_gets_the_alias_only_when_caffe_is_missing(tmp_path, monkeypatch):
    import sys

    name = "caffe_style_bias_layer"
    (tmp_path / f"{name}.py").write_text(LAYER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "caffe" not in sys.modules
    model = tmp_path / "py.prototxt"
    model.write_text('force_backward: true\nlayer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 '
                     'dim: 3 } } }\nlayer { name: "b" type: "Python" bottom: "x" top: "y" python_param { '
                     f'module: "{name}" layer: "Bias" param_str: "1.5" }} }}\n')
    try:
        net = caffe.Net(str(model), caffe.TRAIN)
        assert sys.modules["caffe"] is caffe
        out = net.forward(x=numpy.ones((2, 3), numpy.float32))
        numpy.testing.assert_allclose(out["y"], 2.5)
        net.backward(y=numpy.ones((2, 3), numpy.float32))
        assert net.layers[1].blobs[0].diff[0] == 6 and net.params["b"][0].data[0] == 1.5
    finally:
        caffe.uninstall()
        sys.modules.pop(name, None)
    assert "caffe" not in sys.modules


def test_install_aliases_submodules_and_never_shadows_a_real_caffe(tmp_path, monkeypatch):
    import importlib
    import importlib.machinery
    import sys

    try:
        assert caffe.install() is True
        import caffe as alias
        import caffe.proto.caffe_pb2 as pb2
        from caffe.io import Transformer

        assert alias is caffe and pb2 is caffe_pb2 and Transformer is caffe.io.Transformer
        assert sys.modules["caffe.draw"] is caffe.draw and caffe.install() is True
    finally:
        caffe.uninstall()
    assert not [n for n in sys.modules if n == "caffe" or n.startswith("caffe.")]

    # a built Caffe on the path (a package with its _caffe extension) stays the `caffe` one imports
    real = tmp_path / "caffe"
    real.mkdir()
    (real / "__init__.py").write_text("REAL = True\n")
    (real / f"_caffe{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.warns(caffe.CaffeAliasWarning, match="real Caffe is importable"):
        assert caffe.install() is False
    assert "caffe" not in sys.modules
    # an unbuilt Caffe source folder cannot be imported: it does not count
    (real / f"_caffe{importlib.machinery.EXTENSION_SUFFIXES[0]}").unlink()
    try:
        assert caffe.install() is True
    finally:
        caffe.uninstall()


# -- caffe.io ------------------------------------------------------------------------------

def test_io_messages():
    blob = caffe.io.array_to_blobproto(numpy.arange(6.0).reshape(2, 3), diff=numpy.ones((2, 3)))
    numpy.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), numpy.arange(6.0).reshape(2, 3))
    numpy.testing.assert_array_equal(caffe.io.blobproto_to_array(blob, return_diff=True), numpy.ones((2, 3)))
    legacy = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=2, data=[1, 2, 3, 4])
    assert caffe.io.blobproto_to_array(legacy).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError):
        caffe.io.blobproto_to_array(caffe_pb2.BlobProto(data=[1, 2]))
    arrays = [numpy.zeros((2, 2)), numpy.ones(3)]
    back = caffe.io.blobprotovector_str_to_arraylist(caffe.io.arraylist_to_blobprotovector_str(arrays))
    assert [a.tolist() for a in back] == [a.tolist() for a in arrays]

    pixels = numpy.arange(24, dtype=numpy.uint8).reshape(2, 3, 4)
    datum = caffe.io.array_to_datum(pixels, label=3)
    assert datum.label == 3 and datum.data == pixels.tobytes()
    numpy.testing.assert_array_equal(caffe.io.datum_to_array(datum), pixels)
    unlabelled = caffe.io.array_to_datum(pixels.astype(numpy.float32))
    assert not unlabelled.HasField("label") and len(unlabelled.float_data) == 24
    numpy.testing.assert_array_equal(caffe.io.datum_to_array(unlabelled), pixels)
    with pytest.raises(ValueError):
        caffe.io.array_to_datum(numpy.zeros((2, 2)))


def test_io_images_and_transformer(tmp_path):
    from PIL import Image

    rgb = numpy.random.default_rng(1).integers(0, 256, (6, 10, 3), dtype=numpy.uint8)
    Image.fromarray(rgb).save(tmp_path / "im.png")
    image = caffe.io.load_image(str(tmp_path / "im.png"))
    assert image.dtype == numpy.float32 and image.shape == (6, 10, 3)
    numpy.testing.assert_allclose(image, rgb / 255.0, atol=1e-6)
    gray = caffe.io.load_image(str(tmp_path / "im.png"), color=False)
    assert gray.shape == (6, 10, 1)
    numpy.testing.assert_allclose(gray[..., 0], rgb @ [0.2125, 0.7154, 0.0721] / 255.0, atol=1e-5)

    resized = caffe.io.resize_image(image, (12, 20))
    assert resized.shape == (12, 20, 3) and resized.dtype == numpy.float32
    assert caffe.io.resize_image(numpy.full((4, 4, 5), 0.5), (3, 7)).shape == (3, 7, 5)
    crops = caffe.io.oversample([image, image], (4, 6))
    assert crops.shape == (20, 4, 6, 3)
    numpy.testing.assert_array_equal(crops[0], image[:4, :6])
    numpy.testing.assert_array_equal(crops[3], image[2:, 4:])
    numpy.testing.assert_array_equal(crops[4], image[1:5, 2:8])
    numpy.testing.assert_array_equal(crops[9], image[1:5, 2:8][:, ::-1])

    t = caffe.io.Transformer({"data": (1, 3, 6, 10)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", numpy.array([10.0, 20.0, 30.0]))
    t.set_input_scale("data", 0.5)
    prepared = t.preprocess("data", image)
    expected = (image.transpose(2, 0, 1)[::-1] * 255 - numpy.array([10, 20, 30])[:, None, None]) * 0.5
    numpy.testing.assert_allclose(prepared, expected, rtol=1e-5)
    numpy.testing.assert_allclose(t.deprocess("data", prepared), image, atol=1e-5)
    with pytest.raises(ValueError, match="not one of the net inputs"):
        t.preprocess("nope", image)
    t.set_mean("data", numpy.ones((3, 3, 5)))  # an elementwise mean of another size is resized
    assert t.mean["data"].shape == (3, 6, 10)


# -- NetSpec, coord_map ----------------------------------------------------------------------

LENET_TEXT = """\
layer {
  name: "data"
  type: "DummyData"
  top: "data"
  top: "label"
  transform_param {
    scale: 0.00392156886
  }
  dummy_data_param {
    shape {
      dim: 8
      dim: 1
      dim: 28
      dim: 28
    }
    shape {
      dim: 8
      dim: 1
      dim: 1
      dim: 1
    }
  }
}
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  param {
    lr_mult: 1
  }
  param {
    lr_mult: 2
  }
  convolution_param {
    num_output: 20
    kernel_size: 5
    weight_filler {
      type: "xavier"
    }
  }
}
layer {
  name: "pool1"
  type: "Pooling"
  bottom: "conv1"
  top: "pool1"
  pooling_param {
    pool: MAX
    kernel_size: 2
    stride: 2
  }
}
layer {
  name: "ip1"
  type: "InnerProduct"
  bottom: "pool1"
  top: "ip1"
  inner_product_param {
    num_output: 50
    weight_filler {
      type: "xavier"
    }
  }
}
layer {
  name: "relu1"
  type: "ReLU"
  bottom: "ip1"
  top: "ip1"
}
layer {
  name: "ip2"
  type: "InnerProduct"
  bottom: "ip1"
  top: "ip2"
  include {
    phase: TRAIN
  }
  inner_product_param {
    num_output: 10
  }
}
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "ip2"
  bottom: "label"
  top: "loss"
  loss_weight: 2
}
"""


def test_net_spec_text_is_pycaffes():
    # the expected texts are what pycaffe's net_spec prints for the same specs
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[8, 1, 28, 28]), dict(dim=[8, 1, 1, 1])],
                                  transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"),
                            param=[dict(lr_mult=1), dict(lr_mult=2)])
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool1, num_output=50, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, include=dict(phase=0))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label, loss_weight=2)
    assert str(n.to_proto()) == LENET_TEXT

    data = L.Input(shape=dict(dim=[2, 3]))
    a, b = L.Slice(data, ntop=2, slice_point=1)
    text = str(caffe.to_proto(L.Eltwise(L.TanH(a), L.TanH(b), operation=P.Eltwise.PROD)))
    names = [line.split('"')[1] for line in text.splitlines() if line.startswith("  name:")]
    tops = [line.split('"')[1] for line in text.splitlines() if line.startswith("  top:")]
    assert names == ["Input1", "Slice1", "TanH1", "TanH2", "Eltwise1"]
    assert tops == ["Input1", "Slice1", "Slice2", "TanH1", "TanH2", "Eltwise1"]

    with pytest.raises(TypeError, match=r"^Silence input 0 is not a Top \(type is <class 'tuple'>\)$"):
        L.Silence(L.DummyData(ntop=2), ntop=0)
    with pytest.raises(KeyError):
        n.missing  # noqa: B018  (pycaffe raises KeyError; brewnet's is an AttributeError too)
    # brewnet goes further than pycaffe: Deconvolution's keywords fill convolution_param
    deconv = L.Deconvolution(n.data, num_output=4, kernel_size=2, stride=2).to_proto().layer[-1]
    assert deconv.convolution_param.num_output == 4 and list(deconv.convolution_param.stride) == [2]


def test_net_spec_builds_a_net(tmp_path):
    L = caffe.layers
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 12, 12]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=3, pad=1)
    n.pool = L.Pooling(n.conv, kernel_size=2, stride=2, pool=caffe.params.Pooling.AVE)
    n.up = L.Deconvolution(n.pool, convolution_param=dict(num_output=2, kernel_size=4, stride=2))
    n.crop = caffe.coord_map.crop(n.up, n.data)
    assert list(n.to_proto().layer[-1].crop_param.offset) == [1]
    path = tmp_path / "spec.prototxt"
    path.write_text(str(n.to_proto()))
    net = caffe.Net(str(path), caffe.TEST)
    assert net.forward(data=numpy.ones((2, 1, 12, 12), numpy.float32))["crop"].shape == (2, 2, 12, 12)
    axis, a, b = caffe.coord_map.coord_map_from_to(n.up, n.data)
    assert axis == 1 and a.tolist() == [1.0] and b.tolist() == [-1.0]


# -- caffe.draw --------------------------------------------------------------------------------

def test_draw_without_pydot_is_one_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pydot", None)
    monkeypatch.setitem(__import__("sys").modules, "pydotplus", None)
    with pytest.raises(ImportError, match=r"pip install 'brewnet\[draw\]'"):
        caffe.draw.get_pydot_graph(caffe_pb2.NetParameter(), "LR")


def test_draw_graph():
    pytest.importorskip("pydot")
    from brewnet.netdef import parse_net

    net = parse_net(NET)
    dot = caffe.draw.get_pydot_graph(net, "TB", phase=caffe.TRAIN, display_lrm=True).to_string()
    assert '"conv (Convolution) kernel size: 2 stride: 1 pad: 0 lr mult: 1.0, 1.0"' in dot
    assert "#FF5050" in dot and "octagon" in dot
    assert caffe.draw.draw_net(net, "LR", ext="raw").startswith(b"digraph tiny")
    assert caffe.draw.get_layer_label(net.layer[1], "LR") == r'"conv\n(Convolution)\nkernel size: 2\nstride: 1\npad: 0"'


# -- Classifier, Detector ------------------------------------------------------------------------

def test_classifier_and_detector(tmp_path):
    from PIL import Image

    path = tmp_path / "deploy.prototxt"
    path.write_text(DEPLOY)
    caffe.Net(str(path), caffe.TEST).save(str(tmp_path / "w.caffemodel"))
    images = [numpy.random.default_rng(i).random((10, 12, 3)).astype(numpy.float32) for i in range(2)]
    classifier = caffe.Classifier(str(path), str(tmp_path / "w.caffemodel"), image_dims=(10, 10),
                                  mean=numpy.array([0.5, 0.5, 0.5]), raw_scale=1.0, channel_swap=(2, 1, 0))
    for oversample in (True, False):
        probs = classifier.predict(images, oversample=oversample)
        assert probs.shape == (2, 4)
        numpy.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)

    Image.fromarray((images[0] * 255).astype(numpy.uint8)).save(tmp_path / "im.png")
    detector = caffe.Detector(str(path), str(tmp_path / "w.caffemodel"), mean=numpy.array([0.5, 0.5, 0.5]),
                              context_pad=1)
    found = detector.detect_windows([(str(tmp_path / "im.png"), [numpy.array([0, 0, 6, 6]),
                                                                  numpy.array([2, 3, 9, 11])])])
    assert [d["prediction"].shape for d in found] == [(4,), (4,)] and found[1]["filename"].endswith("im.png")


def test_run_a_pycaffe_script_unchanged(tmp_path):
    import subprocess
    import sys

    (tmp_path / "script.py").write_text(textwrap.dedent('''
        import sys
        import caffe
        from caffe import layers as L
        n = caffe.NetSpec()
        n.data = L.Input(shape=dict(dim=[1, 2]))
        n.out = L.Power(n.data, scale=float(sys.argv[1]))
        open("n.prototxt", "w").write(str(n.to_proto()))
        net = caffe.Net("n.prototxt", caffe.TEST)
        print(net.forward(data=[[1.0, 2.0]])["out"].tolist(), caffe.__name__)
    '''))
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}  # this checkout's brewnet
    proc = subprocess.run([sys.executable, "-m", "brewnet.pycaffe", "script.py", "3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[[3.0, 6.0]] brewnet.pycaffe"
