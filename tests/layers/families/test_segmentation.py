"""layers/families/segmentation.py (Interp, Upsample, SegNet's BN) and pooling's ceil_mode.

OpenCV's dnn has no Upsample or BN, and no Interp with shrink_factor: these are compared with
independent torch computations (torch is a test-only dependency; skipped without it). The
layers OpenCV does run are compared with it in tests/test_fork_layers_opencv.py."""

import numpy
import pytest
from family_helpers import randn, run

from brewnet.layers.base import LayerError
from brewnet.netdef import caffe_pb2


def _torch():
    torch = pytest.importorskip("torch")
    torch.set_default_dtype(torch.float64)
    return torch


def _forward_backward(layer_text, arrays, dy_seed=0, n_tops=1, phase=caffe_pb2.TEST):
    layer, bottom, top = run(layer_text, arrays, n_tops=n_tops, phase=phase)
    dy = numpy.random.default_rng(dy_seed).standard_normal(top[0].shape)
    top[0].diff[...] = dy
    for t in top[1:]:
        t.diff[...] = 0
    for blob in layer.blobs:
        blob.diff[...] = 0
    layer.backward(top, [True] + [False] * (len(bottom) - 1), bottom)
    return layer, bottom, top, dy


@pytest.mark.parametrize("params, size", [
    ("zoom_factor: 3", None), ("height: 9 width: 4", (9, 4)), ("shrink_factor: 2", None),
    ("shrink_factor: 2 zoom_factor: 3", None), ("height: 1 width: 6", (1, 6)),
])
def test_interp_is_torch_bilinear_with_aligned_corners(params, size):
    torch = _torch()
    x = randn(2, 3, 5, 7)
    layer, bottom, top, dy = _forward_backward(f'name: "i" type: "Interp" interp_param {{ {params} }}', [x])
    expected_size = {"zoom_factor: 3": (13, 19), "shrink_factor: 2": (3, 4),
                     "shrink_factor: 2 zoom_factor: 3": (7, 10)}.get(params, size)
    assert top[0].shape[2:] == expected_size
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.interpolate(tx, size=expected_size, mode="bilinear", align_corners=True)
    ty.backward(torch.tensor(dy))
    # the fork (and brewnet) places output pixels in float32: weights exact only to ~1e-7
    numpy.testing.assert_allclose(top[0].data, ty.detach().numpy(), atol=1e-5)
    numpy.testing.assert_allclose(bottom[0].diff, tx.grad.numpy(), atol=1e-5)


def test_interp_crops_by_its_negative_pads():
    x = randn(1, 2, 6, 6)
    _, _, top = run('name: "i" type: "Interp" interp_param { zoom_factor: 2 pad_beg: -1 pad_end: -2 }', [x])
    _, _, plain = run('name: "i" type: "Interp" interp_param { zoom_factor: 2 }', [x[:, :, 1:4, 1:4]])
    numpy.testing.assert_allclose(top[0].data, plain[0].data)
    with pytest.raises(LayerError, match="pad_end <= 0"):
        run('name: "i" type: "Interp" interp_param { zoom_factor: 2 pad_beg: 1 }', [x])


def _pool_with_mask(x):
    layer, bottom, top = run('name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }',
                             [x], n_tops=2)
    return numpy.array(top[0].data), numpy.array(top[1].data)


@pytest.mark.parametrize("hw, params", [((6, 8), "scale: 2"), ((5, 7), "upsample_h: 5 upsample_w: 7"),
                                         ((5, 8), "scale: 2 pad_out_h: true")])
def test_upsample_with_a_max_pooling_mask_is_torch_max_unpool(hw, params):
    torch = _torch()
    x = randn(2, 3, *hw)
    pooled, mask = _pool_with_mask(x)
    tpooled, indices = torch.nn.functional.max_pool2d(torch.tensor(x), 2, 2, ceil_mode=True, return_indices=True)
    numpy.testing.assert_array_equal(mask, indices.numpy())  # Pooling's mask top is torch's indices
    layer, bottom, top, dy = _forward_backward(f'name: "u" type: "Upsample" upsample_param {{ {params} }}',
                                               [pooled, mask])
    assert top[0].shape == x.shape
    tin = torch.tensor(pooled, requires_grad=True)
    tout = torch.nn.functional.max_unpool2d(tin, indices, 2, 2, output_size=hw)
    tout.backward(torch.tensor(dy))
    numpy.testing.assert_array_equal(top[0].data, tout.detach().numpy())
    numpy.testing.assert_array_equal(bottom[0].diff, tin.grad.numpy())


def test_upsample_refuses_a_mask_beyond_its_output():
    pooled, mask = _pool_with_mask(randn(1, 1, 8, 8))
    with pytest.raises(LayerError, match="mask index out of range"):
        run('name: "u" type: "Upsample" upsample_param { upsample_h: 4 upsample_w: 4 }', [pooled, mask])


BN_FILLERS = 'scale_filler { type: "uniform" min: 0.5 max: 1.5 } shift_filler { type: "gaussian" std: 1 }'


