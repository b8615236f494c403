"""CPU-vs-GPU parity harness: one small case per registered layer type.

``run_case(case, xp_ref, xp_test, workdir)`` builds the same one-layer net
(Input layers feeding the layer under test, force_backward) on two array
modules with the same seed, gives both the same parameters and inputs, runs
forward and backward, and compares every top, every parameter after forward
(BatchNorm's running statistics), every bottom gradient and every parameter
gradient. All randomness in brewnet layers is drawn on the host from the
net's generator, so even Dropout and STOCHASTIC pooling in TRAIN must match
exactly, not just in distribution.

The GPU tests call it with (numpy, cupy); a CPU test calls it with
(numpy, numpy) so the harness and every case here run in ordinary CI.
No pytest import here: this module is plain code.
"""

import dataclasses
import pathlib

import numpy

from brewnet.layers.kernels.backend import to_numpy
from brewnet.layers.net import Net
from brewnet.netdef import caffe_pb2, parse_net

RTOL, ATOL = 1e-4, 1e-5


@dataclasses.dataclass
class Case:
    """type: layer type; body: text inside layer { } after type/bottom/top;
    bottoms: list of (shape, kind) with kind one of "n" (normal), "p" (positive),
    "prob" (rows summing to 1 along axis 1), "bin" (0/1), "sel" (0/1 with at
    least one 1), "cont" (0 at t=0, then 1), ("int", K) (integers below K), "mask2x2" (a 2x2/2 max
    pooling's mask top)."""

    type: str
    body: str = ""
    bottoms: list = dataclasses.field(default_factory=lambda: [((2, 3, 4, 5), "n")])
    tops: int = 1
    phase: int = caffe_pb2.TEST
    backward: bool = True
    params: str = "n"  # how learnable blobs are initialised: "n" normal * 0.5, "p" in [0.5, 1.5)
    files: object = None  # callable(folder) -> dict substituted into body (data layers)
    feed: object = None  # callable(layer, rng_seed) run before forward (MemoryData)
    compare_files: bool = False  # compare the .h5 files both sides wrote (HDF5Output)
    label: str = ""

    @property
    def id(self):
        return self.type + (f"-{self.label}" if self.label else "")


def _b(*specs):
    """Bottom specs: shapes alone are normal data."""
    return [s if (isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], tuple)) else (s, "n") for s in specs]


def _hdf5_files(folder):
    import h5py

    rng = numpy.random.default_rng(5)
    with h5py.File(folder / "in.h5", "w") as f:
        f["t0"] = rng.normal(size=(5, 2, 3)).astype(numpy.float32)
        f["t1"] = rng.integers(0, 4, size=5).astype(numpy.float32)
    (folder / "list.txt").write_text(f"{folder / 'in.h5'}\n")
    return {"list": folder / "list.txt"}


