"""The gradient checks of the built-in layers, one table for all of them.

CASES maps a layer type to its cases. A case is (params, bottoms, options):

- params: the LayerParameter text after name and type, e.g. ``relu_param { negative_slope: 0.1 }``;
- bottoms: one entry per bottom, a shape (filled with standard normal values) or an
  array (used as it is: labels, indices, values kept clear of a kink);
- options: keyword arguments of ``brewnet.layers.gradcheck.check_gradient`` (n_tops,
  check_bottoms, top_weights, kink, rtol, ...), plus ``phase`` (default TEST) and
  ``blobs`` (arrays given to the layer as its learnable blobs before setup).

tests/layers/test_gradients.py runs every case in float64, and fails for a built-in
type that has a backward (``has_backward``) but no case here. The implementation
variants of convolution and pooling (both column layouts, compiled and array code)
are checked in tests/layers/families/test_conv.py and test_pooling.py; the cases here are their plain runs.
"""

import numpy

from brewnet.netdef import caffe_pb2

RNG = numpy.random.default_rng(2024)


def normal(*shape):
    return RNG.standard_normal(shape)


def near(*points, eps=1e-3):
    """kink: skip inputs within eps of a non-smooth point."""
    return lambda i, a: numpy.any([numpy.abs(a - p) < eps for p in points], axis=0)


def distinct(*shape):
    # well separated values: max pooling has no near-ties for the numeric gradient
    return RNG.permutation(int(numpy.prod(shape))).reshape(shape) * 0.1 + RNG.uniform(0, 0.01, shape)


def softmax(x, axis=1):
    e = numpy.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def case(params="", bottoms=(), **options):
    return params, list(bottoms), options


CASES = {}

# -- neurons ------------------------------------------------------------------------
X = normal(2, 3, 3, 2)
POSITIVE = numpy.abs(X) + 0.5
CASES.update({
    "ReLU": [case("", [X], kink=near(0)),
             case("relu_param { negative_slope: 0.1 }", [X], kink=near(0))],
    "PReLU": [case("", [X], kink=near(0)),
              case("prelu_param { channel_shared: true }", [X], kink=near(0)),
              case('prelu_param { filler { type: "uniform" min: -0.5 max: 0.5 } }', [X], kink=near(0))],
    "ELU": [case("elu_param { alpha: 0.7 }", [X], kink=near(0))],
    "Sigmoid": [case("", [X])],
    "TanH": [case("", [X])],
    "AbsVal": [case("", [X], kink=near(0))],
    "Power": [case("power_param { power: 1.5 scale: 0.8 shift: 3.0 }", [X]),
              case("power_param { power: 2 scale: -0.5 shift: 0.3 }", [X]),
              case("power_param { power: 3 }", [X]),
              case("power_param { power: 1 scale: 2 shift: 1 }", [X]),
              case("power_param { power: 0 scale: 2 }", [X])],
    "Exp": [case("", [X]),
            case("exp_param { base: 2.0 scale: 0.5 shift: 0.1 }", [X])],
    "Log": [case("", [POSITIVE]),
            case("log_param { base: 10.0 scale: 1.5 shift: 0.2 }", [POSITIVE])],
    "BNLL": [case("", [X * 3])],
    "Clip": [case("clip_param { min: -0.5 max: 0.7 }", [X], kink=near(-0.5, 0.7))],
    "Swish": [case("", [X]),
              case("swish_param { beta: 1.3 }", [X])],
    # TEST: the identity (TRAIN redraws its mask on every forward: test_neuron.py checks it with a fixed one)
    "Dropout": [case("", [X])],
})

