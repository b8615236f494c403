"""Old net and solver definitions brought to the current format.

Mirrors Caffe's UpgradeNetAsNeeded / UpgradeSolverAsNeeded (util/upgrade_proto.cpp),
step by step and in the same order. Every step that changes something logs a
warning on the "brewnet" logger naming the file. Messages are changed in place.
"""

import logging
import os

from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError

log = logging.getLogger("brewnet")

V1 = caffe_pb2.V1LayerParameter

# V1LayerParameter.LayerType enum name -> current type string (Caffe's UpgradeV1LayerType)
V1_TYPE_NAMES = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution",
    "DATA": "Data",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

# V0 type strings -> V1 LayerType enum names (Caffe's UpgradeV0LayerType)
V0_TYPE_NAMES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION",
    "data": "DATA", "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING",
    "relu": "RELU", "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT", "tanh": "TANH", "window_data": "WINDOW_DATA",
}

_DATA_SOURCES = {"data": "data_param", "hdf5_data": "hdf5_data_param",
                 "images": "image_data_param", "window_data": "window_data_param"}

# V0LayerParameter field -> {V0 type (or "*" for any): "target_param.field"}
V0_FIELD_TARGETS = {
    "num_output": {"conv": "convolution_param.num_output", "innerproduct": "inner_product_param.num_output"},
    "biasterm": {"conv": "convolution_param.bias_term", "innerproduct": "inner_product_param.bias_term"},
    "weight_filler": {"conv": "convolution_param.weight_filler",
                      "innerproduct": "inner_product_param.weight_filler"},
    "bias_filler": {"conv": "convolution_param.bias_filler", "innerproduct": "inner_product_param.bias_filler"},
    "pad": {"conv": "convolution_param.pad", "pool": "pooling_param.pad"},
    "kernelsize": {"conv": "convolution_param.kernel_size", "pool": "pooling_param.kernel_size"},
    "group": {"conv": "convolution_param.group"},
    "stride": {"conv": "convolution_param.stride", "pool": "pooling_param.stride"},
    "pool": {"pool": "pooling_param.pool"},  # MAX/AVE/STOCHASTIC have the same numbers
    "dropout_ratio": {"dropout": "dropout_param.dropout_ratio"},
    "local_size": {"lrn": "lrn_param.local_size"},
    "alpha": {"lrn": "lrn_param.alpha"},
    "beta": {"lrn": "lrn_param.beta"},
    "k": {"lrn": "lrn_param.k"},
    "source": {**{t: p + ".source" for t, p in _DATA_SOURCES.items()},
               "infogain_loss": "infogain_loss_param.source"},
    "scale": {"*": "transform_param.scale"},
    "meanfile": {"*": "transform_param.mean_file"},
    "batchsize": {t: p + ".batch_size" for t, p in _DATA_SOURCES.items()},
    "cropsize": {"*": "transform_param.crop_size"},
    "mirror": {"*": "transform_param.mirror"},
    "rand_skip": {"data": "data_param.rand_skip", "images": "image_data_param.rand_skip"},
    "shuffle_images": {"images": "image_data_param.shuffle"},
    "new_height": {"images": "image_data_param.new_height"},
    "new_width": {"images": "image_data_param.new_width"},
    "concat_dim": {"concat": "concat_param.concat_dim"},
    "det_fg_threshold": {"window_data": "window_data_param.fg_threshold"},
    "det_bg_threshold": {"window_data": "window_data_param.bg_threshold"},
    "det_fg_fraction": {"window_data": "window_data_param.fg_fraction"},
    "det_context_pad": {"window_data": "window_data_param.context_pad"},
    "det_crop_mode": {"window_data": "window_data_param.crop_mode"},
    "hdf5_output_param": {"hdf5_output": "hdf5_output_param"},
}

# V1 data layers whose own params held the transformation fields
_TRANSFORM_HOLDERS = {V1.DATA: "data_param", V1.IMAGE_DATA: "image_data_param",
                      V1.WINDOW_DATA: "window_data_param"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

SOLVER_TYPE_NAMES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad",
                     "RMSPROP": "RMSProp", "ADADELTA": "AdaDelta", "ADAM": "Adam"}


def _warn(source, what):
    log.warning("%s: upgraded %s; `brewnet upgrade` rewrites the file in the current format", source, what)


# -- the whole net ----------------------------------------------------------------

