"""`brewnet export` / brewnet.onnx_export: onnxruntime's outputs equal brewnet's forward pass.

Each small net exercises one layer (or one geometry) with random weights and random inputs;
LeNet runs with its zoo weights, CIFAR-10-quick with random ones (and Caffe's trained ones when
the fixtures are there). Tolerance: rtol 1e-4, atol 1e-5 of the output's largest magnitude.
"""

import pathlib

import numpy
import pytest
from click.testing import CliRunner

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import brewnet  # noqa: E402
from brewnet import netdef, onnx_export  # noqa: E402
from brewnet.cli import main  # noqa: E402
from brewnet.layers.net import Net  # noqa: E402
from brewnet.netdef import caffe_pb2  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def randomize(net, seed=0):
    """Random parameters everywhere (Caffe's default filler is 0); BatchNorm statistics that make
    sense (positive variances, a scale factor that is not 1)."""
    rng = numpy.random.default_rng(seed)
    for layer in net.layers:
        if layer.type == "BatchNorm":
            factor = rng.uniform(0.5, 2.0)
            mean, var, scale = (b.data for b in layer.blobs)
            mean[...] = rng.standard_normal(mean.shape) * factor
            var[...] = rng.uniform(0.2, 2.0, var.shape) * factor
            scale[...] = factor
            continue
        for blob in layer.blobs:
            blob.data[...] = rng.standard_normal(blob.shape).astype(numpy.float32) * 0.5


def build(text, seed=0):
    net = Net(netdef.parse_net(text), phase=caffe_pb2.TEST)
    randomize(net, seed)
    return net


def assert_every_blob_same(net, model, inputs):
    """Every blob the graph computes under its own name (not only a softmax that may saturate)."""
    result = onnx_export.compare_with_onnxruntime(net, model, inputs, every_blob=True)
    assert len(result) > len(onnx_export.brewnet_forward(net, inputs))
    for name, (diff, scale) in result.items():
        assert diff <= 1e-4 * scale + 1e-7, (name, diff, scale)


def assert_same(net, inputs=None, dynamic_batch=False):
    model = onnx_export.export_onnx(net, dynamic_batch=dynamic_batch)
    inputs = inputs if inputs is not None else onnx_export.random_inputs(net, seed=1)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))
    want = onnx_export.brewnet_forward(net, inputs)
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        scale = float(numpy.abs(ref).max()) if ref.size else 1.0
        numpy.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), err_msg=name)
    return model


def net_text(body, *shapes):
    inputs = "".join(
        f'layer {{ name: "in{k}" type: "Input" top: "{"x" if k == 0 else f"x{k}"}" '
        f'input_param {{ shape {{ {" ".join(f"dim: {d}" for d in shape)} }} }} }}\n'
        for k, shape in enumerate(shapes))
    return 'name: "case"\n' + inputs + body


def one(type_, params="", bottoms=("x",), tops=("y",), name="L"):
    return (f'layer {{ name: "{name}" type: "{type_}" '
            + "".join(f'bottom: "{b}" ' for b in bottoms) + "".join(f'top: "{t}" ' for t in tops)
            + params + " }\n")


X4 = (2, 4, 7, 9)  # odd sizes, so rounding shows