# -- losses (the loss weight reaches backward as the top diff) -------------------------
W = [numpy.array(1.7)]
SCORES = normal(4, 5)
LABELS = numpy.array([0, 3, 4, 3], dtype=float)
SCORES_SPATIAL = normal(2, 4, 3, 2)
LABELS_SPATIAL = RNG.integers(0, 4, size=(2, 1, 3, 2)).astype(float)
LABELS_SPATIAL[0, 0, 1, 1] = LABELS_SPATIAL[1, 0, 0, 0] = 2  # the ignored value occurs
LOSS = {"check_bottoms": [0], "top_weights": W}  # no gradient for labels
CASES.update({
    "SoftmaxWithLoss": [
        case("", [SCORES, LABELS], **LOSS),
        case("loss_param { ignore_label: 2 normalization: VALID }", [SCORES_SPATIAL, LABELS_SPATIAL], **LOSS),
        case("loss_param { normalization: FULL } softmax_param { axis: 2 }",
             [SCORES_SPATIAL.transpose(0, 2, 1, 3), LABELS_SPATIAL.reshape(2, 3, 2)], **LOSS)],
    "EuclideanLoss": [case("", [SCORES, normal(4, 5, 1)], check_bottoms=[0, 1], top_weights=W)],
    "SigmoidCrossEntropyLoss": [
        case("", [SCORES * 3, RNG.random((4, 5))], **LOSS),
        case("loss_param { ignore_label: -1 normalization: VALID }",
             [SCORES, numpy.where(RNG.random((4, 5)) < 0.3, -1.0, RNG.random((4, 5)))], **LOSS)],
    # hinge is non-smooth where a margin is exactly 0: standard normal scores keep clear of +-1
    "HingeLoss": [case("", [SCORES, LABELS], **LOSS),
                  case("hinge_loss_param { norm: L2 }", [SCORES, LABELS], **LOSS)],
    "InfogainLoss": [
        case("", [SCORES, LABELS, RNG.random((1, 1, 5, 5))], **LOSS),
        case("loss_param { ignore_label: 2 }", [SCORES_SPATIAL, LABELS_SPATIAL, RNG.random((4, 4))], **LOSS)],
    "MultinomialLogisticLoss": [case("", [softmax(SCORES), LABELS], **LOSS)],
    # Caffe's gradient divides by (distance + 1e-4), so it is exact only to ~1e-4
    "ContrastiveLoss": [
        case(params, [normal(6, 3), normal(6, 3, 1, 1), numpy.array([1, 0, 1, 0, 0, 0], dtype=float)],
             check_bottoms=[0, 1], top_weights=W, rtol=1e-3)
        for params in ("contrastive_loss_param { margin: 2.5 }",
                       "contrastive_loss_param { margin: 4 legacy_version: true }")],
})