def _image_files(folder):
    from PIL import Image

    rng = numpy.random.default_rng(6)
    lines = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(5, 6, 3), dtype=numpy.uint8)).save(folder / f"im{i}.png")
        lines.append(f"im{i}.png {i}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return {"list": folder / "list.txt", "root": str(folder) + "/"}


def _output_files(folder):
    return {"out": folder / "out.h5"}


def _feed_memory(layer, seed):
    rng = numpy.random.default_rng(seed)
    layer.set_input_arrays(rng.normal(size=(4, 3, 2, 2)).astype(numpy.float32),
                           rng.integers(0, 3, size=4).astype(numpy.float32))


W = 'weight_filler { type: "gaussian" std: 0.5 }'
TRAIN = caffe_pb2.TRAIN
NCHW = (2, 3, 5, 4)

CASES = [
    Case("AbsVal"),
    Case("Accuracy", "accuracy_param { top_k: 2 }", _b((6, 5), ((6,), ("int", 5))), backward=False),
    Case("Accuracy", "accuracy_param { top_k: 1 ignore_label: 2 }", _b((6, 5), ((6,), ("int", 5))), tops=2,
         backward=False, label="perclass"),
    Case("ArgMax", "argmax_param { top_k: 2 out_max_val: true }", _b((3, 10)), backward=False),
    Case("ArgMax", "argmax_param { axis: 1 }", _b((2, 4, 3)), backward=False, label="axis"),
    Case("BNLL"),
    Case("BatchNorm", "", _b((4, 3, 2, 2)), phase=TRAIN, params="p", label="train"),
    Case("BatchNorm", "batch_norm_param { use_global_stats: true }", _b((4, 3, 2, 2)), params="p", label="global"),
    Case("BatchReindex", "", _b((5, 3, 2), ((4,), ("int", 5)))),
    Case("Bias", "bias_param { axis: 1 num_axes: 1 }"),
    Case("Bias", "bias_param { axis: 0 }", _b(NCHW, (2, 3)), label="two-bottoms"),
    Case("Clip", "clip_param { min: -0.5 max: 0.5 }"),
    Case("Concat", "concat_param { axis: 1 }", _b((2, 3, 4), (2, 2, 4))),
    Case("ContrastiveLoss", "contrastive_loss_param { margin: 1.5 }",
         _b((6, 4), (6, 4), ((6, 1, 1, 1), "bin"))),
    Case("Convolution", f"convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 stride: 2 group: 2 {W} }}",
         _b((2, 4, 7, 6))),
    Case("Convolution", f"convolution_param {{ num_output: 3 kernel_h: 2 kernel_w: 3 dilation: 2 {W} "
                        f"bias_term: false }}", _b((2, 2, 7, 8)), label="dilated"),
    Case("Convolution", f"convolution_param {{ num_output: 5 kernel_size: 1 {W} }}", _b((2, 3, 4, 4)), label="1x1"),
    Case("Crop", "crop_param { axis: 2 offset: 1 }", _b((2, 3, 6, 6), (2, 3, 4, 3))),
    Case("Deconvolution", f"convolution_param {{ num_output: 3 kernel_size: 3 stride: 2 pad: 1 {W} }}",
         _b((2, 4, 4, 5))),
    Case("Deconvolution", f"convolution_param {{ num_output: 4 kernel_size: 2 stride: 2 group: 2 {W} }}",
         _b((2, 2, 3, 3)), label="group"),
    Case("Dropout", "dropout_param { dropout_ratio: 0.3 }", _b((4, 5, 6)), phase=TRAIN, label="train"),
    Case("Dropout", "dropout_param { dropout_ratio: 0.3 }", _b((4, 5, 6)), label="test"),
    Case("DummyData", 'dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "gaussian" } '
                      'shape { dim: 4 } data_filler { type: "constant" value: 2 } }', [], tops=2,
         backward=False),
    Case("ELU", "elu_param { alpha: 0.7 }"),
    Case("Eltwise", "eltwise_param { operation: PROD }", _b((2, 3, 4), (2, 3, 4)), label="prod"),
    Case("Eltwise", "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 }", _b((2, 3, 4), (2, 3, 4)), label="sum"),
    Case("Eltwise", "eltwise_param { operation: MAX }", _b((2, 3, 4), (2, 3, 4), (2, 3, 4)), label="max"),
    Case("Embed", f"embed_param {{ num_output: 4 input_dim: 7 {W} }}", _b(((3, 2), ("int", 7)))),
    Case("EuclideanLoss", "", _b((4, 5), (4, 5))),
    Case("Exp", "exp_param { base: 2 scale: 0.5 shift: 0.1 }"),
    Case("Filter", "", _b((5, 3), ((5,), "sel"))),
    Case("Flatten", "flatten_param { axis: 1 end_axis: 2 }"),
    Case("HDF5Data", 'hdf5_data_param { source: "%(list)s" batch_size: 3 }', [], tops=2, backward=False,
         files=_hdf5_files),
    Case("HDF5Output", 'hdf5_output_param { file_name: "%(out)s" }', _b((3, 2, 2, 2), ((3,), ("int", 4))),
         tops=0, backward=False, files=_output_files, compare_files=True),
    Case("HingeLoss", "hinge_loss_param { norm: L2 }", _b((5, 4), ((5,), ("int", 4)))),
    Case("HingeLoss", "", _b((5, 4), ((5,), ("int", 4))), label="L1"),
    Case("Im2col", "convolution_param { kernel_size: 3 stride: 2 pad: 1 }", _b((2, 3, 5, 4))),
    Case("ImageData", 'image_data_param { source: "%(list)s" root_folder: "%(root)s" batch_size: 2 }',
         [], tops=2, backward=False, files=_image_files),
    Case("InfogainLoss", "", _b(((4, 3), "prob"), ((4,), ("int", 3)), ((3, 3), "p"))),
    Case("InnerProduct", f"inner_product_param {{ num_output: 5 {W} }}", _b((3, 2, 3, 2))),
    Case("InnerProduct", f"inner_product_param {{ num_output: 4 transpose: true axis: 2 {W} }}",
         _b((2, 3, 5)), label="transpose"),
    Case("Input", "input_param { shape { dim: 2 dim: 3 } }", [], backward=False),
    Case("LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 1.5 }", _b((2, 5, 4, 4))),
    Case("LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }",
         _b((2, 3, 5, 5)), label="within"),
    Case("LSTM", 'recurrent_param { num_output: 3 weight_filler { type: "uniform" min: -0.5 max: 0.5 } }',
         _b((4, 2, 3), ((4, 2), "cont"))),
    Case("LSTMUnit", "", _b((1, 2, 3), (1, 2, 12), ((1, 2), "bin")), tops=2),
    Case("Log", "log_param { scale: 2 shift: 1 }", _b(((2, 3, 4), "p"))),
    Case("MVN", ""),
    Case("MVN", "mvn_param { across_channels: true normalize_variance: false }", label="across"),
    Case("MemoryData", "memory_data_param { batch_size: 2 channels: 3 height: 2 width: 2 }", [], tops=2,
         backward=False, feed=_feed_memory),
    Case("MultinomialLogisticLoss", "", _b(((4, 3), "prob"), ((4,), ("int", 3)))),
    Case("PReLU", ""),
    Case("PReLU", "prelu_param { channel_shared: true }", label="shared"),
    Case("Parameter", "parameter_param { shape { dim: 2 dim: 3 } }", []),
    Case("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }", _b((2, 3, 6, 7)), label="max-ceil"),
    Case("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }", _b((2, 3, 5, 4)), tops=2,
         label="max-mask"),
    Case("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }", _b((2, 3, 6, 5)), label="ave"),
    Case("Pooling", "pooling_param { pool: AVE global_pooling: true }", _b((2, 3, 4, 5)), label="global"),
    Case("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }", _b(((2, 3, 4, 6), "p")),
         phase=TRAIN, label="stochastic-train"),
    Case("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }", _b(((2, 3, 5, 5), "p")),
         backward=False, label="stochastic-test"),
    Case("Power", "power_param { power: 2 scale: 0.5 shift: 1 }"),
    Case("RNN", 'recurrent_param { num_output: 3 weight_filler { type: "uniform" min: -0.5 max: 0.5 } }',
         _b((4, 2, 3), ((4, 2), "cont"))),
    Case("ReLU", "relu_param { negative_slope: 0.1 }"),
    Case("Reduction", "reduction_param { operation: ASUM axis: 1 }", _b((2, 3, 4)), label="asum"),
    Case("Reduction", "reduction_param { operation: SUMSQ axis: 0 coeff: 0.5 }", _b((2, 3, 4)), label="sumsq"),
    Case("Reduction", "reduction_param { operation: MEAN axis: 2 }", _b((2, 3, 4)), label="mean"),
    Case("Reshape", "reshape_param { shape { dim: 0 dim: -1 } }", _b((2, 3, 4))),
    Case("SPP", "spp_param { pyramid_height: 2 }", _b((2, 3, 5, 5))),
    Case("Scale", "scale_param { bias_term: true }"),
    Case("Scale", "scale_param { axis: 0 }", _b((2, 3, 4), (2, 3)), label="two-bottoms"),
    Case("Sigmoid"),
    Case("SigmoidCrossEntropyLoss", "", _b((4, 3), ((4, 3), "bin"))),
    Case("Silence", "", _b((2, 3)), tops=0),
    Case("Slice", "slice_param { axis: 1 slice_point: 1 slice_point: 3 }", _b((2, 5, 2)), tops=3),
    Case("Softmax", "softmax_param { axis: 1 }", _b((2, 4, 3))),
    Case("SoftmaxWithLoss", "loss_param { ignore_label: 1 normalization: VALID }", _b((3, 4, 2), ((3, 2), ("int", 4)))),
    Case("SoftmaxWithLoss", "", _b((5, 4), ((5,), ("int", 4))), label="batch"),
    Case("Split", "", _b((2, 3)), tops=2),
    Case("Swish", "swish_param { beta: 1.5 }"),
    Case("TanH"),
    Case("Threshold", "threshold_param { threshold: 0.1 }", backward=False),
    Case("Tile", "tile_param { axis: 1 tiles: 3 }", _b((2, 3, 2))),
    # detection forks (SSD, Fast R-CNN): layers/families/detection.py
    Case("Permute", "permute_param { order: 0 order: 2 order: 3 order: 1 }"),
    Case("Normalize", "norm_param { across_spatial: false channel_shared: false }", params="p"),
    Case("Normalize", "norm_param { across_spatial: true channel_shared: true }", params="p", label="shared"),
    Case("PriorBox", "prior_box_param { min_size: 3 max_size: 6 aspect_ratio: 2 variance: 0.1 variance: 0.1 "
                     "variance: 0.2 variance: 0.2 }", _b((1, 2, 3, 4), (1, 3, 12, 16))),
    # CORNER boxes: any offsets against any (positive) priors decode; the NMS runs on the host
    Case("DetectionOutput", "detection_output_param { num_classes: 3 code_type: CORNER keep_top_k: 10 "
                            "confidence_threshold: 0.2 nms_param { nms_threshold: 0.5 top_k: 20 } }",
         _b((2, 24), ((2, 18), "p"), ((1, 2, 24), "p")), backward=False),
    Case("ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 1 }",
         _b((2, 3, 4, 5), ((6, 5), ("int", 2)))),
    Case("SmoothL1Loss", "smooth_l1_loss_param { sigma: 2 }", _b((3, 4), (3, 4))),
]

# Registered types with no parity case, and why. A new layer type must land in one of the two.
def _dense_files(folder):
    from PIL import Image

    rng = numpy.random.default_rng(8)
    lines = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(5, 6, 3), dtype=numpy.uint8)).save(folder / f"im{i}.png")
        Image.fromarray(rng.integers(0, 4, size=(5, 6), dtype=numpy.uint8)).save(folder / f"lab{i}.png")
        lines.append(f"im{i}.png lab{i}.png")
    (folder / "pairs.txt").write_text("\n".join(lines) + "\n")
    return {"list": folder / "pairs.txt", "root": str(folder) + "/"}


