"""The detection layers of the SSD and Fast R-CNN forks (layers/families/detection.py), against
values worked out by hand from those forks' CPU code; gradients are in tests/layers/gradient_cases.py
and the comparison with OpenCV's implementations in tests/test_fork_vs_opencv_detection.py."""

import numpy
import pytest
from family_helpers import randn, run

from brewnet.layers.base import LayerError
from brewnet.layers.kernels import cpu_kernels
from brewnet.layers.kernels import detection as kernels
from brewnet.netdef import caffe_pb2, parse_net
from brewnet.netdef.errors import DefinitionError

VAR4 = "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"


def test_permute_puts_unnamed_axes_after_in_order():
    x = randn(2, 3, 4, 5)
    layer, _, top = run('name: "p" type: "Permute" permute_param { order: 0 order: 3 }', [x])
    assert layer.order == (0, 3, 1, 2)
    numpy.testing.assert_array_equal(top[0].data, x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("order, message", [("order: 4", "order 4 is not an axis"), ("order: 1 order: 1", "twice")])
def test_permute_refuses_bad_orders(order, message):
    with pytest.raises(LayerError, match=message):
        run(f'name: "p" type: "Permute" permute_param {{ {order} }}', [randn(2, 3, 4, 5)])


@pytest.mark.parametrize("across, shared", [(True, True), (False, True), (True, False), (False, False)])
def test_normalize_divides_by_the_l2_norm_and_scales(across, shared):
    x = randn(2, 3, 2, 2)
    text = (f'name: "n" type: "Normalize" norm_param {{ across_spatial: {str(across).lower()} '
            f'channel_shared: {str(shared).lower()} eps: 0.5 scale_filler {{ type: "constant" value: 3 }} }}')
    layer, _, top = run(text, [x])
    assert layer.blobs[0].shape == (() if shared else (3,))
    axes = (1, 2, 3) if across else (1,)
    want = 3 * x / numpy.sqrt((x * x).sum(axis=axes, keepdims=True) + 0.5)
    numpy.testing.assert_allclose(top[0].data, want, rtol=1e-12)


def test_normalize_checks_a_loaded_scale_against_channel_shared():
    layer_text = 'name: "n" type: "Normalize" norm_param { channel_shared: false }'
    from brewnet.layers.gradcheck import make_layer, setup_layer

    layer = make_layer(layer_text)
    layer.blobs.append(layer.make_blob((1,)))
    with pytest.raises(LayerError, match="channel_shared false with 3 channels needs 3"):
        setup_layer(layer, [randn(1, 3, 2, 2)])


def _priors(params, feature=(1, 1, 2, 3), image=(1, 3, 20, 30)):
    _, _, top = run(f'name: "pb" type: "PriorBox" prior_box_param {{ {params} }}',
                    [numpy.zeros(feature), numpy.zeros(image)])
    return top[0].data[0, 0].reshape(-1, 4), top[0].data[0, 1].reshape(-1, 4)


def test_prior_box_order_sizes_and_variances():
    boxes, variances = _priors(f"min_size: 4 max_size: 9 aspect_ratio: 2 flip: true {VAR4}")
    # per cell: min box, sqrt(min * max) box, ratio 2, ratio 1/2; cells row-major, step = 10
    assert boxes.shape == (2 * 3 * 4, 4)
    cx, cy = 5.0, 5.0  # the first cell's centre (offset 0.5)
    side = 6.0  # sqrt(4 * 9)
    w2, h2 = 4 * numpy.sqrt(2), 4 / numpy.sqrt(2)
    want = numpy.array([[cx - 2, cy - 2, cx + 2, cy + 2], [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2],
                        [cx - w2 / 2, cy - h2 / 2, cx + w2 / 2, cy + h2 / 2],
                        [cx - h2 / 2, cy - w2 / 2, cx + h2 / 2, cy + w2 / 2]]) / [30, 20, 30, 20]
    numpy.testing.assert_allclose(boxes[:4], want, rtol=1e-6)
    # the next cell is one step to the right; the second row one step down
    numpy.testing.assert_allclose(boxes[4] - boxes[0], [10 / 30, 0, 10 / 30, 0], atol=1e-7)
    numpy.testing.assert_allclose(boxes[12] - boxes[0], [0, 10 / 20, 0, 10 / 20], atol=1e-7)
    numpy.testing.assert_allclose(variances, numpy.tile([0.1, 0.1, 0.2, 0.2], (24, 1)), rtol=1e-6)


def test_prior_box_reads_sizes_as_ints_and_honours_explicit_geometry():
    # SSD keeps min_size in an int: 4.9 is 4; img/step/offset given explicitly replace the bottoms'
    boxes, variances = _priors("min_size: 4.9 img_h: 40 img_w: 50 step_h: 7 step_w: 9 offset: 0 variance: 0.3")
    numpy.testing.assert_allclose(boxes[0], [-2 / 50, -2 / 40, 2 / 50, 2 / 40], rtol=1e-6)
    # cell (row 1, column 1) of the 2 x 3 map: centre (9, 7)
    numpy.testing.assert_allclose(boxes[4], [(9 - 2) / 50, (7 - 2) / 40, (9 + 2) / 50, (7 + 2) / 40], rtol=1e-6)
    assert numpy.allclose(variances, 0.3)
    clipped, _ = _priors("min_size: 4.9 img_h: 40 img_w: 50 step_h: 7 step_w: 9 offset: 0 clip: true")
    assert clipped.min() == 0 and clipped.max() <= 1


@pytest.mark.parametrize("params, message", [
    ("max_size: 3", "at least one min_size"),
    ("min_size: 4 max_size: 3", "must be greater than min_size"),
    ("min_size: 4 variance: 0.1 variance: 0.2", "1 or 4 positive"),
    ("min_size: 4 step: 3 step_h: 2 step_w: 2", "not both"),
])
def test_prior_box_refuses_bad_parameters(params, message):
    with pytest.raises(LayerError, match=message):
        _priors(params)


PRIORS = numpy.array([[0.1, 0.1, 0.3, 0.5], [0.5, 0.4, 0.9, 0.6]])
VARIANCES = numpy.array([[0.1, 0.1, 0.2, 0.2]] * 2)


@pytest.mark.parametrize("code, in_target", [(1, False), (1, True), (2, False), (2, True), (3, False), (3, True)])
def test_decode_boxes_follows_ssd_for_each_code_type(code, in_target):
    loc = randn(2, 4) * 0.5
    got = kernels.decode_boxes(numpy, loc[None], PRIORS, VARIANCES, code, in_target)[0]
    v = numpy.ones_like(VARIANCES) if in_target else VARIANCES
    w, h = PRIORS[:, 2] - PRIORS[:, 0], PRIORS[:, 3] - PRIORS[:, 1]
    if code == 1:
        want = PRIORS + v * loc
    elif code == 3:
        want = PRIORS + v * loc * numpy.stack([w, h, w, h], 1)
    else:
        cx = v[:, 0] * loc[:, 0] * w + (PRIORS[:, 0] + PRIORS[:, 2]) / 2
        cy = v[:, 1] * loc[:, 1] * h + (PRIORS[:, 1] + PRIORS[:, 3]) / 2
        bw, bh = numpy.exp(v[:, 2] * loc[:, 2]) * w, numpy.exp(v[:, 3] * loc[:, 3]) * h
        want = numpy.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    numpy.testing.assert_allclose(got, want, rtol=1e-12)


def _ssd_nms(boxes, scores, score_threshold, nms_threshold, top_k, eta):
    """SSD's ApplyNMSFast written out candidate by candidate (the reference for kernels.nms)."""
    order = [i for i in numpy.argsort(-scores, kind="stable") if scores[i] > score_threshold]
    order = order[:top_k] if top_k > -1 else order
    kept, threshold = [], nms_threshold
    for i in order:
        if all(kernels.overlaps(boxes[i:i + 1], boxes[k:k + 1])[0, 0] <= threshold for k in kept):
            kept.append(i)
            if eta < 1 and threshold > 0.5:
                threshold *= eta
    return kept


@pytest.mark.parametrize("nms_threshold, top_k, eta", [(0.3, -1, 1.0), (0.5, 30, 1.0), (0.9, -1, 0.8), (0.7, 25, 0.9)])
def test_nms_is_ssds_greedy_suppression(nms_threshold, top_k, eta):
    rng = numpy.random.default_rng(7)
    corner = rng.uniform(0, 0.6, (60, 2))
    boxes = numpy.concatenate([corner, corner + rng.uniform(0.1, 0.4, (60, 2))], axis=1)
    scores = rng.uniform(0, 1, 60)
    got = kernels.nms(boxes, scores, 0.2, nms_threshold, top_k, eta)
    assert list(got) == _ssd_nms(boxes, scores, 0.2, nms_threshold, top_k, eta)
    assert 0 < len(got) < 60


def test_overlap_is_zero_for_touching_and_inverted_boxes():
    a = numpy.array([[0.0, 0.0, 0.5, 0.5]])
    b = numpy.array([[0.5, 0.0, 1.0, 0.5], [0.25, 0.25, 0.75, 0.75], [0.4, 0.4, 0.3, 0.3]])
    numpy.testing.assert_allclose(kernels.overlaps(a, b)[0], [0, 0.0625 / (0.25 + 0.25 - 0.0625), 0])


def _detection_net(num_classes=3, params="", priors=PRIORS):
    p = len(priors)
    prior_blob = numpy.stack([priors.reshape(-1), numpy.tile([0.1, 0.1, 0.2, 0.2], p)])[None]
    text = (f'name: "d" type: "DetectionOutput" detection_output_param {{ num_classes: {num_classes} '
            f'code_type: CORNER {params} }}')
    return text, prior_blob


def test_detection_output_rows_labels_in_order_best_first():
    text, prior = _detection_net(params="confidence_threshold: 0.3 nms_param { nms_threshold: 0.5 }")
    loc = numpy.zeros((2, 2 * 4))
    conf = numpy.array([[0.1, 0.8, 0.1, 0.2, 0.3, 0.5], [0.9, 0.05, 0.05, 0.9, 0.05, 0.05]])
    _, _, top = run(text, [loc, conf, prior])
    rows = top[0].data.reshape(-1, 7)
    # image 0: label 1 (prior 0, 0.8), label 2 (prior 1, 0.5); image 1: nothing above 0.3
    numpy.testing.assert_allclose(rows, [[0, 1, 0.8, *PRIORS[0]], [0, 2, 0.5, *PRIORS[1]]])


def test_detection_output_empty_is_one_row_of_minus_one_per_image():
    text, prior = _detection_net(params="confidence_threshold: 0.99")
    _, _, top = run(text, [numpy.zeros((3, 8)), numpy.full((3, 6), 0.5), prior])
    assert top[0].shape == (1, 1, 3, 7)
    numpy.testing.assert_array_equal(top[0].data[0, 0], [[0] + [-1] * 6, [1] + [-1] * 6, [2] + [-1] * 6])


def test_detection_output_keep_top_k_and_per_class_locations():
    priors = numpy.array([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7], [0.1, 0.6, 0.3, 0.9]])
    text, prior = _detection_net(params="share_location: false keep_top_k: 2 background_label_id: 0", priors=priors)
    loc = numpy.zeros((1, 3, 3, 4))
    loc[0, :, 2, :] = 1.0  # class 2's boxes moved by the variance: (0.1, 0.1, 0.2, 0.2)
    conf = numpy.array([[[0.0, 0.7, 0.6], [0.0, 0.2, 0.9], [0.0, 0.65, 0.1]]])
    _, _, top = run(text, [loc.reshape(1, -1), conf.reshape(1, -1), prior])
    rows = top[0].data.reshape(-1, 7)
    # the two best of all classes (0.9: class 2 prior 1; 0.7: class 1 prior 0), label order
    numpy.testing.assert_allclose(rows, [[0, 1, 0.7, *priors[0]], [0, 2, 0.9, *(priors[1] + [0.1, 0.1, 0.2, 0.2])]])