# -- utility layers --------------------------------------------------------------------
GAUSSIAN = 'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 }'
SELECTOR = numpy.array([0.0, 1.0, 0.0, 2.0, 1.0])
CASES.update({
    "InnerProduct": [
        case(f"inner_product_param {{ num_output: 4 {GAUSSIAN} }}", [(3, 2, 2, 2)]),
        case(f"inner_product_param {{ num_output: 3 transpose: true {GAUSSIAN} }}", [(2, 5)]),
        case('inner_product_param { num_output: 2 axis: 2 bias_term: false weight_filler { type: "xavier" } }',
             [(2, 3, 4)])],
    # repeated indices exercise the scatter-add; indices have no gradient
    "Embed": [case('embed_param { num_output: 3 input_dim: 5 weight_filler { type: "gaussian" } '
                   'bias_filler { type: "gaussian" } }', [numpy.array([[0, 4, 2], [2, 2, 1]], dtype=float)],
                   check_bottoms=[])],
    "Softmax": [case(f"softmax_param {{ axis: {axis} }}", [shape])
                for axis, shape in ((1, (2, 4, 3)), (2, (2, 3, 4)), (-1, (3, 5)))],
    "Concat": [case("", [(2, 3, 2), (2, 1, 2), (2, 2, 2)]),
               case("concat_param { axis: 0 }", [(1, 3), (2, 3)]),
               case("concat_param { concat_dim: 2 }", [(2, 1, 3), (2, 1, 1)])],  # the legacy field
    "Slice": [case("slice_param { axis: 1 slice_point: 1 slice_point: 4 }", [(2, 5, 3)], n_tops=3),
              case("slice_param { axis: 0 }", [(2, 5, 3)], n_tops=2),
              case("slice_param { slice_dim: 2 }", [(2, 5, 3)], n_tops=3)],
    "Split": [case("", [(2, 3)], n_tops=3)],  # the tops' diffs are summed
    "Flatten": [case(f"flatten_param {{ {params} }}", [(2, 3, 4, 2)])
                for params in ("", "axis: 1 end_axis: 2", "axis: 0 end_axis: -2")],
    "Reshape": [case(f"reshape_param {{ {params} }}", [shape]) for params, shape in (
        ("shape { dim: 0 dim: -1 }", (2, 3, 4)),
        ("shape { dim: 0 dim: -1 dim: 4 }", (2, 3, 4)),
        ("shape { dim: 2 dim: 3 } axis: 1 num_axes: 1", (2, 6, 4)),
        ("shape { dim: -1 } axis: -2", (2, 3, 4)),
        ("shape { dim: 1 } axis: 1 num_axes: 0", (2, 3)),
        ("shape { dim: 0 dim: 0 dim: -1 dim: 1 }", (2, 3, 4)))],
    "Eltwise": [case(f"eltwise_param {{ {params} }}", [(3, 4)] * n) for params, n in (
        ("operation: SUM", 3), ("operation: SUM coeff: 0.5 coeff: -2", 2),
        ("operation: PROD", 3), ("operation: PROD stable_prod_grad: false", 3),
        ("operation: MAX", 2), ("operation: MAX", 3))],
    # the selector (last bottom) has no gradient
    "Filter": [case("", [(5, 3), SELECTOR], check_bottoms=[0]),
               case("", [(5, 3), (5, 2, 2), SELECTOR.reshape(5, 1)], n_tops=2, check_bottoms=[0, 1])],
    "BatchReindex": [case("", [(4, 3), numpy.array([3.0, 0.0, 3.0, 1.0, 3.0])], check_bottoms=[0])],
    "Tile": [case(f"tile_param {{ axis: {axis} tiles: {tiles} }}", [(2, 3, 2)])
             for axis, tiles in ((1, 3), (0, 2), (-1, 2))],
    "Reduction": [case(f"reduction_param {{ operation: {op} axis: {axis} coeff: -1.5 }}", [(2, 3, 4)])
                  for op in ("SUM", "ASUM", "SUMSQ", "MEAN") for axis in (0, 1, -1)],
    # a fresh Parameter blob is zeros: start from other values
    "Parameter": [case("parameter_param { shape { dim: 2 dim: 3 } }", [], blobs=[normal(2, 3)])],
    "Silence": [case("", [(2, 3), (4,)], n_tops=0)],  # zero bottom diffs, as Caffe
    "Crop": [case("crop_param { axis: 2 offset: 1 }", [(2, 3, 5, 6), numpy.zeros((2, 3, 3, 4))],
                  check_bottoms=[0])],  # never to the reference bottom
})

# -- normalization ---------------------------------------------------------------------
# BatchNorm's statistics never get gradients (check_params=False); TRAIN normalizes by the batch
CASES["BatchNorm"] = [case("", [normal(*shape) * 2 + 1], phase=caffe_pb2.TRAIN, check_params=False)
                      for shape in ((4, 3, 2, 2), (5, 2), (3, 2, 4))]
CASES["BatchNorm"].append(case("", [(2, 3, 2, 2)], check_params=False,  # TEST: the stored statistics
                               blobs=[normal(3), numpy.abs(normal(3)) + 0.5, numpy.array([2.5])]))
CASES["Scale"] = [case(f"scale_param {{ {params} }}", [shape]) for params, shape in (
    ('filler { type: "gaussian" } bias_term: true bias_filler { type: "gaussian" }', (2, 3, 4)),
    ('axis: 1 num_axes: 2 filler { type: "gaussian" }', (2, 3, 4, 2)),
    ('axis: 0 num_axes: -1 filler { type: "gaussian" } bias_term: true', (2, 3)),
    ('num_axes: 0 filler { type: "gaussian" }', (2, 3)),
    ('axis: -1 filler { type: "gaussian" }', (2, 3, 4)))]
