"""Each upgrade step of Caffe's UpgradeNetAsNeeded / UpgradeSolverAsNeeded, on hand-written samples."""

import logging

import pytest
from google.protobuf import text_format

from brewnet import netdef
from brewnet.netdef import DefinitionError, caffe_pb2
from brewnet.netdef import upgrade as up


def _net(text):
    return text_format.Parse(text, caffe_pb2.NetParameter())


V0_NET = """
name: "v0"
layers {
  layer { name: "data" type: "data" source: "db" batchsize: 4 meanfile: "m.binaryproto"
          cropsize: 7 mirror: true scale: 0.5 }
  top: "data" top: "label"
}
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers {
  layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 1 biasterm: false group: 2
          weight_filler { type: "gaussian" std: 0.01 } blobs_lr: 1 blobs_lr: 2
          weight_decay: 1 weight_decay: 0 }
  bottom: "pad1" top: "conv1"
}
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.25 } bottom: "pool1" top: "pool1" }
layers { layer { name: "fc" type: "innerproduct" num_output: 10 } bottom: "pool1" top: "fc" }
layers { layer { name: "loss" type: "softmax_loss" } bottom: "fc" bottom: "label" top: "loss" }
"""

V0_UPGRADED = """
name: "v0"
layer { name: "data" type: "Data" top: "data" top: "label"
        data_param { source: "db" batch_size: 4 }
        transform_param { scale: 0.5 mean_file: "m.binaryproto" crop_size: 7 mirror: true } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        convolution_param { num_output: 4 bias_term: false pad: 2 kernel_size: 3 stride: 1 group: 2
                            weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "drop" type: "Dropout" bottom: "pool1" top: "pool1" dropout_param { dropout_ratio: 0.25 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_v0_net_with_padding_layer_upgrades_fully(caplog):
    net = _net(V0_NET)
    with caplog.at_level(logging.WARNING, logger="brewnet"):
        steps = up.upgrade_net(net, "old.prototxt")
    assert steps == ["V0 layers", "V1 layers"]
    assert net == _net(V0_UPGRADED)
    assert "old.prototxt: upgraded V0 layers" in caplog.text


def test_v0_padding_folds_into_the_following_conv():
    padded = up.upgrade_v0_padding_layers(_net(V0_NET))
    names = [layer.layer.name for layer in padded.layers]
    assert "pad1" not in names
    conv = padded.layers[names.index("conv1")]
    assert list(conv.bottom) == ["data"] and conv.layer.pad == 2
    assert up.upgrade_v0_padding_layers(padded) == padded  # idempotent


def test_v0_padding_into_a_non_conv_layer_is_an_error():
    bad = _net('input: "x" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "x" top: "p" }'
               ' layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }')
    with pytest.raises(DefinitionError, match="padding layer 'p' feeds layer 'r'"):
        up.upgrade_net(bad, "f")
    chain = _net('input: "x" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "x" top: "p" }'
                 ' layers { layer { name: "q" type: "padding" pad: 1 } bottom: "p" top: "q" }')
    with pytest.raises(DefinitionError, match="padding layer 'p' feeds layer 'q' of type 'padding'"):
        up.upgrade_net(chain, "f")


def test_v0_unknown_type_and_inputs_kept():
    with pytest.raises(DefinitionError, match="unknown V0 layer type 'wat'"):
        up.upgrade_net(_net('layers { layer { name: "a" type: "wat" } top: "a" }'), "f")
    net = _net('input: "data" input_dim: 1 input_dim: 1 input_dim: 2 input_dim: 2 force_backward: true '
               'layers { layer { name: "r" type: "relu" } bottom: "data" top: "r" }')
    up.upgrade_net(net, "f")
    assert [layer.type for layer in net.layer] == ["Input", "ReLU"] and net.force_backward


V1_NET = """
name: "v1"
layers { name: "data" type: DATA top: "data" top: "label" include { phase: TRAIN }
         data_param { source: "db" batch_size: 2 scale: 0.00390625 mirror: true } }
layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip"
         blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
         param: "w" param: "b" blob_share_mode: PERMISSIVE
         inner_product_param { num_output: 3 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss" loss_weight: 2 }
"""

V1_UPGRADED = """
name: "v1"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        data_param { source: "db" batch_size: 2 } transform_param { scale: 0.00390625 mirror: true } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        param { name: "w" share_mode: PERMISSIVE lr_mult: 1 decay_mult: 1 }
        param { name: "b" lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" loss_weight: 2 }
"""


def test_v1_net_with_blobs_lr_weight_decay_and_transform_fields():
    net = _net(V1_NET)
    assert up.needs_data_upgrade(net)
    steps = up.upgrade_net(net, "v1.prototxt")
    assert steps == ["data transformation fields", "V1 layers"]
    assert net == _net(V1_UPGRADED)
    assert not up.net_needs_upgrade(net)


def test_data_transformation_step_alone():
    net = _net('layers { type: IMAGE_DATA image_data_param { crop_size: 5 mean_file: "m" } }'
               ' layers { type: CONVOLUTION }')
    up.upgrade_data_transformation(net)
    layer = net.layers[0]
    assert not layer.image_data_param.HasField("crop_size")
    assert layer.transform_param.crop_size == 5 and layer.transform_param.mean_file == "m"


def test_v1_layer_and_layers_together_is_an_error():
    with pytest.raises(DefinitionError, match="both 'layer' and 'layers'"):
        netdef.parse_net('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }', "mixed.prototxt")


def test_v1_type_table_covers_every_enum_value():
    assert set(up.V1_TYPE_NAMES) == set(caffe_pb2.V1LayerParameter.LayerType.keys())
    assert up.v1_type_string(caffe_pb2.V1LayerParameter.SOFTMAX_LOSS) == "SoftmaxWithLoss"
    assert up.v1_type_string(caffe_pb2.V1LayerParameter.IM2COL) == "Im2col"


def test_v1_type_table_agrees_with_registered_layers():
    from brewnet.layers.registry import v1_type_name

    registered = {name: v1_type_name(name) for name in up.V1_TYPE_NAMES}
    registered = {name: kind for name, kind in registered.items() if kind is not None}
    if not registered:
        pytest.skip("no layer registers a V1 name yet")
    assert registered == {name: up.V1_TYPE_NAMES[name] for name in registered}


def test_every_v1_type_is_a_registered_layer_type():
    from brewnet.layers.registry import known_types

    missing = {kind for kind in up.V1_TYPE_NAMES.values() if kind} - set(known_types())
    assert not missing, f"V1 layer types with no registered layer: {sorted(missing)}"


def test_v1_param_fields_are_all_copied():
    old = caffe_pb2.V1LayerParameter(type=caffe_pb2.V1LayerParameter.POWER)
    old.power_param.power = 3
    old.loss_param.ignore_label = 7
    layer = up.upgrade_v1_layer(old)
    assert layer.power_param.power == 3 and layer.loss_param.ignore_label == 7
    assert len(up.V1_PARAM_FIELDS) == 30


def test_input_dim_becomes_an_input_layer_first():
    net = _net('input: "a" input: "b" input_dim: [1, 3, 4, 5, 2, 1, 1, 1] '
               'layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "c" }')
    assert up.upgrade_net(net, "f") == ["input fields"]
    expected = _net('layer { name: "input" type: "Input" top: "a" top: "b" input_param { '
                    'shape { dim: [1, 3, 4, 5] } shape { dim: [2, 1, 1, 1] } } } '
                    'layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "c" }')
    assert net == expected


def test_input_shape_and_shapeless_inputs():
    net = _net('input: "x" input_shape { dim: [2, 7] } layer { name: "r" type: "ReLU" bottom: "x" top: "y" }')
    up.upgrade_net(net)
    assert net.layer[0].input_param.shape[0].dim == [2, 7] and not net.input_shape
    legacy = _net('input: "x" layer { name: "r" type: "ReLU" }')  # old .caffemodel: just dropped
    up.upgrade_net(legacy)
    assert [layer.name for layer in legacy.layer] == ["r"] and not legacy.input


def test_input_dim_count_mismatch_is_an_error():
    with pytest.raises(DefinitionError, match="f: 1 inputs need 4 input_dim values, got 3"):
        up.upgrade_net(_net('input: "x" input_dim: [1, 2, 3]'), "f")


def test_old_batchnorm_params_get_zero_multipliers():
    net = _net('layer { name: "bn" type: "BatchNorm" param { name: "m" lr_mult: 0 } '
               'param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 0 } } '
               'layer { name: "bn2" type: "BatchNorm" param { lr_mult: 1 } }')
    assert up.upgrade_net(net, "f") == ["BatchNorm params"]
    specs = net.layer[0].param
    assert [(s.lr_mult, s.decay_mult) for s in specs] == [(0, 0)] * 3 and specs[0].name == "m"
    assert net.layer[1].param[0].lr_mult == 1  # only three-param BatchNorms are old ones


def test_solver_type_enum_becomes_string(caplog):
    expected = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad", "RMSPROP": "RMSProp",
                "ADADELTA": "AdaDelta", "ADAM": "Adam"}
    for enum_name, type_name in expected.items():
        solver = netdef.parse_solver(f"base_lr: 0.1 solver_type: {enum_name}", "s.prototxt")
        assert solver.type == type_name and not solver.HasField("solver_type")
    assert "s.prototxt: upgraded solver_type" in caplog.text


def test_solver_with_both_type_fields_is_an_error():
    with pytest.raises(DefinitionError, match="s.prototxt: the solver sets both"):
        netdef.parse_solver('solver_type: ADAM type: "Adam"', "s.prototxt")


def test_solver_inline_nets_are_upgraded():
    solver = netdef.parse_solver('net_param { layers { name: "r" type: RELU } }')
    assert solver.net_param.layer[0].type == "ReLU" and not solver.net_param.layers


def test_default_snapshot_prefix(tmp_path):
    solver = caffe_pb2.SolverParameter()
    netdef.apply_default_snapshot_prefix(solver, "models/x/solver.prototxt")
    assert solver.snapshot_prefix == "models/x/solver"
    solver.snapshot_prefix = str(tmp_path)
    netdef.apply_default_snapshot_prefix(solver, "models/x/solver.prototxt")
    assert solver.snapshot_prefix == str(tmp_path / "solver")
