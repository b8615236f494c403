"""The layer contract: blob counts declared as Caffe declares them, checked by the Net
(one message naming the layer and what it takes), automatic tops, and layers without
a gradient refusing one."""

import textwrap

import pytest

from brewnet.layers.base import Layer, LayerError
from brewnet.layers.gradcheck import make_layer
from brewnet.layers.net import Net
from brewnet.layers.registry import _LAYERS, known_types
from brewnet.netdef import DefinitionError, parse_net

# Caffe's counts per type (include/caffe/layers/*.hpp; -1 and false left out), as
# (exact_bottoms, min_bottoms, max_bottoms, exact_tops, min_tops, max_tops, equal_bottom_top, auto_top_blobs)
NEURON = (1, None, None, 1, None, None, False, False)
LOSS = (2, None, None, 1, None, None, False, True)
CAFFE_COUNTS = {
    **{t: NEURON for t in ("AbsVal", "BNLL", "Clip", "Dropout", "ELU", "Exp", "Log", "Power", "PReLU", "ReLU",
                           "Sigmoid", "Swish", "TanH", "Threshold")},
    **{t: (1, None, None, 1, None, None, False, False)
       for t in ("ArgMax", "BatchNorm", "Embed", "Flatten", "Im2col", "InnerProduct", "LRN", "MVN", "Reduction",
                 "Reshape", "Softmax", "SPP", "Tile")},
    **{t: LOSS for t in ("EuclideanLoss", "HingeLoss", "MultinomialLogisticLoss", "SigmoidCrossEntropyLoss")},
    "ContrastiveLoss": (3, None, None, 1, None, None, False, True),
    "SoftmaxWithLoss": (2, None, None, None, 1, 2, False, True),
    "InfogainLoss": (None, 2, 3, None, 1, 2, False, True),
    "Accuracy": (2, None, None, None, 1, 2, False, False),
    "BatchReindex": (2, None, None, 1, None, None, False, False),
    "Crop": (2, None, None, 1, None, None, False, False),
    "Bias": (None, 1, 2, 1, None, None, False, False),
    "Scale": (None, 1, 2, 1, None, None, False, False),
    "Concat": (None, 1, None, 1, None, None, False, False),
    "Eltwise": (None, 2, None, 1, None, None, False, False),
    "Filter": (None, 2, None, None, 1, None, False, False),
    "Slice": (1, None, None, None, 1, None, False, False),
    "Split": (1, None, None, None, 1, None, False, False),
    "Silence": (None, 1, None, 0, None, None, False, False),
    "Convolution": (None, 1, None, None, 1, None, True, False),
    "Deconvolution": (None, 1, None, None, 1, None, True, False),
    "Pooling": (1, None, None, None, 1, 2, False, False),  # MAX: the mask top; see the test below
    "LSTMUnit": (3, None, None, 2, None, None, False, False),
    "LSTM": (None, 2, 3, 1, None, None, False, False),  # without expose_hidden; see below
    "RNN": (None, 2, 3, 1, None, None, False, False),
    "Data": (0, None, None, None, 1, 2, False, False),
    "ImageData": (0, None, None, 2, None, None, False, False),
    "WindowData": (0, None, None, 2, None, None, False, False),
    "MemoryData": (0, None, None, 2, None, None, False, False),
    "HDF5Data": (0, None, None, None, 1, None, False, False),
    "HDF5Output": (2, None, None, 0, None, None, False, False),
    "DummyData": (0, None, None, None, 1, None, False, False),
    "Input": (0, None, None, None, 1, None, False, False),
    "Parameter": (0, None, None, 1, None, None, False, False),
    # detection forks: SSD (include/caffe/layers/*.hpp of weiliu89/caffe ssd) and Fast R-CNN (fast_rcnn_layers.hpp)
    "Permute": (1, None, None, 1, None, None, False, False),
    "Normalize": (1, None, None, 1, None, None, False, False),
    # SSD's header misspells ExactBottomBlobs (no override, so no bound): it reads bottom 0, and bottom 1
    # for the image size unless img_size/img_h/img_w is given
    "PriorBox": (None, 1, 2, 1, None, None, False, False),
    "DetectionOutput": (None, 3, 4, 1, None, None, False, False),  # bottom 3: the images, for visualize
    "ROIPooling": (None, 2, 2, None, 1, 1, False, False),
    "SmoothL1Loss": (None, 2, 4, 1, None, None, False, True),
}
# the fork layers (docs/FORKS.md): their fork's own declarations
CAFFE_COUNTS.update({
    "ReLU6": NEURON,
    "Axpy": (3, None, None, 1, None, None, False, False),
    "Interp": (1, None, None, 1, None, None, False, False),
    "Upsample": (2, None, None, 1, None, None, False, False),
    "BN": (1, None, None, None, 1, 3, False, False),  # LEARN: mean and variance tops; INFERENCE: 1 top
    "DenseImageData": (0, None, None, 2, None, None, False, False),
    "DepthwiseConvolution": (None, 1, None, None, 1, None, True, False),  # BaseConvolutionLayer's
    "ConvolutionDepthwise": (None, 1, None, None, 1, None, True, False),
    # the ShuffleNet fork declares none, yet reads one bottom and writes one top: brewnet says so
    "ShuffleChannel": (1, None, None, 1, None, None, False, False),
})
FIELDS = ("exact_bottoms", "min_bottoms", "max_bottoms", "exact_tops", "min_tops", "max_tops", "equal_bottom_top",
          "auto_top_blobs")