def net_needs_upgrade(net):
    """True when any upgrade step applies (Caffe's NetNeedsUpgrade)."""
    return (needs_v0_upgrade(net) or needs_v1_upgrade(net) or needs_data_upgrade(net)
            or needs_input_upgrade(net) or needs_batchnorm_upgrade(net))


def upgrade_net(net, source="<string>"):
    """Upgrade ``net`` in place, in Caffe's order; return the names of the steps applied."""
    steps = [
        ("V0 layers", needs_v0_upgrade, upgrade_v0_net),
        ("data transformation fields", needs_data_upgrade, upgrade_data_transformation),
        ("V1 layers", needs_v1_upgrade, upgrade_v1_net),
        ("input fields", needs_input_upgrade, upgrade_net_input),
        ("BatchNorm params", needs_batchnorm_upgrade, upgrade_batchnorm),
    ]
    applied = []
    for name, needed, step in steps:
        if needed(net):
            step(net, source)
            _warn(source, name)
            applied.append(name)
    return applied


# -- V0 -> V1 -------------------------------------------------------------------------

def needs_v0_upgrade(net):
    """A V0 net keeps its parameters in ``layers { layer { ... } }``."""
    return any(layer.HasField("layer") for layer in net.layers)


def upgrade_v0_net(net, source="<string>"):
    """V0 -> V1 (Caffe's UpgradeV0Net): padding folded in, every layer converted."""
    padded = upgrade_v0_padding_layers(net, source)
    net.Clear()  # Caffe keeps only the name, inputs and force_backward
    if padded.HasField("name"):
        net.name = padded.name
    net.layers.extend(upgrade_v0_layer(connection, source) for connection in padded.layers)
    net.input.extend(padded.input)
    net.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        net.force_backward = padded.force_backward
    return net


def _fold_padding(consumer, bottom_index, padding, copied, source):
    """Give the copy of ``consumer`` (last of ``copied``) the pad and the input of the
    ``padding`` layer feeding its bottom; only a one-bottom conv or pool layer can absorb it."""
    kind = consumer.layer.type
    if kind not in ("conv", "pool"):
        raise DefinitionError(f"padding layer {padding.layer.name!r} feeds layer {consumer.layer.name!r} "
                              f"of type {kind!r}; only conv and pool layers can absorb padding", source)
    if len(consumer.bottom) != 1 or len(padding.bottom) != 1 or len(padding.top) != 1:
        raise DefinitionError(f"padding layer {padding.layer.name!r} and layer {consumer.layer.name!r} "
                              f"must each have one bottom (and the padding one top)", source)
    target = copied[-1]
    target.layer.pad = padding.layer.pad
    target.bottom[bottom_index] = padding.bottom[0]


def upgrade_v0_padding_layers(net, source="<string>"):
    """A copy of the V0 ``net`` with each padding layer folded into the conv/pool it feeds."""
    result = caffe_pb2.NetParameter()
    result.CopyFrom(net)
    del result.layers[:]
    last_producer = {name: None for name in net.input}  # blob -> index of the layer that made it
    for index, connection in enumerate(net.layers):
        if connection.layer.type != "padding":
            result.layers.add().CopyFrom(connection)
        for j, blob in enumerate(connection.bottom):
            if blob not in last_producer:
                raise DefinitionError(f"layer {connection.layer.name!r}: unknown bottom blob {blob!r}", source)
            producer = last_producer[blob]
            if producer is not None and net.layers[producer].layer.type == "padding":
                _fold_padding(connection, j, net.layers[producer], result.layers, source)
        for blob in connection.top:
            last_producer[blob] = index
    return result


def _assign(target, dotted, value):
    """Set ``target.a.b`` to ``value``: append to repeated fields, copy messages."""
    *path, field = dotted.split(".")
    for part in path:
        target = getattr(target, part)
    descriptor = target.DESCRIPTOR.fields_by_name[field]
    if descriptor.is_repeated:
        getattr(target, field).append(value)
    elif descriptor.message_type is not None:
        getattr(target, field).CopyFrom(value)
    else:
        setattr(target, field, value)