@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_segnet_bn_learn_is_batch_norm_by_the_batch_in_every_phase(phase):
    torch = _torch()
    x = randn(4, 3, 5, 2) * 3 + 1
    layer, bottom, top, dy = _forward_backward(f'name: "b" type: "BN" bn_param {{ {BN_FILLERS} }}', [x],
                                               n_tops=3, phase=phase)
    scale, shift = (numpy.array(b.data).reshape(-1) for b in layer.blobs)
    tx = torch.tensor(x, requires_grad=True)
    tw, tb = torch.tensor(scale, requires_grad=True), torch.tensor(shift, requires_grad=True)
    ty = torch.nn.functional.batch_norm(tx, None, None, tw, tb, training=True, eps=1e-9)
    ty.backward(torch.tensor(dy))
    numpy.testing.assert_allclose(top[0].data, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    numpy.testing.assert_allclose(bottom[0].diff, tx.grad.numpy(), rtol=1e-8, atol=1e-10)
    numpy.testing.assert_allclose(layer.blobs[0].diff.reshape(-1), tw.grad.numpy(), rtol=1e-8)
    numpy.testing.assert_allclose(layer.blobs[1].diff.reshape(-1), tb.grad.numpy(), rtol=1e-8)
    numpy.testing.assert_allclose(top[1].data.reshape(-1), x.mean(axis=(0, 2, 3)))
    numpy.testing.assert_allclose(top[2].data.reshape(-1), x.var(axis=(0, 2, 3)))


def test_segnet_bn_inference_is_scale_and_shift():
    x = randn(2, 3, 2, 2)
    layer, _, top = run(f'name: "b" type: "BN" bn_param {{ bn_mode: INFERENCE {BN_FILLERS} }}', [x])
    scale, shift = (numpy.array(b.data) for b in layer.blobs)
    numpy.testing.assert_allclose(top[0].data, scale * x + shift)


@pytest.mark.parametrize("ceil", [True, False])
@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_pooling_ceil_mode_is_torch_rounding(ceil, pool):
    torch = _torch()
    x = randn(2, 2, 7, 8)
    _, _, top = run(f'name: "p" type: "Pooling" pooling_param {{ pool: {pool} kernel_size: 3 stride: 2 pad: 1 '
                    f'ceil_mode: {str(ceil).lower()} }}', [x])
    op = torch.nn.functional.max_pool2d if pool == "MAX" else torch.nn.functional.avg_pool2d
    want = op(torch.tensor(x), 3, 2, 1, ceil_mode=ceil).numpy()
    # Caffe's AVE divides by the window clipped to image + pad, as torch's count_include_pad
    numpy.testing.assert_allclose(top[0].data, want, rtol=1e-12)


def test_pooling_ceil_mode_and_round_mode_together_are_refused():
    with pytest.raises(LayerError, match="not both"):
        run('name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 2 round_mode: FLOOR ceil_mode: false }',
            [randn(1, 1, 4, 4)])


# -- DenseImageData ------------------------------------------------------------------------
def _dense_dataset(tmp_path, n=3, hw=(6, 8)):
    """n gray images whose every pixel is 10 * label + 5, and their label images."""
    from PIL import Image

    rng = numpy.random.default_rng(7)
    lines = []
    for i in range(n):
        label = rng.integers(0, 4, size=hw).astype(numpy.uint8)
        Image.fromarray(label * 10 + 5).convert("RGB").save(tmp_path / f"img{i}.png")
        Image.fromarray(label).save(tmp_path / f"lab{i}.png")
        lines.append(f"img{i}.png lab{i}.png")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "list.txt"


def _dense_net(tmp_path, params, transform=""):
    from brewnet.layers.net import Net
    from brewnet.netdef import parse_net

    source = _dense_dataset(tmp_path)
    text = (f'name: "d" layer {{ name: "data" type: "DenseImageData" top: "data" top: "label" '
            f'{transform} dense_image_data_param {{ source: "{source}" root_folder: "{tmp_path}/" {params} }} }}')
    return Net(parse_net(text), phase=caffe_pb2.TRAIN)


def test_dense_image_data_cuts_image_and_label_alike(tmp_path):
    net = _dense_net(tmp_path, "batch_size: 2 crop_height: 4 crop_width: 5 mirror: true shuffle: true",
                     "transform_param { mean_value: 5 scale: 0.5 }")
    for _ in range(4):  # past the end of the list, reshuffled
        net.forward()
        data, label = net.blobs["data"].data, net.blobs["label"].data
        assert data.shape == (2, 3, 4, 5) and label.shape == (2, 1, 4, 5)
        assert set(numpy.unique(label)) <= {0, 1, 2, 3}
        # every channel of every pixel is (10 * label + 5 - mean 5) * scale 0.5
        numpy.testing.assert_array_equal(data, numpy.broadcast_to(label * 5, data.shape))


def test_dense_image_data_resizes_labels_with_nearest_neighbours(tmp_path):
    net = _dense_net(tmp_path, "batch_size: 3 new_height: 9 new_width: 11")
    net.forward()
    label = net.blobs["label"].data
    assert label.shape == (3, 1, 9, 11) and set(numpy.unique(label)) <= {0, 1, 2, 3}


def test_dense_image_data_refuses_transform_crops(tmp_path):
    with pytest.raises(LayerError, match="crop_height/crop_width and mirror"):
        _dense_net(tmp_path, "batch_size: 1", "transform_param { crop_size: 3 }")
