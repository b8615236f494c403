"""Python layers: user classes named in the prototxt, trained inside a net,
and layer plugins found through the brewnet.layers entry point group."""

import sys
import textwrap

import numpy
import pytest

from brewnet.layers import registry
from brewnet.layers.kernels.backend import to_numpy
from brewnet.layers.net import Net
from brewnet.netdef import DefinitionError, caffe_pb2, parse_net

USER_MODULE = '''
import numpy
import brewnet


class Scale(brewnet.Layer):
    """top = w * bottom with one learnable scalar w (initial value from param_str)."""

    def setup(self, bottom, top):
        self.seen_phase = self.phase
        if not self.blobs:
            self.blobs.append(self.make_blob(()))
            self.blobs[0].data[...] = float(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.blobs[0].data * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if self.param_needs_grad(0):
            self.blobs[0].diff[...] += (top[0].diff * bottom[0].data).sum()
        if propagate_down[0]:
            bottom[0].diff[...] = self.blobs[0].data * top[0].diff


class Euclid(brewnet.Layer):
    """pycaffe's classic example loss: sum((a - b)^2) / 2N."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("Need two inputs to compute distance.")

    def reshape(self, bottom, top):
        self.diff = numpy.zeros_like(bottom[0].data)
        top[0].reshape(())

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = (self.diff ** 2).sum() / bottom[0].shape[0] / 2.0

    def backward(self, top, propagate_down, bottom):
        for i, sign in enumerate((1, -1)):
            if propagate_down[i]:
                bottom[i].diff[...] = sign * top[0].diff * self.diff / bottom[i].shape[0]


class NotALayer:
    pass
'''

NET = '''
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "scale" type: "Python" bottom: "x" top: "s"
        python_param { module: "MODULE" layer: "Scale" param_str: "0.5" } }
layer { name: "loss" type: "Python" bottom: "s" bottom: "y" top: "loss" loss_weight: 1
        python_param { module: "MODULE" layer: "Euclid" } }
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch, request):
    name = f"user_layers_{request.node.name.replace('[', '_').replace(']', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_python_layers_train_inside_a_net(user_module):
    net = Net(parse_net(NET.replace("MODULE", user_module)), phase=caffe_pb2.TRAIN)
    scale = net.layers[net.layer_index("scale")]
    assert type(scale).__name__ == "Scale" and scale.type == "Python"
    assert scale.param_str == "0.5" and scale.seen_phase == caffe_pb2.TRAIN
    assert net.params_lr == [1.0] and net.layer_need_backward[net.layer_index("scale")]

    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((4, 3)).astype(numpy.float32)
    net.blobs["x"].data[...] = x
    net.blobs["y"].data[...] = 2.5 * x
    losses = []
    for _ in range(30):
        net.clear_param_diffs()
        losses.append(net.forward())
        net.backward()
        for blob in net.learnable_params:
            blob.diff[...] *= 0.3  # plain SGD, learning rate 0.3
        net.update()
    assert losses[-1] < 1e-3 * losses[0]
    numpy.testing.assert_allclose(float(to_numpy(net.params["scale"][0].data)), 2.5, rtol=1e-3)


def test_python_layer_errors_are_clear(user_module):
    base = NET.replace("MODULE", user_module)
    with pytest.raises(DefinitionError, match="layer 'scale' \\(Python\\): cannot import python_param module "
                                              "'no_such_module_xyz'"):
        Net(parse_net(base.replace(f'module: "{user_module}" layer: "Scale"',
                                   'module: "no_such_module_xyz" layer: "Scale"')))
    with pytest.raises(DefinitionError, match=f"layer 'scale' \\(Python\\): module '{user_module}' .* has no "
                                              f"class 'Missing'"):
        Net(parse_net(base.replace('layer: "Scale"', 'layer: "Missing"')))
    with pytest.raises(DefinitionError, match="must be a class deriving from brewnet.Layer"):
        Net(parse_net(base.replace('layer: "Scale"', 'layer: "NotALayer"')))
    with pytest.raises(DefinitionError, match="python_param needs both 'module' and 'layer'"):
        Net(parse_net(base.replace(f'module: "{user_module}" layer: "Scale"', 'module: "x"')))


def test_entry_point_plugins_register_layer_types(tmp_path, monkeypatch):
    (tmp_path / "brewnet_test_plugin.py").write_text(textwrap.dedent('''
        from brewnet.layers import Layer, register

        @register("TestPluginNegate")
        class Negate(Layer):
            def reshape(self, bottom, top):
                top[0].reshape(bottom[0].shape)

            def forward(self, bottom, top):
                top[0].data[...] = -bottom[0].data
    '''))
    dist = tmp_path / "brewnet_test_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brewnet-test-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[brewnet.layers]\nnegate = brewnet_test_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    if "TestPluginNegate" not in registry._LAYERS:
        assert registry.get_layer_class("TestPluginNegate").__name__ == "Negate"
    net = Net(parse_net('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 } } }'
                        'layer { name: "n" type: "TestPluginNegate" bottom: "x" top: "y" }'))
    net.blobs["x"].data[...] = numpy.array([1.0, -2.0])
    net.forward()
    numpy.testing.assert_array_equal(to_numpy(net.blobs["y"].data), [-1.0, 2.0])