def upgrade_v0_layer(connection, source="<string>"):
    """One V0 layer (inside a V1LayerParameter) -> a V1LayerParameter."""
    layer = V1()
    layer.bottom.extend(connection.bottom)
    layer.top.extend(connection.top)
    if not connection.HasField("layer"):
        return layer
    old = connection.layer
    if old.HasField("name"):
        layer.name = old.name
    if old.HasField("type"):
        if old.type not in V0_TYPE_NAMES:
            raise DefinitionError(f"layer {old.name!r}: unknown V0 layer type {old.type!r}", source)
        layer.type = V1.LayerType.Value(V0_TYPE_NAMES[old.type])
    layer.blobs.extend(old.blobs)
    layer.blobs_lr.extend(old.blobs_lr)
    layer.weight_decay.extend(old.weight_decay)
    for field, targets in V0_FIELD_TARGETS.items():
        if not old.HasField(field):
            continue
        target = targets.get(old.type, targets.get("*"))
        if target is None:
            log.warning("%s: layer %r: V0 parameter %s does not apply to type %r; dropped",
                        source, old.name, field, old.type)
            continue
        _assign(layer, target, getattr(old, field))
    return layer


# -- data transformation fields ------------------------------------------------------

def needs_data_upgrade(net):
    """V1 data layers that still hold scale/mean_file/crop_size/mirror themselves."""
    for layer in net.layers:
        holder = _TRANSFORM_HOLDERS.get(layer.type)
        if holder and any(getattr(layer, holder).HasField(f) for f in _TRANSFORM_FIELDS):
            return True
    return False


def upgrade_data_transformation(net, source="<string>"):
    """Move those fields into ``transform_param`` (Caffe's UpgradeNetDataTransformation)."""
    for layer in net.layers:
        holder_name = _TRANSFORM_HOLDERS.get(layer.type)
        if holder_name is None:
            continue
        holder = getattr(layer, holder_name)
        for field in _TRANSFORM_FIELDS:
            if holder.HasField(field):
                setattr(layer.transform_param, field, getattr(holder, field))
                holder.ClearField(field)
    return net


# -- V1 -> V2 -----------------------------------------------------------------------------

def needs_v1_upgrade(net):
    """A V1 net uses the ``layers`` field (enum types)."""
    return len(net.layers) > 0


def v1_type_string(enum_value):
    """The current type string for a V1 LayerType value (Caffe's UpgradeV1LayerType)."""
    try:
        enum_name = V1.LayerType.Name(enum_value)
    except ValueError:
        raise DefinitionError(f"unknown V1 layer type number {enum_value}") from None
    name = V1_TYPE_NAMES.get(enum_name)
    if name is None:
        raise DefinitionError(f"V1 layer type {enum_name} has no current equivalent")
    return name


# the *_param messages V1 and V2 layers share (Caffe copies each of them)
V1_PARAM_FIELDS = tuple(f.name for f in V1.DESCRIPTOR.fields if f.name.endswith("_param"))


def _param_spec(layer, index):
    """``layer.param[index]``, adding empty ParamSpecs up to it."""
    while len(layer.param) <= index:
        layer.param.add()
    return layer.param[index]


def _upgrade_param_specs(old, layer):
    """V1 param names, blob_share_mode, blobs_lr, weight_decay -> ParamSpec."""
    for i, name in enumerate(old.param):
        _param_spec(layer, i).name = name
    for i, mode in enumerate(old.blob_share_mode):
        _param_spec(layer, i).share_mode = mode  # STRICT/PERMISSIVE share numbers
    for i, lr in enumerate(old.blobs_lr):
        _param_spec(layer, i).lr_mult = lr
    for i, decay in enumerate(old.weight_decay):
        _param_spec(layer, i).decay_mult = decay


def upgrade_v1_layer(old, source="<string>"):
    """One V1LayerParameter -> a LayerParameter (Caffe's UpgradeV1LayerParameter)."""
    layer = caffe_pb2.LayerParameter()
    layer.bottom.extend(old.bottom)
    layer.top.extend(old.top)
    if old.HasField("name"):
        layer.name = old.name
    layer.include.extend(old.include)
    layer.exclude.extend(old.exclude)
    if old.HasField("type"):
        layer.type = v1_type_string(old.type)
    layer.blobs.extend(old.blobs)
    _upgrade_param_specs(old, layer)
    layer.loss_weight.extend(old.loss_weight)
    for field in V1_PARAM_FIELDS:
        if old.HasField(field):
            getattr(layer, field).CopyFrom(getattr(old, field))
    if old.HasField("layer"):
        log.warning("%s: layer %r still holds a V0 layer; ignored", source, old.name)
    return layer


