"""layers.net.Net: Caffe's graph rules (splits, in-place, loss weights,
backward need, parameter sharing, weight copying, phase filtering)."""

import logging

import numpy
import pytest

from brewnet.layers.gradcheck import net_numeric_gradient
from brewnet.layers.kernels.backend import to_numpy
from brewnet.layers.net import Net, insert_splits, set_random_seed
from brewnet.netdef import DefinitionError, array_to_blob, caffe_pb2, parse_net


def build(text, **kwargs):
    return Net(parse_net(text), **kwargs)


def inp(name, *dims):
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {shape} }} }} }}\n'


def ip(name, bottom, n, extra="", top=None):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top or name}" {extra} '
            f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" std: 0.5 }} '
            f'bias_filler {{ type: "gaussian" std: 0.5 }} }} }}\n')


def fill_inputs(net, seed=0):
    rng = numpy.random.default_rng(seed)
    for name in net.inputs:
        blob = net.blobs[name]
        blob.data[...] = net.xp.asarray(rng.standard_normal(blob.shape).astype(blob.dtype))


# -- splits and in-place -------------------------------------------------------------
def test_split_names_and_wiring_follow_caffe():
    net = build(inp("x", 2, 3) + ip("a", "x", 4) + ip("b", "x", 5)
                + 'layer { name: "r" type: "ReLU" bottom: "a" top: "a" }'
                + 'layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "c" }'
                + 'layer { name: "d" type: "Eltwise" bottom: "a" bottom: "a" top: "d" }')
    assert net.layer_names == ["x", "x_x_0_split", "a", "b", "r", "a_r_0_split", "c", "d"]
    assert net.top_names("x_x_0_split") == ["x_x_0_split_0", "x_x_0_split_1"]
    assert net.bottom_names("a") == ["x_x_0_split_0"] and net.bottom_names("b") == ["x_x_0_split_1"]
    # the in-place ReLU owns the latest version of "a": its split is named after it
    assert net.top_names("a_r_0_split") == [f"a_r_0_split_{k}" for k in range(3)]
    assert net.bottom_names("d") == ["a_r_0_split_1", "a_r_0_split_2"]
    assert net.layers[1].type == "Split"
    assert sorted(net.outputs) == net.outputs == ["c", "d"]

    fill_inputs(net)
    net.forward()
    x = to_numpy(net.blobs["x"].data)
    w, bias = (to_numpy(b.data) for b in net.params["a"])
    numpy.testing.assert_allclose(to_numpy(net.blobs["d"].data), 2 * numpy.maximum(x @ w.T + bias, 0), rtol=1e-5)


def test_split_carries_a_loss_weight_on_its_first_output():
    param = parse_net(inp("x", 2, 3) + inp("y", 2, 3)
                      + 'layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "l" loss_weight: 3 }'
                      + 'layer { name: "p" type: "Power" bottom: "l" top: "p" }')
    out = insert_splits(param)
    split = out.layer[3]
    assert (split.name, split.type, list(split.bottom)) == ("l_loss_0_split", "Split", ["l"])
    assert list(split.top) == ["l_loss_0_split_0", "l_loss_0_split_1"]
    assert list(split.loss_weight) == [3, 0]
    assert list(out.layer[2].loss_weight) == [] and list(out.layer[4].bottom) == ["l_loss_0_split_1"]

    net = Net(param)
    assert net.blob_loss_weights["l_loss_0_split_0"] == 3
    fill_inputs(net)
    loss = net.forward()
    diff = to_numpy(net.blobs["x"].data) - to_numpy(net.blobs["y"].data)
    # the loss layer's own top lost its explicit weight; as a loss layer it defaults to 1 (Caffe does too)
    numpy.testing.assert_allclose(loss, 4 * (diff ** 2).sum() / 4, rtol=1e-5)


def test_in_place_top_is_the_bottom_blob_and_duplicates_are_refused():
    net = build(inp("x", 2, 3) + 'layer { name: "r" type: "ReLU" bottom: "x" top: "x" }')
    assert net.top_vecs[1][0] is net.bottom_vecs[1][0] is net.blobs["x"]
    assert list(net.blobs) == ["x"]
    # "y" is bottom 1 but top 0: not in-place in Caffe's sense, so a second producer
    with pytest.raises(DefinitionError, match="layer 'c' .*top blob 'y' is produced by multiple sources"):
        build(inp("x", 2, 3) + inp("y", 2, 3) + 'layer { name: "c" type: "Eltwise" bottom: "x" bottom: "y" top: "y" }')