# the segmentation and mobile fork layers (docs/FORKS.md)
BN_FILLERS = 'scale_filler { type: "uniform" min: 0.5 max: 1.5 } shift_filler { type: "gaussian" }'
CASES += [
    Case("ReLU6", "", _b((2, 3, 4, 5))),
    Case("ShuffleChannel", "shuffle_channel_param { group: 3 }", _b((2, 6, 3, 2))),
    Case("Axpy", "", _b((2, 3, 1, 1), (2, 3, 4, 5), (2, 3, 4, 5))),
    Case("DepthwiseConvolution", f"convolution_param {{ num_output: 6 kernel_size: 3 pad: 1 stride: 2 {W} }}",
         _b((2, 3, 7, 6))),
    Case("ConvolutionDepthwise", f"convolution_param {{ num_output: 3 kernel_size: 3 pad: 1 {W} }}", _b((2, 3, 6, 5))),
    Case("Convolution", f"convolution_param {{ num_output: 4 group: 4 kernel_size: 3 pad: 1 {W} }}", _b((2, 4, 6, 5)),
         label="depthwise"),
    Case("Interp", "interp_param { zoom_factor: 2 pad_beg: -1 }", _b((2, 3, 5, 6))),
    Case("Upsample", "upsample_param { scale: 2 }", _b((2, 3, 3, 4), ((2, 3, 3, 4), "mask2x2"))),
    Case("BN", f"bn_param {{ {BN_FILLERS} }}", _b((4, 3, 2, 2)), phase=TRAIN, tops=3, label="learn"),
    Case("BN", f"bn_param {{ bn_mode: INFERENCE {BN_FILLERS} }}", _b((2, 3, 2, 2)), label="inference"),
    Case("DenseImageData", 'dense_image_data_param { source: "%(list)s" root_folder: "%(root)s" batch_size: 2 '
         "mirror: true crop_height: 4 crop_width: 4 }", [], tops=2, backward=False, files=_dense_files),
]