def test_detection_output_checks_bottom_sizes():
    text, prior = _detection_net()
    with pytest.raises(LayerError, match="confidence bottom"):
        run(text, [numpy.zeros((1, 8)), numpy.zeros((1, 5)), prior])


def test_roi_pooling_rounds_like_c_and_zeroes_empty_bins():
    x = numpy.arange(2 * 1 * 4 * 4, dtype=float).reshape(2, 1, 4, 4)
    # x 0.5: corners 1.5 -> 2 and 2.5 -> 3 (C's round; numpy's would give 2 and 2)
    rois = numpy.array([[1, 3, 3, 5, 5], [0, 0, 0, 7, 1], [0, 20, 20, 30, 30]])
    _, _, top = run('name: "r" type: "ROIPooling" roi_pooling_param { pooled_h: 1 pooled_w: 1 spatial_scale: 0.5 }',
                    [x, rois])
    assert top[0].data[:, 0, 0, 0].tolist() == [x[1, 0, 3, 3], x[0, 0, 1, 3], 0.0]
    layer, _, top = run('name: "r" type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 2 }',
                        [x, numpy.array([[0, 0, 0, 3, 3]])])
    numpy.testing.assert_array_equal(top[0].data[0, 0], [[5, 7], [13, 15]])
    numpy.testing.assert_array_equal(layer.argmax[0, 0], [[5, 7], [13, 15]])