def test_unknown_bottom_and_spec_count_errors_name_the_layer():
    with pytest.raises(DefinitionError, match="layer 'a' .*unknown bottom blob 'nope' \\(bottom index 0\\)"):
        build(inp("x", 2, 3) + ip("a", "nope", 4))
    with pytest.raises(DefinitionError, match="layer 'r' .*propagate_down must be given 0 or 1 times"):
        build(inp("x", 2, 3) + 'layer { name: "r" type: "ReLU" bottom: "x" top: "y" '
              'propagate_down: true propagate_down: false }')
    with pytest.raises(DefinitionError, match="layer 'a' .*3 param specs given but the layer has only 2"):
        build(inp("x", 2, 3) + ip("a", "x", 4, "param {} param {} param {}"))


# -- loss weights and backward need -------------------------------------------------------
def test_loss_weights_default_explicit_and_on_plain_tops():
    net = build(inp("x", 2, 3) + inp("y", 2, 4) + ip("a", "x", 4, "loss_weight: 0.5")
                + 'layer { name: "l" type: "EuclideanLoss" bottom: "a" bottom: "y" top: "l" }'
                + 'layer { name: "l2" type: "EuclideanLoss" bottom: "a" bottom: "y" top: "l2" loss_weight: 2 }')
    weights = dict(net.blob_loss_weights)
    assert weights["a_a_0_split_0"] == 0.5 and weights["l"] == 1 and weights["l2"] == 2 and weights["x"] == 0
    fill_inputs(net)
    loss = net.forward()
    a, y = to_numpy(net.blobs["a"].data), to_numpy(net.blobs["y"].data)
    euclid = ((a - y) ** 2).sum() / 4
    numpy.testing.assert_allclose(loss, 0.5 * a.sum() + euclid + 2 * euclid, rtol=1e-5)
    assert float(to_numpy(net.blobs["l2"].diff)) == 2  # the loss weight reaches backward as the top diff


def test_anonymous_loss_top_is_added():
    net = build(inp("x", 2, 3) + inp("y", 2, 3) + 'layer { name: "l" type: "EuclideanLoss" bottom: "x" bottom: "y" }')
    assert len(net.top_vecs[2]) == 1 and net.outputs == []
    fill_inputs(net)
    assert net.forward() > 0


def test_backward_need_with_lr_mult_zero_and_propagate_down():
    text = (inp("x", 2, 3) + inp("y", 2, 2)
            + ip("frozen", "x", 4, "param { lr_mult: 0 } param { lr_mult: 0 }")
            + ip("train", "frozen", 2)
            + ip("side", "x", 2)  # feeds no loss
            + 'layer { name: "l" type: "EuclideanLoss" bottom: "train" bottom: "y" top: "l" propagate_down: true '
              'propagate_down: false }')
    net = build(text)
    need = dict(zip(net.layer_names, net.layer_need_backward))
    assert need["frozen"] is False and need["train"] is True and need["side"] is False and need["l"] is True
    assert net.bottom_need_backward[net.layer_index("l")] == [True, False]
    assert net.bottom_need_backward[net.layer_index("train")] == [False]
    assert net.layers[net.layer_index("frozen")].param_propagate_down == [False, False]
    assert net.params_lr == [0, 0, 1, 1, 1, 1]

    fill_inputs(net)
    net.clear_param_diffs()
    net.forward_backward()
    assert not numpy.any(to_numpy(net.params["frozen"][0].diff))
    assert numpy.any(to_numpy(net.params["train"][0].diff))

    forced = Net(parse_net("force_backward: true\n" + text))
    assert all(forced.layer_need_backward)
    assert forced.bottom_need_backward[forced.layer_index("l")] == [True, True]  # Euclidean allows both
    assert forced.layers[forced.layer_index("frozen")].param_propagate_down == [True, True]


def test_whole_net_gradient_matches_finite_differences():
    """Split accumulation, in-place ReLU and two losses: d(loss)/d(params) numerically."""
    text = ("force_backward: true\n" + inp("x", 3, 4) + inp("y", 3, 2) + ip("a", "x", 5)
            + 'layer { name: "r" type: "TanH" bottom: "a" top: "a" }'
            + ip("b", "a", 2) + ip("c", "a", 2)
            + 'layer { name: "l1" type: "EuclideanLoss" bottom: "b" bottom: "y" top: "l1" }'
            + 'layer { name: "l2" type: "EuclideanLoss" bottom: "c" bottom: "y" top: "l2" loss_weight: 0.3 }')
    net = build(text, dtype=numpy.float64, rng=0)
    fill_inputs(net)
    net.clear_param_diffs()
    net.forward_backward()
    for blob in [net.params["a"][0], net.blobs["x"]]:
        analytic = to_numpy(blob.diff).copy()
        numeric = net_numeric_gradient(net, blob)
        numpy.testing.assert_allclose(analytic.reshape(-1), numeric, rtol=1e-5, atol=1e-8)