# conv.py belongs to another change: it still checks len(bottom) == len(top) in setup by hand


def builtin_types():
    """Registered types defined by brewnet itself (plugins and tests may register more)."""
    return [t for t in known_types() if _LAYERS[t].__module__.startswith("brewnet.layers.families.")]


def counts(layer):
    return tuple(getattr(layer, f) for f in FIELDS)


@pytest.mark.parametrize("type_name", sorted(set(builtin_types()) - {"Python"}))
def test_declared_counts_are_caffes(type_name):
    assert type_name in CAFFE_COUNTS, f"{type_name}: add Caffe's blob counts to CAFFE_COUNTS"
    layer = make_layer(f'name: "l" type: "{type_name}"')
    for field, got, want in zip(FIELDS, counts(layer), CAFFE_COUNTS[type_name]):
        assert got == want, f"{type_name}.{field} is {got!r}, Caffe's is {want!r}"


def test_counts_that_depend_on_the_parameters():
    # Caffe's PoolingLayer::MaxTopBlobs: 2 for MAX (the mask), else 1
    assert make_layer('name: "p" type: "Pooling" pooling_param { pool: AVE }').max_tops == 1
    assert make_layer('name: "p" type: "Pooling" pooling_param { pool: MAX }').max_tops == 2
    # SegNet's BN: only LEARN has the batch mean and variance tops
    assert make_layer('name: "b" type: "BN" bn_param { bn_mode: INFERENCE }').max_tops == 1
    # RecurrentLayer: expose_hidden adds the initial states as bottoms and the last ones as tops
    for kind, states in (("LSTM", 2), ("RNN", 1)):
        layer = make_layer(f'name: "r" type: "{kind}" recurrent_param {{ num_output: 2 expose_hidden: true }}')
        assert (layer.min_bottoms, layer.max_bottoms, layer.exact_tops) == (2 + states, 3 + states, 1 + states)


def test_builtin_types_declare_backward_consistently():
    for type_name in builtin_types():
        cls = _LAYERS[type_name]
        if cls.has_backward and type_name != "Python":
            assert cls.backward is not Layer.backward, f"{type_name}: has_backward but no backward"


# -- the Net checks -------------------------------------------------------------------
INPUTS = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }\n'
          'layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }\n')


@pytest.mark.parametrize("layer_text, message", [
    ('name: "ip" type: "InnerProduct" bottom: "x" bottom: "y" top: "z" inner_product_param { num_output: 2 }',
     "layer 'ip' (InnerProduct): takes 1 bottom blob(s), got 2"),
    ('name: "e" type: "Eltwise" bottom: "x" top: "z"', "layer 'e' (Eltwise): takes at least 2 bottom blob(s), got 1"),
    ('name: "p" type: "Pooling" bottom: "x" top: "z" top: "m" pooling_param { pool: AVE kernel_size: 2 }',
     "layer 'p' (Pooling): takes at most 1 top blob(s), got 2"),
    ('name: "s" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "a" top: "b" top: "c"',
     "layer 's' (SoftmaxWithLoss): takes at most 2 top blob(s), got 3"),
    ('name: "i" type: "Input" bottom: "x" top: "z" input_param { shape { dim: 1 } }',
     "layer 'i' (Input): takes 0 bottom blob(s), got 1"),
    ('name: "a" type: "Accuracy" bottom: "x" bottom: "y"', "layer 'a' (Accuracy): takes at least 1 top blob(s), got 0"),
])
def test_the_net_refuses_wrong_counts(layer_text, message):
    with pytest.raises(LayerError) as info:
        Net(parse_net(INPUTS + f"layer {{ {layer_text} }}"))
    assert str(info.value) == message