CASES["Scale"] += [case(f"scale_param {{ {params} }}", shapes) for params, shapes in (  # the scale as a bottom
    ("axis: 0", [(2, 3, 4), (2, 3)]),
    ("", [(2, 3, 4), (3,)]),
    ("axis: 0", [(2, 3), (2, 3)]),  # element-wise
    ('bias_term: true bias_filler { type: "gaussian" }', [(2, 3, 4), (3, 4)]),
    ("", [(2, 3), ()]))]
CASES["Bias"] = [case(f"bias_param {{ {params} }}", shapes) for params, shapes in (
    ('filler { type: "gaussian" }', [(2, 3, 4)]),
    ('axis: 0 num_axes: -1 filler { type: "gaussian" }', [(2, 3)]),
    ("axis: 2 num_axes: 0", [(2, 3, 4)]),
    ("", [(2, 3, 4), (3, 4)]),  # the bias as a bottom
    ("axis: 0", [(2, 3), (2,)]),
    ("", [(2, 3), ()]))]
# Caffe's backward treats (std + eps) as a constant: exact only as eps -> 0 (off by ~eps here)
CASES["MVN"] = [case(f"mvn_param {{ {params} }}", [normal(*shape) * 2 + 1],
                     **({"rtol": 2e-2, "atol": 2e-3} if "eps" in params else {}))
                for params in ("", "across_channels: true", "normalize_variance: false",
                               "across_channels: true normalize_variance: false", "eps: 0.001")
                for shape in ((2, 3, 2, 3), (3, 4))]

# -- vision ------------------------------------------------------------------------------
CONV_FILLERS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'
CASES.update({
    "Convolution": [
        case(f"convolution_param {{ num_output: 4 kernel_size: 3 group: 2 pad: 1 stride: 2 {CONV_FILLERS} }}",
             [(2, 4, 5, 5)]),
        case(f"convolution_param {{ num_output: 2 kernel_size: 2 {CONV_FILLERS} }}", [(2, 2, 3, 3)] * 2,
             n_tops=2),  # two bottoms through the same weights
        # group == channels: the depthwise kernel (layers/kernels/depthwise.py)
        case(f"convolution_param {{ num_output: 6 group: 3 kernel_size: 3 pad: 1 stride: 2 {CONV_FILLERS} }}",
             [(2, 3, 5, 4)])],
    "Deconvolution": [case(f"convolution_param {{ num_output: 2 kernel_size: 4 stride: 2 pad: 1 {CONV_FILLERS} }}",
                           [(1, 2, 3, 3)])],
    "Im2col": [case("convolution_param { kernel_size: 2 stride: 1 pad: 1 }", [(2, 2, 3, 3)]),
               case("convolution_param { kernel_h: 2 kernel_w: 3 stride: 2 dilation: 2 pad: 1 }", [(1, 2, 5, 6)])],
    "Pooling": [case("pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }", [distinct(2, 2, 6, 7)]),
                case("pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }", [(2, 2, 6, 7)]),
                # the mask top has no gradient: weight 0 on it
                case("pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }", [distinct(1, 2, 5, 5)], n_tops=2,
                     top_weights=[normal(1, 2, 3, 3), numpy.zeros((1, 2, 3, 3))])],
    "SPP": [case("spp_param { pyramid_height: 3 pool: MAX }", [distinct(2, 2, 8, 8)]),
            case("spp_param { pyramid_height: 2 pool: AVE }", [(2, 2, 5, 7)])],
    "LRN": [case(f"lrn_param {{ local_size: {size} alpha: 0.9 beta: 0.75 k: 1.5 norm_region: {region} }}",
                 [(2, 4, 3, 4)])
            for region, size in (("ACROSS_CHANNELS", 3), ("ACROSS_CHANNELS", 5),
                                 ("WITHIN_CHANNEL", 3), ("WITHIN_CHANNEL", 1))],
})