# -- parameter sharing ------------------------------------------------------------------------
def test_shared_params_are_the_same_blob_and_learnable_once():
    net = build(inp("x", 2, 3) + ip("a", "x", 3, 'param { name: "w" lr_mult: 2 } param { name: "bias" }')
                + ip("b", "a", 3, 'param { name: "w" } param { name: "bias" decay_mult: 0 }'))
    assert net.params["a"][0] is net.params["b"][0] and net.params["a"][1] is net.params["b"][1]
    assert len(net.learnable_params) == 2
    assert net.params_lr == [2, 1] and net.params_weight_decay == [1, 0]


def test_share_strict_and_permissive_checks():
    with pytest.raises(DefinitionError, match="cannot share param 'w' owned by layer 'a' with layer 'b': shape "
                                              "mismatch; owner shape is \\(4 3\\), sharing layer expects \\(3 4\\)"):
        build(inp("x", 2, 3) + ip("a", "x", 4, 'param { name: "w" }') + ip("b", "a", 3, 'param { name: "w" }'))
    with pytest.raises(DefinitionError, match="count mismatch"):
        build(inp("x", 2, 3) + ip("a", "x", 4, 'param { name: "w" }')
              + ip("b", "a", 2, 'param { name: "w" share_mode: PERMISSIVE }'))
    with pytest.raises(DefinitionError, match="shared param 'w' has mismatched lr_mult"):
        build(inp("x", 2, 3) + ip("a", "x", 3, 'param { name: "w" lr_mult: 1 }')
              + ip("b", "a", 3, 'param { name: "w" lr_mult: 2 }'))

    net = build("force_backward: true\n" + inp("x", 2, 4) + ip("a", "x", 3, 'param { name: "w" }')
                + ip("b", "x", 4, 'param { name: "w" share_mode: PERMISSIVE }',
                     top="bb").replace("num_output: 4", "num_output: 3 transpose: true"))
    owner, view = net.params["a"][0], net.params["b"][0]
    assert view.shape == (4, 3) and owner.shape == (3, 4) and len(net.learnable_params) == 3
    owner.data[...] = numpy.arange(12, dtype=numpy.float32).reshape(3, 4)
    numpy.testing.assert_array_equal(to_numpy(view.data), numpy.arange(12).reshape(4, 3))
    fill_inputs(net)
    net.forward()
    x = to_numpy(net.blobs["x"].data)
    numpy.testing.assert_allclose(to_numpy(net.blobs["bb"].data) - to_numpy(net.params["b"][1].data),
                                  x @ numpy.arange(12).reshape(4, 3), rtol=1e-5)
    ga, gb = numpy.ones((2, 3), numpy.float32), numpy.full((2, 3), 2, numpy.float32)
    net.blobs["a"].diff[...] = ga
    net.blobs["bb"].diff[...] = gb
    net.clear_param_diffs()
    net.backward()
    # both users' gradients accumulate into the owner's memory
    numpy.testing.assert_allclose(to_numpy(owner.diff), ga.T @ x + (x.T @ gb).reshape(3, 4), rtol=1e-5)


# -- weights --------------------------------------------------------------------------------
LENETISH = inp("data", 2, 1, 6, 6) + (
    'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 3 '
    'kernel_size: 3 weight_filler { type: "xavier" } } }\n') + ip("fc", "conv", 4)