CASES = {
    # convolutions
    "conv": (one("Convolution", "convolution_param { num_output: 6 kernel_size: 3 }"), X4),
    "conv_group_dilation_pad_stride": (one("Convolution", "convolution_param { num_output: 6 kernel_size: 3 "
                                           "group: 2 dilation: 2 pad: 2 stride: 2 }"), X4),
    "conv_rect_no_bias": (one("Convolution", "convolution_param { num_output: 5 kernel_h: 3 kernel_w: 2 "
                              "pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1 bias_term: false }"), X4),
    "conv_depthwise": (one("Convolution", "convolution_param { num_output: 4 kernel_size: 3 group: 4 "
                           "pad: 1 }"), X4),
    "conv3d": (one("Convolution", "convolution_param { num_output: 3 kernel_size: 3 pad: 1 stride: 2 }"),
               (1, 2, 4, 5, 6)),
    "conv_two_bottoms": (one("Convolution", "convolution_param { num_output: 3 kernel_size: 1 }",
                             bottoms=("x", "x1"), tops=("y", "y1")), X4, X4),
    "deconv": (one("Deconvolution", "convolution_param { num_output: 6 kernel_size: 4 stride: 2 pad: 1 "
                   "group: 2 }"), X4),
    "deconv_dilation_no_bias": (one("Deconvolution", "convolution_param { num_output: 3 kernel_size: 3 "
                                    "dilation: 2 bias_term: false }"), X4),
    # pooling, Caffe's rounding
    "max_ceil": (one("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"), (2, 3, 6, 8)),
    "ave_ceil": (one("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 }"), (2, 3, 6, 8)),
    "max_pad_ceil": (one("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }"), (2, 3, 6, 7)),
    "ave_pad_ceil": (one("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }"), (2, 3, 6, 7)),
    "ave_pad_fits": (one("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 }"), X4),
    "ave_last_window_dropped": (one("Pooling", "pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 }"),
                                (1, 2, 5, 5)),
    "max_rect": (one("Pooling", "pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 "
                     "pad_h: 1 pad_w: 0 }"), X4),
    "ave_rect": (one("Pooling", "pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 "
                     "pad_h: 1 pad_w: 1 }"), X4),
    "max_window_past_image": (one("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride: 4 }"), (1, 2, 4, 4)),
    "max_floor": (one("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR }"), X4),
    "global_max": (one("Pooling", "pooling_param { pool: MAX global_pooling: true }"), X4),
    "global_ave": (one("Pooling", "pooling_param { pool: AVE global_pooling: true }"), X4),
    # normalization
    "lrn_across": (one("LRN", "lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 }"), (2, 7, 3, 4)),
    "lrn_within": (one("LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }"),
                   X4),
    "batchnorm_scale_folded": (one("BatchNorm", "batch_norm_param { eps: 0.001 }", tops=("x",), name="bn")
                               + one("Scale", "scale_param { bias_term: true }", tops=("x",), name="sc")
                               + one("ReLU", bottoms=("x",), tops=("y",)), X4),
    "batchnorm_scale_not_inplace": (one("BatchNorm", tops=("b",), name="bn")
                                    + one("Scale", bottoms=("b",), tops=("y",), name="sc"), X4),
    "batchnorm_alone": (one("BatchNorm", tops=("y",)), X4),
    "batchnorm_2d": (one("BatchNorm", tops=("y",)), (3, 5)),
    "batchnorm_batch_stats": (one("BatchNorm", "batch_norm_param { use_global_stats: false }", tops=("y",)), X4),
    "scale_bias_axis1": (one("Scale", "scale_param { bias_term: true }"), X4),
    "scale_two_axes": (one("Scale", "scale_param { axis: 1 num_axes: 2 }"), X4),
    "scale_second_bottom": (one("Scale", "scale_param { axis: 0 }", bottoms=("x", "x1")), X4, (2, 4)),
    "scale_scalar": (one("Scale", "scale_param { num_axes: 0 bias_term: true }"), X4),
    "bias": (one("Bias", "bias_param { axis: 1 num_axes: 2 }"), X4),
    "bias_second_bottom": (one("Bias", bottoms=("x", "x1")), X4, (4,)),
    "mvn": (one("MVN"), X4),
    "mvn_across_no_variance": (one("MVN", "mvn_param { across_channels: true normalize_variance: false }"), X4),
    # neurons
    "relu": (one("ReLU"), X4),
    "relu_leaky": (one("ReLU", "relu_param { negative_slope: 0.1 }"), X4),
    "prelu": (one("PReLU"), X4),
    "prelu_shared": (one("PReLU", "prelu_param { channel_shared: true }"), X4),
    "prelu_2d": (one("PReLU"), (3, 5)),
    "elu": (one("ELU", "elu_param { alpha: 0.7 }"), X4),
    "sigmoid": (one("Sigmoid"), X4),
    "tanh": (one("TanH"), X4),
    "absval": (one("AbsVal"), X4),
    "power": (one("Power", "power_param { power: 3 scale: 0.5 shift: 1 }"), X4),
    "power_square": (one("Power", "power_param { power: 2 }"), X4),
    "power_constant": (one("Power", "power_param { power: 2 scale: 0 shift: 3 }"), X4),
    "power_affine": (one("Power", "power_param { scale: -2 shift: 0.5 }"), X4),
    "exp": (one("Exp", "exp_param { base: 2 scale: 0.5 shift: 1 }"), X4),
    "exp_e": (one("Exp"), X4),
    "log": (one("Log", "log_param { base: 10 scale: 1 shift: 6 }"), X4),
    "log_e": (one("AbsVal", tops=("a",), name="abs") + one("Log", "log_param { shift: 0.5 }", bottoms=("a",)), X4),
    "bnll": (one("Power", "power_param { scale: 40 }", tops=("big",), name="big")
             + one("BNLL", bottoms=("big",)), X4),
    "clip": (one("Clip", "clip_param { min: -0.5 max: 0.8 }"), X4),
    "swish": (one("Swish", "swish_param { beta: 1.5 }"), X4),
    "swish_1": (one("Swish"), X4),
    "threshold": (one("Threshold", "threshold_param { threshold: 0.3 }"), X4),
    "dropout_inplace": (one("ReLU", tops=("x",), name="r") + one("Dropout", bottoms=("x",), tops=("x",))
                        + one("Sigmoid", bottoms=("x",), name="s"), X4),
    "dropout_output": (one("ReLU", tops=("r",), name="r") + one("Dropout", bottoms=("r",), tops=("r",)), X4),
    # fully connected, softmax
    "ip": (one("InnerProduct", "inner_product_param { num_output: 5 }"), X4),
    "ip_2d_transpose_no_bias": (one("InnerProduct", "inner_product_param { num_output: 5 transpose: true "
                                    "bias_term: false }"), (3, 8)),
    "ip_axis2": (one("InnerProduct", "inner_product_param { num_output: 5 axis: 2 }"), X4),
    "ip_axis_last": (one("InnerProduct", "inner_product_param { num_output: 5 axis: -1 }"), X4),
    "embed": (one("Embed", "embed_param { num_output: 3 input_dim: 4 }", bottoms=("i",)), ),
    "softmax": (one("Softmax"), X4),
    "softmax_axis2": (one("Softmax", "softmax_param { axis: 2 }"), X4),
    "softmax_axis_last": (one("Softmax", "softmax_param { axis: -1 }"), (3, 5)),
    # plumbing
    "concat": (one("Concat", bottoms=("x", "x1", "x2")), X4, (2, 2, 7, 9), (2, 1, 7, 9)),
    "concat_axis2": (one("Concat", "concat_param { axis: 2 }", bottoms=("x", "x1")), X4, (2, 4, 3, 9)),
    "concat_one": (one("Concat", tops=("c",)) + one("ReLU", bottoms=("c",)), X4),
    "slice_points": (one("Slice", "slice_param { slice_point: 1 slice_point: 3 }", tops=("a", "b", "c")), X4),
    "slice_even_axis2": (one("Slice", "slice_param { axis: -1 }", tops=("a", "b", "c")), X4),
    "slice_one": (one("Slice", tops=("a",)) + one("ReLU", bottoms=("a",)), X4),
    "split_auto": (one("ReLU", tops=("r",), name="r") + one("Sigmoid", bottoms=("r",), tops=("s",), name="s")
                   + one("TanH", bottoms=("r",), tops=("t",), name="t")
                   + one("Eltwise", bottoms=("r", "s", "t")), X4),
    "flatten": (one("Flatten"), X4),
    "flatten_axis2": (one("Flatten", "flatten_param { axis: 2 }"), X4),
    "flatten_middle": (one("Flatten", "flatten_param { axis: 1 end_axis: 2 }"), X4),
    "reshape_zero_minus_one": (one("Reshape", "reshape_param { shape { dim: 0 dim: -1 dim: 3 } }"), (2, 4, 3, 6)),
    "reshape_axis_num_axes": (one("Reshape", "reshape_param { axis: 1 num_axes: 1 shape { dim: 2 dim: 2 } }"),
                              (2, 4, 3, 6)),
    "reshape_tail": (one("Reshape", "reshape_param { axis: 2 shape { dim: -1 } }"), (2, 4, 3, 6)),
    "reshape_insert": (one("Reshape", "reshape_param { axis: 1 num_axes: 0 shape { dim: 1 } }"), (2, 4, 3)),
    "crop": (one("Crop", "crop_param { axis: 2 offset: 1 offset: 2 }", bottoms=("x", "x1")), X4, (1, 1, 4, 5)),
    "crop_one_offset": (one("Crop", "crop_param { axis: 1 offset: 1 }", bottoms=("x", "x1")), X4, (2, 2, 5, 5)),
    "tile": (one("Tile", "tile_param { axis: 1 tiles: 3 }"), X4),
    "tile_last": (one("Tile", "tile_param { axis: -1 tiles: 2 }"), (3, 5)),
    "parameter": (one("Parameter", "parameter_param { shape { dim: 2 dim: 4 dim: 7 dim: 9 } }", bottoms=(),
                      tops=("p",), name="p") + one("Eltwise", bottoms=("x", "p")), X4),
    "silence": (one("ReLU", tops=("y",), name="r") + one("Silence", bottoms=("x1",), tops=(), name="s"), X4, (2,)),
    # blocks of the big nets
    "resnet_block": (one("Convolution", "convolution_param { num_output: 6 kernel_size: 3 pad: 1 stride: 2 "
                         "bias_term: false }", tops=("a",), name="c1")
                     + one("BatchNorm", bottoms=("a",), tops=("a",), name="bn1")
                     + one("Scale", "scale_param { bias_term: true }", bottoms=("a",), tops=("a",), name="s1")
                     + one("ReLU", bottoms=("a",), tops=("a",), name="r1")
                     + one("Convolution", "convolution_param { num_output: 6 kernel_size: 1 stride: 2 "
                           "bias_term: false }", tops=("p",), name="proj")
                     + one("BatchNorm", bottoms=("p",), tops=("p",), name="bnp")
                     + one("Scale", "scale_param { bias_term: true }", bottoms=("p",), tops=("p",), name="sp")
                     + one("Eltwise", bottoms=("p", "a"), tops=("y",), name="sum")
                     + one("ReLU", bottoms=("y",), tops=("y",), name="r2"), X4),
    "inception_block": (one("Convolution", "convolution_param { num_output: 3 kernel_size: 1 }", tops=("b1",),
                            name="b1")
                        + one("Convolution", "convolution_param { num_output: 2 kernel_size: 3 pad: 1 }",
                              tops=("b2",), name="b2")
                        + one("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 }",
                              tops=("b3",), name="b3")
                        + one("Concat", bottoms=("b1", "b2", "b3"), tops=("c",), name="cat")
                        + one("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 }", bottoms=("c",),
                              tops=("y",), name="pool"), X4),
    # arithmetic
    "eltwise_sum_coeffs": (one("Eltwise", "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }",
                               bottoms=("x", "x1", "x2")), X4, X4, X4),
    "eltwise_sum": (one("Eltwise", bottoms=("x", "x1")), X4, X4),
    "eltwise_prod": (one("Eltwise", "eltwise_param { operation: PROD }", bottoms=("x", "x1", "x2")), X4, X4, X4),
    "eltwise_prod_two": (one("Eltwise", "eltwise_param { operation: PROD }", bottoms=("x", "x1")), X4, X4),
    "eltwise_max": (one("Eltwise", "eltwise_param { operation: MAX }", bottoms=("x", "x1", "x2")), X4, X4, X4),
    "argmax": (one("ArgMax"), X4),
    "argmax_axis": (one("ArgMax", "argmax_param { axis: 1 }"), X4),
    "argmax_top3_values": (one("ArgMax", "argmax_param { top_k: 3 out_max_val: true }"), X4),
    "argmax_top2": (one("ArgMax", "argmax_param { top_k: 2 }"), (3, 10)),
    "argmax_axis_values": (one("ArgMax", "argmax_param { axis: 2 top_k: 2 out_max_val: true }"), X4),
    "reduction_sum": (one("Reduction", "reduction_param { axis: 1 }"), X4),
    "reduction_asum": (one("Reduction", "reduction_param { operation: ASUM axis: 2 coeff: 0.5 }"), X4),
    "reduction_sumsq": (one("Reduction", "reduction_param { operation: SUMSQ axis: -1 }"), X4),
    "reduction_mean_all": (one("Reduction", "reduction_param { operation: MEAN coeff: 2 }"), X4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_onnxruntime(case):
    body, *shapes = CASES[case]
    if case == "embed":
        net = build('name: "e" layer { name: "i" type: "Input" top: "i" input_param { shape { dim: 2 dim: 3 } } }\n'
                    + body)
        inputs = {"i": numpy.array([[0, 3, 1], [2, 2, 0]], dtype=numpy.float32)}
        assert_same(net, inputs)
        return
    net = build(net_text(body, *shapes))
    inputs = onnx_export.random_inputs(net, seed=1)
    if case == "max_window_past_image":
        # a window wholly past the image keeps Caffe's starting value, -FLT_MAX, in both
        want = onnx_export.brewnet_forward(net, inputs)["y"]
        assert (want == numpy.finfo(numpy.float32).min).any()
    if case == "argmax" or case == "argmax_axis":
        # ties: Caffe (and select_last_index) take the last of equal maxima
        inputs["x"] = numpy.round(inputs["x"]).astype(numpy.float32)
    assert_same(net, inputs)


@pytest.mark.parametrize("case", ["resnet_block", "inception_block"])
def test_blocks_match_on_every_blob(case):
    body, *shapes = CASES[case]
    net = build(net_text(body, *shapes), seed=7)
    inputs = onnx_export.random_inputs(net, seed=8)
    assert_every_blob_same(net, onnx_export.export_onnx(net), inputs)


def test_pool_pads_reproduce_caffe_sizes_in_the_onnx_shapes():
    # onnx's own shape inference, from the exported pads alone, gives Caffe's pooled sizes
    for case in ("max_ceil", "ave_ceil", "max_pad_ceil", "ave_pad_ceil", "ave_last_window_dropped", "max_rect",
                 "ave_rect", "max_window_past_image"):
        body, *shapes = CASES[case]
        net = build(net_text(body, *shapes))
        model = onnx.shape_inference.infer_shapes(onnx_export.export_onnx(net))
        dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
        assert tuple(dims) == tuple(net.blobs["y"].shape), case
        ceil = [n for n in model.graph.node if n.op_type in ("MaxPool", "AveragePool")]
        assert all(a.i == 0 for n in ceil for a in n.attribute if a.name == "ceil_mode")


def test_batchnorm_and_scale_fold_into_one_node():
    body, *shapes = CASES["batchnorm_scale_folded"]
    model = onnx_export.export_onnx(build(net_text(body, *shapes)))
    assert [n.op_type for n in model.graph.node] == ["BatchNormalization", "Relu"]
    assert model.graph.node[0].attribute[0].f == pytest.approx(0.001)


def test_shared_parameters_are_exported_once():
    text = net_text(one("InnerProduct", 'param { name: "w" } param { name: "b" } inner_product_param { num_output: 3 }',
                        tops=("a",), name="ip1")
                    + one("InnerProduct", 'param { name: "w" } param { name: "b" } inner_product_param { num_output: 3 }',
                          bottoms=("x1",), tops=("b",), name="ip2"), (2, 5), (2, 5))
    net = build(text)
    model = assert_same(net)
    assert len(model.graph.initializer) == 2


def test_lenet_with_zoo_weights_and_a_dynamic_batch():
    net = brewnet.Net(str(ROOT / "configs/lenet/lenet_deploy.prototxt"), weights="zoo:lenet_mnist",
                      phase=brewnet.TEST)
    model = assert_same(net)
    assert [n.op_type for n in model.graph.node] == ["Conv", "MaxPool", "Conv", "MaxPool", "Flatten", "Gemm",
                                                     "Relu", "Gemm", "Softmax"]
    assert [i.name for i in model.graph.input] == ["data"] and [o.name for o in model.graph.output] == ["prob"]
    assert model.opset_import[0].version == onnx_export.OPSET == 17
    inputs = onnx_export.random_inputs(net, batch=3, seed=2)
    assert_every_blob_same(net, assert_same(net, inputs, dynamic_batch=True), inputs)


def test_cifar10_quick_random_weights():
    net = Net(str(ROOT / "configs/cifar10_quick/cifar10_quick_deploy.prototxt"), phase=caffe_pb2.TEST)
    randomize(net, seed=3)
    inputs = onnx_export.random_inputs(net, batch=4, seed=4)
    assert_every_blob_same(net, assert_same(net, inputs, dynamic_batch=True), inputs)


def test_cifar10_quick_caffe_weights(fixtures):
    weights = fixtures / "real-models/everpeace+caffe/examples/cifar10/cifar10_quick_iter_5000.caffemodel"
    net = brewnet.Net(str(ROOT / "configs/cifar10_quick/cifar10_quick_deploy.prototxt"), weights=str(weights),
                      phase=brewnet.TEST)
    rng = numpy.random.default_rng(5)
    # images in Caffe's scale (0..255 minus a mean)
    inputs = {"data": (rng.standard_normal((8, 3, 32, 32)) * 60).astype(numpy.float32)}
    assert_every_blob_same(net.net, assert_same(net, inputs, dynamic_batch=True), inputs)


def test_mtcnn_prelu_nets_with_their_weights(fixtures):
    folder = fixtures / "real-models/kpzhang93+MTCNN_face_detection_alignment/code/codes/MTCNNv2/model"
    for name in ("det1", "det2"):
        net = brewnet.Net(str(folder / f"{name}.prototxt"), weights=str(folder / f"{name}.caffemodel"),
                          phase=brewnet.TEST)
        assert_same(net.net)


# -- errors and the command -----------------------------------------------------------------------------
def test_unsupported_layers_are_named_in_one_line(tmp_path):
    text = net_text(one("ReLU", tops=("r",), name="relu") + one("SoftmaxWithLoss", bottoms=("r", "x1"),
                                                                tops=("loss",), name="loss"), (2, 3), (2,))
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    message = r"net.prototxt: layer 'loss' \(SoftmaxWithLoss\): .*deploy"
    with pytest.raises(onnx_export.ExportError, match=message):
        onnx_export.check_exportable(netdef.read_net(str(path)), str(path))
    result = CliRunner().invoke(main, ["export", str(path), "none.caffemodel", str(tmp_path / "o.onnx")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "layer 'loss' (SoftmaxWithLoss)" in result.output
    stochastic = build(net_text(one("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 }"), X4))
    with pytest.raises(onnx_export.ExportError, match="layer 'L' \\(Pooling\\): STOCHASTIC"):
        onnx_export.to_onnx(stochastic)
    rnn = net_text(one("Sigmoid", tops=("s",), name="ok") + one("RNN", "recurrent_param { num_output: 2 }",
                                                                 bottoms=("x", "x1"), name="rnn"), (3, 2, 4), (3, 2))
    with pytest.raises(onnx_export.ExportError, match="layer 'rnn' \\(RNN\\): no ONNX equivalent"):
        onnx_export.check_exportable(netdef.parse_net(rnn))


def test_export_command_writes_and_checks_lenet(tmp_path):
    out = tmp_path / "lenet.onnx"
    result = CliRunner().invoke(main, ["export", str(ROOT / "configs/lenet/lenet_deploy.prototxt"),
                                       "zoo:lenet_mnist", str(out), "--check"])
    assert result.exit_code == 0, result.output
    assert "ONNX opset 17" in result.output and "inputs:  data (64 1 28 28)" in result.output
    diff = float(result.output.split("max |onnxruntime - brewnet| = ")[1].split()[0])
    assert diff < 1e-4
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["prob"]


def test_export_command_accepts_zoo_nets_and_warns_of_missing_weights(tmp_path):
    out = tmp_path / "m.onnx"
    weights = tmp_path / "partial.caffemodel"
    net = brewnet.Net("zoo:lenet_mnist", weights="zoo:lenet_mnist", phase=brewnet.TEST)
    param = net.net.to_proto()
    keep = [layer for layer in param.layer if layer.name != "ip2"]
    del param.layer[:]
    param.layer.extend(keep)
    netdef.write_weights(param, str(weights))
    result = CliRunner().invoke(main, ["export", "zoo:lenet_mnist", str(weights), str(out), "--dynamic-batch"])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr and "no weights for layer(s) ip2" in result.stderr
    assert "inputs:  data (N 1 28 28)" in result.output and out.exists()


def test_a_missing_onnx_package_is_one_line(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError("No module named 'onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    result = CliRunner().invoke(main, ["export", str(ROOT / "configs/lenet/lenet_deploy.prototxt"),
                                       "zoo:lenet_mnist", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1
    assert result.output.strip() == "brewnet: error: ONNX export needs the onnx package: pip install 'brewnet[onnx]'"
    assert not (tmp_path / "x.onnx").exists()