# -- recurrent ------------------------------------------------------------------------------
T, N, D, H = 3, 2, 3, 4
RECURRENT_FILLERS = "weight_filler { type: 'gaussian' std: 0.5 } bias_filler { type: 'gaussian' std: 0.5 }"


def recurrent_bottoms(expose_hidden, static, n_states, x_shape=(T, N, D)):
    """x, cont [, x_static] [, h_0 [, c_0]]."""
    bottoms = [RNG.uniform(-1, 1, x_shape)]
    # stream 1 restarts in the middle; without exposed state the first step must
    # reset (else h_0 is the previous call's h_T, which the numeric check changes)
    first = 1.0 if expose_hidden else 0.0
    bottoms.append(numpy.array([[first, first], [1, 0], [1, 1]]))
    if static:
        bottoms.append(RNG.uniform(-1, 1, (N, 2, 1)))
    if expose_hidden:
        bottoms += [RNG.uniform(-1, 1, (1, N, H)) for _ in range(n_states)]
    return bottoms


for kind, states in (("LSTM", 2), ("RNN", 1)):
    CASES[kind] = []
    for expose in (False, True):
        for static in (False, True):
            bottoms = recurrent_bottoms(expose, static, states)
            CASES[kind].append(case(
                f"recurrent_param {{ num_output: {H} {RECURRENT_FILLERS}{' expose_hidden: true' if expose else ''} }}",
                bottoms, n_tops=1 + (states if expose else 0),
                check_bottoms=[i for i in range(len(bottoms)) if i != 1]))  # cont has no gradient
    # x (T, N, 3, 2): the input projection flattens everything after axis 1
    CASES[kind].append(case(f"recurrent_param {{ num_output: {H} {RECURRENT_FILLERS} }}",
                            recurrent_bottoms(False, False, 0, x_shape=(T, N, 3, 2)), check_bottoms=[0]))
CASES["LSTMUnit"] = [case("", [RNG.uniform(-1, 1, (1, N, H)), RNG.uniform(-2, 2, (1, N, 4 * H)),
                               numpy.array([[1.0, 0.0]])], n_tops=2, check_bottoms=[0, 1])]

# -- detection forks (SSD, Fast R-CNN): layers/families/detection.py ------------------------
ROIS = numpy.array([[0, 0, 0, 5, 4], [1, 1.2, 0.6, 3.4, 5.0], [0, 2, 2, 2, 2], [1, -3, -2, 9, 9]], dtype=float)
CASES.update({
    "Permute": [case("permute_param { order: 0 order: 2 order: 3 order: 1 }", [(2, 3, 2, 4)]),
                case("permute_param { order: 1 order: 0 }", [(3, 2, 2)])],  # axes left out follow in order
    "Normalize": [case(f"norm_param {{ {params} }}", [normal(2, 3, 2, 2) + 0.5])
                  for params in ("across_spatial: true channel_shared: true",
                                 "across_spatial: false channel_shared: true",
                                 "across_spatial: true channel_shared: false scale_filler { type: 'gaussian' std: 1 }",
                                 "across_spatial: false channel_shared: false scale_filler { type: 'gaussian' std: 1 } "
                                 "eps: 0.01")],
    # the boxes depend on the shapes only: the gradient is zero, as SSD's empty backward says
    "PriorBox": [case("prior_box_param { min_size: 2 max_size: 4 aspect_ratio: 2 }", [(1, 2, 2, 3), (1, 3, 8, 12)])],
    "ROIPooling": [case("roi_pooling_param { pooled_h: 2 pooled_w: 3 spatial_scale: 0.5 }",
                        [distinct(2, 2, 4, 5), ROIS], check_bottoms=[0]),
                   case("roi_pooling_param { pooled_h: 3 pooled_w: 3 spatial_scale: 1 }",
                        [distinct(2, 1, 5, 4), ROIS], check_bottoms=[0])],
    "SmoothL1Loss": [case("", [(3, 4, 2), (3, 4, 2)], top_weights=W),
                     case("smooth_l1_loss_param { sigma: 3 }", [(2, 8), (2, 8), RNG.uniform(0, 2, (2, 8)),
                                                                RNG.uniform(0, 2, (2, 8))],
                          top_weights=W, check_bottoms=[0, 1])],
})
# -- fork layers: segmentation and mobile (netdef/forks, docs/FORKS.md) -------------------------
# an Upsample mask as a MAX pooling 2x2/2 of a 4x6 plane makes it: one index per 2x2 block
UPSAMPLE_MASK = numpy.array([[(2 * i + RNG.integers(0, 2)) * 6 + 2 * j + RNG.integers(0, 2)
                              for j in range(3)] for i in range(2)], dtype=float)