def test_save_and_copy_round_trip_binary_and_hdf5(tmp_path, caplog):
    set_random_seed(5)
    net = build(LENETISH)
    fill_inputs(net)
    want = to_numpy(net.forward() or net.blobs["fc"].data).copy()
    for name in ("w.caffemodel", "w.caffemodel.h5"):
        net.save(str(tmp_path / name))
        other = build(LENETISH, rng=99)
        assert not numpy.allclose(to_numpy(other.params["conv"][0].data), to_numpy(net.params["conv"][0].data))
        with caplog.at_level(logging.INFO, logger="brewnet"):
            ignored = other.copy_trained_layers_from(str(tmp_path / name))
        for layer, blobs in net.params.items():
            for k, blob in enumerate(blobs):
                numpy.testing.assert_array_equal(to_numpy(other.params[layer][k].data), to_numpy(blob.data))
        other.blobs["data"].data[...] = net.blobs["data"].data
        other.forward()
        numpy.testing.assert_array_equal(to_numpy(other.blobs["fc"].data), want)
        assert ignored == []

    # source layers the net does not have are listed and logged, not fatal
    bigger = build(LENETISH + ip("extra", "fc", 2))
    bigger.save(str(tmp_path / "big.caffemodel"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="brewnet"):
        assert net.copy_trained_layers_from(str(tmp_path / "big.caffemodel")) == ["extra"]
    assert "Ignoring source layer extra" in caplog.text


def test_copy_errors_name_layer_and_shapes(tmp_path):
    net = build(LENETISH)
    wider = build(LENETISH.replace("num_output: 3", "num_output: 5"))
    wider.save(str(tmp_path / "wide.caffemodel"))
    with pytest.raises(DefinitionError) as info:
        net.copy_trained_layers_from(str(tmp_path / "wide.caffemodel"))
    message = str(info.value)
    assert message.startswith(str(tmp_path / "wide.caffemodel"))
    assert "layer 'conv'" in message and "(5 1 3 3)" in message and "(3 1 3 3)" in message
    assert "rename the layer" in message

    nobias = build(LENETISH.replace("kernel_size: 3", "kernel_size: 3 bias_term: false"))
    with pytest.raises(DefinitionError, match="incompatible number of blobs for layer 'conv': the weights have 1, "
                                              "the net expects 2"):
        net.copy_trained_layers_from(nobias.to_proto())


def test_copy_accepts_legacy_4d_blob_shapes():
    net = build(inp("x", 2, 3) + ip("fc", "x", 4))
    source = caffe_pb2.NetParameter()
    layer = source.layer.add(name="fc")
    w, b = numpy.arange(12, dtype=numpy.float32).reshape(4, 3), numpy.arange(4, dtype=numpy.float32)
    for array, legacy in ((w, (1, 1, 4, 3)), (b, (1, 1, 1, 4))):
        proto = layer.blobs.add()
        proto.num, proto.channels, proto.height, proto.width = legacy
        proto.data.extend(array.ravel().tolist())
    net.copy_trained_layers_from(source)
    numpy.testing.assert_array_equal(to_numpy(net.params["fc"][0].data), w)
    numpy.testing.assert_array_equal(to_numpy(net.params["fc"][1].data), b)
    layer.blobs[1].num, layer.blobs[1].width = 4, 1  # same count, wrong legacy layout
    with pytest.raises(DefinitionError, match="cannot copy param 1 weights from layer 'fc'"):
        net.copy_trained_layers_from(source)


def test_blobs_inside_the_net_param_are_loaded():
    param = parse_net(inp("x", 2, 3) + ip("fc", "x", 2))
    fc = param.layer[1]
    w = numpy.full((2, 3), 0.25, numpy.float32)
    fc.blobs.add().CopyFrom(array_to_blob(w))
    fc.blobs.add().CopyFrom(array_to_blob(numpy.array([1, -1], numpy.float32)))
    net = Net(param)
    numpy.testing.assert_array_equal(to_numpy(net.params["fc"][0].data), w)
    net.blobs["x"].data[...] = 1
    net.forward()
    numpy.testing.assert_allclose(to_numpy(net.blobs["fc"].data), [[1.75, -0.25]] * 2)
    assert len(param.layer[1].blobs) == 2  # the caller's message is left alone


def test_share_trained_layers_and_update():
    train = build(LENETISH, phase=caffe_pb2.TRAIN)
    test = build(LENETISH)
    test.share_trained_layers_with(train)
    assert test.params["conv"][0] is train.params["conv"][0]
    train.clear_param_diffs()
    train.params["fc"][1].diff[...] = 1
    before = to_numpy(train.params["fc"][1].data).copy()
    train.update()
    numpy.testing.assert_allclose(to_numpy(test.params["fc"][1].data), before - 1)


def test_random_seed_makes_fillers_repeatable():
    set_random_seed(3)
    a = build(LENETISH)
    set_random_seed(3)
    b = build(LENETISH)
    c = build(LENETISH)
    numpy.testing.assert_array_equal(to_numpy(a.params["conv"][0].data), to_numpy(b.params["conv"][0].data))
    assert not numpy.array_equal(to_numpy(b.params["conv"][0].data), to_numpy(c.params["conv"][0].data))
    assert a.layers[1].rng is not a.layers[2].rng


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_forward_ranges_reshape_and_nonfinite():
    net = build(LENETISH + 'layer { name: "log" type: "Log" bottom: "fc" top: "lg" }')
    fill_inputs(net)
    net.forward(end="conv")
    assert not numpy.any(to_numpy(net.blobs["fc"].data))
    net.forward(start="fc", end="fc")
    assert numpy.any(to_numpy(net.blobs["fc"].data))
    net.forward()
    assert net.first_nonfinite() == ("log", "lg")  # log of the negative outputs
    net.blobs["data"].reshape(5, 1, 6, 6)
    net.reshape()
    assert net.blobs["fc"].shape == (5, 4)
    with pytest.raises(KeyError, match="has no layer 'nope'"):
        net.forward(end="nope")


def test_to_proto_holds_every_layer_and_its_blobs():
    net = build(LENETISH + ip("fc2", "conv", 2))
    proto = net.to_proto()
    assert [l.name for l in proto.layer] == net.layer_names
    assert "conv_conv_0_split" in net.layer_names
    conv = proto.layer[net.layer_index("conv")]
    assert [tuple(b.shape.dim) for b in conv.blobs] == [(3, 1, 3, 3), (3,)]


# -- phase / level / stage filtering ---------------------------------------------------------------
def test_phase_level_and_stage_filtering():
    text = (inp("x", 2, 3)
            + ip("train_only", "x", 2, "include { phase: TRAIN }")
            + ip("not_train", "x", 2, "exclude { phase: TRAIN }")
            + ip("deep", "x", 2, "include { min_level: 2 }")
            + ip("staged", "x", 2, 'include { stage: "s1" }'))
    assert build(text).layer_names == ["x", "not_train"]  # one consumer left: no split
    assert build(text, phase=caffe_pb2.TRAIN).layer_names[-1] == "train_only"
    assert "deep" in build(text, level=2).layer_names
    assert "staged" in build(text, stages=["s1"]).layer_names
    assert build(text).phase == caffe_pb2.TEST
    assert build(text, phase=caffe_pb2.TRAIN).layers[-1].phase == caffe_pb2.TRAIN


def test_legacy_inputs_in_a_hand_made_param_are_upgraded():
    param = caffe_pb2.NetParameter()
    param.input.append("data")
    param.input_dim.extend([2, 3, 1, 1])
    param.layer.add().CopyFrom(parse_net(ip("fc", "data", 2)).layer[0])
    net = Net(param)
    assert net.inputs == ["data"] and net.blobs["fc"].shape == (2, 2)


# -- pycaffe-style API ------------------------------------------------------------------------------
def test_api_net_forms_forward_backward(tmp_path):
    import brewnet

    model = tmp_path / "net.prototxt"
    model.write_text("force_backward: true\n" + LENETISH)
    core = Net(parse_net(model.read_text()))
    core.save(str(tmp_path / "w.caffemodel"))

    for net in (brewnet.Net(str(model), str(tmp_path / "w.caffemodel"), brewnet.TEST),
                brewnet.Net(model, brewnet.TEST, weights=str(tmp_path / "w.caffemodel")),
                brewnet.Net(str(model), weights=str(tmp_path / "w.caffemodel"), phase=brewnet.TEST)):
        numpy.testing.assert_array_equal(to_numpy(net.params["fc"][0].data), to_numpy(core.params["fc"][0].data))
        assert net.inputs == ["data"] and net.outputs == ["fc"] and net.phase == brewnet.TEST
        assert list(net.blobs) == ["data", "conv", "fc"] and list(net.params) == ["conv", "fc"]
        batch = numpy.random.default_rng(0).standard_normal((3, 1, 6, 6)).astype(numpy.float32)
        out = net.forward(data=batch)  # a new batch size reshapes the net
        assert set(out) == {"fc"} and out["fc"].shape == (3, 4)
        grads = net.backward(fc=numpy.ones((3, 4), numpy.float32))
        assert set(grads) == {"data"} and grads["data"].shape == (3, 1, 6, 6) and numpy.any(grads["data"])
        assert set(net.forward(blobs=["conv"], end="conv")) == {"conv"}
        assert net.top_names["conv"] == ["conv"] and net.bottom_names["fc"] == ["conv"]
    all_out = net.forward_all(data=numpy.zeros((7, 1, 6, 6), numpy.float32))
    assert all_out["fc"].shape == (7, 4)
    with pytest.raises(ValueError, match="nope: not inputs"):
        net.forward(nope=batch)
    with pytest.raises(TypeError):
        brewnet.Net(str(model), "w", brewnet.TEST, 3)
    net.save(tmp_path / "again.caffemodel")
    assert (tmp_path / "again.caffemodel").stat().st_size > 0
    with pytest.raises(DefinitionError):
        brewnet.Net("zoo:surely-not-a-zoo-model")