def test_count_errors_name_the_file(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(INPUTS + 'layer { name: "e" type: "Eltwise" bottom: "x" top: "z" }')
    with pytest.raises(DefinitionError, match="takes at least 2 bottom") as info:
        Net(str(path))
    assert str(info.value).startswith(f"{path}: layer 'e' (Eltwise): ")


@pytest.fixture
def contract_module(tmp_path, monkeypatch):
    """A user's module with a Python layer that declares one top per bottom."""
    (tmp_path / "contract_layers.py").write_text(textwrap.dedent('''
        from brewnet.layers import Layer

        class Each(Layer):
            equal_bottom_top = True
            min_bottoms = 1

            def reshape(self, bottom, top):
                for b, t in zip(bottom, top):
                    t.reshape(b.shape)

            def forward(self, bottom, top):
                for b, t in zip(bottom, top):
                    t.data[...] = b.data
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "contract_layers"
    import sys

    sys.modules.pop("contract_layers", None)


def test_equal_bottom_top(contract_module):
    layer = ('layer { name: "each" type: "Python" bottom: "x" bottom: "y" TOPS '
             'python_param { module: "contract_layers" layer: "Each" } }')
    net = Net(parse_net(INPUTS + layer.replace("TOPS", 'top: "a" top: "b"')))
    assert net.outputs == ["a", "b"]
    with pytest.raises(LayerError, match=r"^layer 'each' \(Python\): produces one top blob per bottom blob, "
                                         r"got 2 bottom\(s\) and 1 top\(s\)$"):
        Net(parse_net(INPUTS + layer.replace("TOPS", 'top: "a"')))


# -- automatic tops ---------------------------------------------------------------------
SCORES = ('layer { name: "s" type: "Input" top: "s" input_param { shape { dim: 2 dim: 3 } } }\n'
          'layer { name: "k" type: "Input" top: "k" input_param { shape { dim: 2 } } }\n')


def test_a_loss_without_a_top_gets_an_anonymous_one():
    net = Net(parse_net(SCORES + 'layer { name: "l" type: "SoftmaxWithLoss" bottom: "s" bottom: "k" }'))
    index = net.layer_index("l")
    assert len(net.top_vecs[index]) == 1 and net.top_names("l") == [None]
    assert None not in net.blobs and net.outputs == []  # no later layer can read it
    assert dict(net._loss_tops[index]) == {0: 1.0}  # and it is the loss, weight 1


def test_automatic_tops_only_up_to_the_required_count():
    # SoftmaxWithLoss takes one or two tops: one given, none added
    net = Net(parse_net(SCORES + 'layer { name: "l" type: "SoftmaxWithLoss" bottom: "s" bottom: "k" top: "l" }'))
    assert net.top_names("l") == ["l"]


# -- no gradient ------------------------------------------------------------------------
def test_a_layer_without_gradient_refuses_one_on_the_loss_path():
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h" inner_product_param { num_output: 3 } }\n'
            'layer { name: "t" type: "Threshold" bottom: "h" top: "t" PROPAGATE }\n'
            'layer { name: "l" type: "Reduction" bottom: "t" top: "l" loss_weight: 1 }\n')
    net = Net(parse_net(text.replace("PROPAGATE", "")))
    net.forward()
    with pytest.raises(LayerError, match=r"^layer 't' \(Threshold\): has no gradient \(as in Caffe\)"):
        net.backward()
    net = Net(parse_net(text.replace("PROPAGATE", "propagate_down: false")))
    net.forward()
    net.backward()  # asked for nothing: nothing to refuse