SKIPPED = {
    "Data": "reads LMDB/LevelDB (lmdb is optional and absent on the GPU machine); its batches take the same "
            "prefetch-then-copy path as ImageData, which is compared",
    "WindowData": "needs images plus an R-CNN window file; its batches take the same prefetch-then-copy path as "
                  "ImageData, which is compared",
    "Python": "runs the user's own code, on whatever array module that code uses",
}


def net_text(case, subst=None):
    """The prototxt of a case: one Input layer per bottom, then the layer under test."""
    lines = ['name: "parity"', "force_backward: true"]
    for i, (shape, _) in enumerate(case.bottoms):
        dims = " ".join(f"dim: {d}" for d in shape)
        lines.append(f'layer {{ name: "in{i}" type: "Input" top: "b{i}" input_param {{ shape {{ {dims} }} }} }}')
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(len(case.bottoms)))
    tops = " ".join(f'top: "t{i}"' for i in range(case.tops))
    body = case.body % {k: str(v) for k, v in (subst or {}).items()} if case.files else case.body
    lines.append(f'layer {{ name: "L" type: "{case.type}" {bottoms} {tops} {body} }}')
    return "\n".join(lines) + "\n"


def _input(shape, kind, rng):
    if kind == "n":
        return rng.normal(size=shape)
    if kind == "p":
        return rng.uniform(0.5, 1.5, size=shape)
    if kind == "prob":
        x = rng.uniform(0.1, 1.0, size=shape)
        return x / x.sum(axis=1, keepdims=True)
    if kind == "bin":
        return rng.integers(0, 2, size=shape)
    if kind == "sel":
        x = rng.integers(0, 2, size=shape)
        x.flat[0] = 1
        return x
    if kind == "cont":
        x = numpy.ones(shape)
        x[0] = 0
        return x
    if isinstance(kind, tuple) and kind[0] == "int":
        return rng.integers(0, kind[1], size=shape)
    if kind == "mask2x2":  # a 2x2/2 MAX pooling's mask top for an (h, w) output: one index per block
        h, w = shape[-2:]
        rows = 2 * numpy.arange(h)[:, None] + rng.integers(0, 2, size=shape)
        cols = 2 * numpy.arange(w)[None, :] + rng.integers(0, 2, size=shape)
        return rows * (2 * w) + cols
    raise ValueError(f"unknown input kind {kind!r}")