def test_roi_pooling_refuses_rois_of_missing_images():
    with pytest.raises(LayerError, match="names image 2 of a batch of 2"):
        run('name: "r" type: "ROIPooling" roi_pooling_param { pooled_h: 1 pooled_w: 1 }',
            [randn(2, 1, 3, 3), numpy.array([[2, 0, 0, 1, 1]])])


def test_smooth_l1_loss_value():
    a, b = randn(2, 6), randn(2, 6)
    w_in, w_out = numpy.abs(randn(2, 6)), numpy.abs(randn(2, 6))
    _, _, top = run('name: "s" type: "SmoothL1Loss" smooth_l1_loss_param { sigma: 2 }', [a, b, w_in, w_out])
    d = w_in * (a - b)
    f = numpy.where(numpy.abs(d) < 0.25, 0.5 * 4 * d * d, numpy.abs(d) - 0.125)
    assert float(top[0].data) == pytest.approx((w_out * f).sum() / 2, rel=1e-12)
    with pytest.raises(LayerError, match="both"):
        run('name: "s" type: "SmoothL1Loss"', [a, b, w_in])


SSD_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "n" type: "Normalize" bottom: "data" top: "n" norm_param { across_spatial: false channel_shared: false } }
layer { name: "p" type: "Permute" bottom: "n" top: "p" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "pb" type: "PriorBox" bottom: "n" bottom: "data" top: "pb" prior_box_param { min_size: 4 } }
layer { name: "det" type: "DetectionOutput" bottom: "a" bottom: "b" bottom: "pb" top: "det"
  detection_output_param { num_classes: 21 nms_param { nms_threshold: 0.45 top_k: 400 eta: 1.0 }
    save_output_param { label_map_file: "labelmap_voc.prototxt" output_format: "VOC" } code_type: CENTER_SIZE } }