# the same for a 4x5 plane (ceil rounding: the last column block is one pixel wide)
UPSAMPLE_MASK_4x5 = numpy.array([[(2 * i + 1) * 5 + min(2 * j + 1, 4) for j in range(3)] for i in range(2)],
                                dtype=float)
DW = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'
BN_FILLERS = 'scale_filler { type: "gaussian" std: 1 } shift_filler { type: "gaussian" std: 1 }'
CASES.update({
    "ReLU6": [case("", [X * 4], kink=near(0, 6))],
    "ShuffleChannel": [case("shuffle_channel_param { group: 3 }", [(2, 6, 2, 3)]),
                       case("shuffle_channel_param { group: 2 }", [(2, 4, 3)])],
    "Axpy": [case("", [(2, 3), (2, 3, 2, 2), (2, 3, 2, 2)]),
             case("", [(2, 3, 1, 1), (2, 3, 4), (2, 3, 4)])],
    "DepthwiseConvolution": [
        case(f"convolution_param {{ num_output: 3 kernel_size: 3 pad: 1 {DW} }}", [(2, 3, 4, 5)]),
        case(f"convolution_param {{ num_output: 6 kernel_size: 3 stride: 2 pad: 1 dilation: 2 {DW} }}",
             [(2, 3, 5, 5)])],
    "ConvolutionDepthwise": [case(f"convolution_param {{ num_output: 4 kernel_h: 2 kernel_w: 3 stride: 2 {DW} }}",
                                  [(1, 4, 5, 6)])],
    "Interp": [case(f"interp_param {{ {params} }}", [(2, 2, 3, 4)]) for params in (
        "zoom_factor: 2", "height: 5 width: 2", "shrink_factor: 2", "zoom_factor: 3 shrink_factor: 2",
        "zoom_factor: 2 pad_beg: -1 pad_end: 0")],
    # the mask (bottom 1) holds indices: no gradient
    "Upsample": [case("upsample_param { scale: 2 }", [(2, 3, 2, 3), numpy.broadcast_to(UPSAMPLE_MASK, (2, 3, 2, 3))],
                      check_bottoms=[0]),
                 case("upsample_param { upsample_h: 4 upsample_w: 5 }",
                      [(1, 2, 2, 3), numpy.broadcast_to(UPSAMPLE_MASK_4x5, (1, 2, 2, 3))],
                      check_bottoms=[0])],
    # LEARN normalizes by the batch in every phase; mean and variance tops carry no gradient
    "BN": [case(f"bn_param {{ {BN_FILLERS} }}", [normal(3, 2, 2, 3) * 2 + 1]),
           case(f"bn_param {{ {BN_FILLERS} }}", [normal(4, 3, 2, 2)], n_tops=3,
                top_weights=[normal(4, 3, 2, 2), numpy.zeros((1, 3, 1, 1)), numpy.zeros((1, 3, 1, 1))]),
           case(f"bn_param {{ bn_mode: INFERENCE {BN_FILLERS} }}", [(2, 3, 2, 2)])],
})
# the forks' ceil_mode: false (floor rounding: the last partial window is dropped)
CASES["Pooling"] += [case("pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false }", [distinct(2, 2, 6, 8)]),
                     case("pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 ceil_mode: false }", [(2, 2, 6, 8)])]