def _assert_close(what, got, want, rtol, atol):
    got = to_numpy(got).astype(numpy.float64)
    want = to_numpy(want).astype(numpy.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs reference {want.shape}"
    tol = atol * max(1.0, float(numpy.abs(want).max()) if want.size else 1.0)
    if not numpy.allclose(got, want, rtol=rtol, atol=tol, equal_nan=True):
        err = numpy.abs(got - want)
        worst = numpy.unravel_index(int(numpy.nanargmax(err)), err.shape) if err.ndim else ()
        raise AssertionError(f"{what}: max abs error {numpy.nanmax(err):.3g} at {worst}: "
                             f"test {got[worst]!r} vs reference {want[worst]!r}")


def _build(case, xp, folder, seed):
    subst = case.files(folder) if case.files else None
    text = net_text(case, subst)
    return Net(parse_net(text, path=f"<parity {case.id}>"), phase=case.phase, xp=xp, rng=seed,
               source=f"<parity {case.id}>")


def run_case(case, xp_ref, xp_test, workdir, seed=1234, rtol=RTOL, atol=ATOL):
    """Run ``case`` on both array modules and compare; raises AssertionError on a mismatch."""
    workdir = pathlib.Path(workdir)
    nets = []
    for side, xp in (("ref", xp_ref), ("test", xp_test)):
        folder = workdir / side
        folder.mkdir(parents=True, exist_ok=True)
        nets.append(_build(case, xp, folder, seed))
    ref, test = nets
    rng = numpy.random.default_rng(seed)

    # same parameters (from the host) and inputs on both sides
    layer_ref, layer_test = ref.layers[-1], test.layers[-1]
    for k, (a, b) in enumerate(zip(layer_ref.blobs, layer_test.blobs)):
        values = (rng.uniform(0.5, 1.5, size=a.shape) if case.params == "p" else rng.normal(size=a.shape) * 0.5)
        a.data[...] = xp_ref.asarray(values, dtype=a.dtype)
        b.data[...] = xp_test.asarray(values, dtype=b.dtype)
    for i, (shape, kind) in enumerate(case.bottoms):
        value = _input(shape, kind, rng)
        for net in nets:
            net.blobs[f"b{i}"].data[...] = net.xp.asarray(value, dtype=net.dtype)
    if case.feed:
        for net in nets:
            case.feed(net.layers[-1], seed)

    for net in nets:
        net.forward()
    for i in range(case.tops):
        _assert_close(f"{case.id}: top t{i}", test.blobs[f"t{i}"].data, ref.blobs[f"t{i}"].data, rtol, atol)
    for k, (a, b) in enumerate(zip(layer_ref.blobs, layer_test.blobs)):
        _assert_close(f"{case.id}: param {k} after forward", b.data, a.data, rtol, atol)
    if case.compare_files:
        _compare_h5(case, workdir, rtol, atol)
    if not case.backward:
        return

    for i in range(case.tops):
        name = f"t{i}"
        if ref.blob_loss_weights.get(name, 0.0):
            continue  # a loss top's diff is its loss weight, set by forward
        value = rng.normal(size=ref.blobs[name].shape)
        for net in nets:
            net.blobs[name].diff[...] = net.xp.asarray(value, dtype=net.dtype)
    for net in nets:
        net.clear_param_diffs()
        for i in range(len(case.bottoms)):
            net.blobs[f"b{i}"].diff[...] = 0
        net.backward()
    needs = ref.bottom_need_backward[-1]
    for i in range(len(case.bottoms)):
        if needs[i]:
            _assert_close(f"{case.id}: bottom b{i} diff", test.blobs[f"b{i}"].diff, ref.blobs[f"b{i}"].diff,
                          rtol, atol)
    for k, (a, b) in enumerate(zip(layer_ref.blobs, layer_test.blobs)):
        _assert_close(f"{case.id}: param {k} diff", b.diff, a.diff, rtol, atol)


def _compare_h5(case, workdir, rtol, atol):
    import h5py

    with h5py.File(workdir / "ref" / "out.h5", "r") as a, h5py.File(workdir / "test" / "out.h5", "r") as b:
        assert sorted(a) == sorted(b), f"{case.id}: datasets {sorted(b)} vs reference {sorted(a)}"
        for key in a:
            _assert_close(f"{case.id}: file dataset {key}", b[key][()], a[key][()], rtol, atol)