"""


def test_ssd_fields_parse_in_text_and_binary():
    net = parse_net(SSD_NET)
    assert net.layer[4].detection_output_param.code_type == caffe_pb2.PriorBoxParameter.CENTER_SIZE
    # SSD's own field numbers, so its caffemodels parse
    for field, number in (("permute_param", 202), ("prior_box_param", 203), ("detection_output_param", 204),
                          ("norm_param", 206), ("roi_pooling_param", 8266711), ("smooth_l1_loss_param", 8266712)):
        assert caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name[field].number == number
    again = caffe_pb2.NetParameter.FromString(net.SerializeToString())
    assert again == net


def test_ssd_solver_fields_that_collide_with_bvlc_are_renumbered():
    fields = caffe_pb2.SolverParameter.DESCRIPTOR.fields_by_name
    assert (fields["eval_type"].number, fields["ap_version"].number) == (1200, 1201)
    assert (fields["layer_wise_reduce"].number, fields["weights"].number) == (41, 42)  # BVLC's stay
    from google.protobuf import text_format

    solver = text_format.Parse('eval_type: "detection" ap_version: "11point" show_per_class_result: true',
                               caffe_pb2.SolverParameter())
    assert solver.eval_type == "detection" and solver.ap_version == "11point"


def test_detection_output_refuses_saving_result_files():
    text, prior = _detection_net(params='save_output_param { output_directory: "/tmp/x" }')
    with pytest.raises(DefinitionError, match="save_output_param"):
        run(text, [numpy.zeros((1, 8)), numpy.zeros((1, 6)), prior])


def test_prior_box_takes_one_bottom_when_the_image_size_is_given():
    _, _, top = run('name: "pb" type: "PriorBox" prior_box_param { min_size: 4 img_size: 20 }', [numpy.zeros((1, 2, 2, 2))])
    numpy.testing.assert_allclose(top[0].data[0, 0, :4], [3 / 20, 3 / 20, 7 / 20, 7 / 20], rtol=1e-6)  # step 10
    with pytest.raises(LayerError, match="bottom 1"):
        run('name: "pb" type: "PriorBox" prior_box_param { min_size: 4 }', [numpy.zeros((1, 2, 2, 2))])


def _roi_pool_by_loops(x, rois, pooled_h, pooled_w, scale):
    """Fast R-CNN's CPU forward, bin by bin (the reference)."""
    out = numpy.zeros((len(rois), x.shape[1], pooled_h, pooled_w))
    for r, (b, *corners) in enumerate(rois):
        x0, y0, x1, y1 = (int(numpy.sign(v * scale) * numpy.floor(abs(v * scale) + 0.5)) for v in corners)
        bh, bw = max(y1 - y0 + 1, 1) / pooled_h, max(x1 - x0 + 1, 1) / pooled_w
        for i in range(pooled_h):
            for j in range(pooled_w):
                h0 = min(max(int(numpy.floor(i * bh)) + y0, 0), x.shape[2])
                h1 = min(max(int(numpy.ceil((i + 1) * bh)) + y0, 0), x.shape[2])
                w0 = min(max(int(numpy.floor(j * bw)) + x0, 0), x.shape[3])
                w1 = min(max(int(numpy.ceil((j + 1) * bw)) + x0, 0), x.shape[3])
                if h1 > h0 and w1 > w0:
                    out[r, :, i, j] = x[int(b), :, h0:h1, w0:w1].max(axis=(1, 2))
    return out