def upgrade_v1_net(net, source="<string>"):
    """``layers`` (V1) -> ``layer`` (Caffe's UpgradeV1Net); both at once is an error."""
    if len(net.layer):
        raise DefinitionError("the net has both 'layer' and 'layers' (V1) fields; write every layer "
                              "as layer { type: \"Name\" ... } and not layers { type: NAME ... }", source)
    upgraded = [upgrade_v1_layer(old, source) for old in net.layers]
    del net.layers[:]
    net.layer.extend(upgraded)
    return net


# -- input fields -> Input layer -------------------------------------------------------------

def needs_input_upgrade(net):
    return len(net.input) > 0


def _input_shapes(net, source):
    """The BlobShapes of the net's ``input`` fields, from input_shape or input_dim."""
    if len(net.input_shape):
        if len(net.input_shape) != len(net.input):
            raise DefinitionError(f"{len(net.input)} inputs but {len(net.input_shape)} input_shape entries",
                                  source)
        return list(net.input_shape)
    if len(net.input_dim) != 4 * len(net.input):
        raise DefinitionError(f"{len(net.input)} inputs need {4 * len(net.input)} input_dim values, "
                              f"got {len(net.input_dim)}", source)
    dims = list(net.input_dim)
    return [caffe_pb2.BlobShape(dim=dims[4 * i:4 * i + 4]) for i in range(len(net.input))]


def upgrade_net_input(net, source="<string>"):
    """input/input_shape/input_dim -> a first layer "input" of type Input (Caffe's UpgradeNetInput).

    Inputs without any shape (old .caffemodel files) are simply dropped.
    """
    if len(net.input_shape) or len(net.input_dim):
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        layer.top.extend(net.input)
        layer.input_param.shape.extend(_input_shapes(net, source))
        layers = [layer] + list(net.layer)
        del net.layer[:]
        net.layer.extend(layers)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")
    return net


# -- BatchNorm ------------------------------------------------------------------------------

def _old_batchnorm(layer):
    return layer.type == "BatchNorm" and len(layer.param) == 3


def needs_batchnorm_upgrade(net):
    """Old BatchNorm definitions declare three ParamSpecs."""
    return any(_old_batchnorm(layer) for layer in net.layer)


def upgrade_batchnorm(net, source="<string>"):
    """Their statistics are not learned: lr_mult and decay_mult 0, other fields kept.

    This is Caffe master's UpgradeNetBatchNorm (older Caffe removed the params).
    """
    for layer in net.layer:
        if _old_batchnorm(layer):
            for spec in layer.param:
                spec.lr_mult = 0
                spec.decay_mult = 0
    return net


# -- solvers ------------------------------------------------------------------------------------

def solver_needs_upgrade(solver):
    return solver.HasField("solver_type")


def upgrade_solver_type(solver, source="<string>"):
    """solver_type (enum) -> type (string); both set is an error (Caffe's UpgradeSolverType)."""
    if solver.HasField("type"):
        raise DefinitionError("the solver sets both the old 'solver_type' (enum) and 'type' (string); "
                              "keep only 'type'", source)
    enum_name = caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)
    solver.type = SOLVER_TYPE_NAMES[enum_name]
    solver.ClearField("solver_type")
    return solver


def _inline_nets(solver):
    """The nets written inside the solver (net_param, train_net_param, test_net_param)."""
    nets = [solver.test_net_param[i] for i in range(len(solver.test_net_param))]
    for field in ("net_param", "train_net_param"):
        if solver.HasField(field):
            nets.append(getattr(solver, field))
    return nets


def upgrade_solver(solver, source="<string>"):
    """Upgrade ``solver`` in place (Caffe's UpgradeSolverAsNeeded), and its inline nets.

    Returns the names of the steps applied.
    """
    applied = []
    if solver_needs_upgrade(solver):
        upgrade_solver_type(solver, source)
        _warn(source, "solver_type")
        applied.append("solver_type")
    for net in _inline_nets(solver):
        applied += upgrade_net(net, source)
    return applied


def apply_default_snapshot_prefix(solver, solver_path):
    """Caffe's UpgradeSnapshotPrefixProperty: default the prefix to the solver path less its
    extension; a prefix naming a folder gets the solver file's stem appended."""
    stem = os.path.splitext(os.fspath(solver_path))[0]
    if not solver.HasField("snapshot_prefix"):
        solver.snapshot_prefix = stem
    elif os.path.isdir(solver.snapshot_prefix):
        solver.snapshot_prefix = os.path.join(solver.snapshot_prefix, os.path.basename(stem))
    return solver