@pytest.mark.parametrize("path, budget", [("compiled", None), ("array", 1 << 23), ("array", 200)])
def test_roi_pooling_matches_the_bin_by_bin_loop(path, budget):
    # the array code takes ROIs in one group, or in many (windows padded per group)
    rng = numpy.random.default_rng(3)
    x = rng.standard_normal((2, 3, 9, 11))
    corner = rng.uniform(-2, 20, (12, 2))
    size = rng.uniform(0, 14, (12, 2)) * rng.choice([[1, 0.2], [0.2, 1], [1, 1]], 12)  # tall, wide and square
    rois = numpy.concatenate([rng.integers(0, 2, (12, 1)), corner, corner + size], axis=1)
    if path == "compiled":
        if cpu_kernels.kernels() is None:
            pytest.skip("numba is not installed")
        with cpu_kernels.enabled_for_test():
            out, argmax = kernels.roi_pool_forward(numpy, x, rois, 3, 2, 0.6)
            dx = kernels.roi_pool_backward(numpy, numpy.ones_like(out), argmax, rois[:, 0].astype(int), x.shape)
    else:
        with cpu_kernels.disabled():
            out, argmax = kernels.roi_pool_forward(numpy, x, rois, 3, 2, 0.6, max_elements=budget)
            dx = kernels.roi_pool_backward(numpy, numpy.ones_like(out), argmax, rois[:, 0].astype(int), x.shape)
    numpy.testing.assert_array_equal(out, _roi_pool_by_loops(x, rois, 3, 2, 0.6))
    # each input element's gradient counts the bins that took it
    counts = numpy.zeros(x.size)
    planes = (rois[:, 0].astype(int)[:, None, None, None] * 3 + numpy.arange(3)[None, :, None, None]) * 99
    numpy.add.at(counts, (planes + argmax)[argmax >= 0], 1)
    numpy.testing.assert_array_equal(dx.reshape(-1), counts)
