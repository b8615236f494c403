"""DataTransformer against values computed from Caffe's per-pixel definition:
out[c, h, w'] = (x[c, h_off+h, w_off+w] - mean[c, h_off+h, w_off+w] or mean_value[c]) * scale,
w' = W-1-w when mirrored; offsets random at TRAIN, centred at TEST."""

import numpy
import pytest
from google.protobuf import text_format

from brewnet.layers.dataio import db
from brewnet.layers.dataio.transformer import DataTransformer
from brewnet.netdef import DefinitionError, caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def make(text, phase=TEST, dtype=numpy.float32, seed=0):
    param = text_format.Parse(text, caffe_pb2.TransformationParameter())
    return DataTransformer(param, phase, numpy.random.default_rng(seed), dtype, "layer 't'")


def caffe_sample(x, h_off, w_off, size, mirror, scale, mean=None, mean_values=None):
    """One sample the way data_transformer.cpp loops over it."""
    c_n, height, width = x.shape
    out = numpy.zeros((c_n, size[0], size[1]), dtype=numpy.float64)
    for c in range(c_n):
        for h in range(size[0]):
            for w in range(size[1]):
                value = float(x[c, h_off + h, w_off + w])
                if mean is not None:
                    value -= float(mean[c, h_off + h, w_off + w])
                elif mean_values is not None:
                    value -= float(mean_values[c])
                out[c, h, size[1] - 1 - w if mirror else w] = value * scale
    return out


def batch(n=3, c=2, h=5, w=6, seed=1):
    return numpy.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=numpy.uint8)


def test_center_crop_mean_values_scale():
    x = batch()
    out = make("crop_size: 3 scale: 0.5 mean_value: 10 mean_value: 20")(x)
    assert out.dtype == numpy.float32 and out.shape == (3, 2, 3, 3)
    for i in range(3):  # centre offsets (5-3)//2 = 1, (6-3)//2 = 1
        assert numpy.allclose(out[i], caffe_sample(x[i], 1, 1, (3, 3), False, 0.5, mean_values=[10, 20]), atol=0)


def test_single_mean_value_replicated_and_no_mean():
    x = batch()
    out = make("mean_value: 3")(x)
    assert numpy.array_equal(out, x.astype(numpy.float32) - 3)
    assert numpy.array_equal(make("scale: 0.00390625")(x), x.astype(numpy.float32) * numpy.float32(0.00390625))


def test_mean_file_subtracted_at_the_crop_offset(tmp_path):
    x = batch(n=2, c=3, h=6, w=6)
    mean = numpy.random.default_rng(5).uniform(0, 255, (3, 6, 6)).astype(numpy.float32)
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(db.mean_blobproto(mean).SerializeToString())
    out = make(f'crop_size: 4 mean_file: "{path}" scale: 2')(x)
    for i in range(2):
        ref = caffe_sample(x[i], 1, 1, (4, 4), False, 2.0, mean=mean)
        assert numpy.allclose(out[i], ref, rtol=1e-6)
    # exact float32 arithmetic: (x - mean) * scale
    expect = (x.astype(numpy.float32) - mean)[:, :, 1:5, 1:5] * numpy.float32(2)
    assert numpy.array_equal(out, expect)


def test_random_crop_and_mirror_at_train(tmp_path):
    x = batch(n=64, c=2, h=5, w=5, seed=3)
    mean = numpy.random.default_rng(6).uniform(0, 255, (2, 5, 5)).astype(numpy.float32)
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(db.mean_blobproto(mean).SerializeToString())
    out = make(f'crop_size: 3 mirror: true mean_file: "{path}" scale: 0.5', phase=TRAIN)(x)
    seen = set()
    for i in range(64):
        matches = [(h, w, m) for h in range(3) for w in range(3) for m in (False, True)
                   if numpy.allclose(out[i], caffe_sample(x[i], h, w, (3, 3), m, 0.5, mean=mean), rtol=1e-6)]
        assert len(matches) == 1, f"sample {i} is no single valid crop"
        seen.add(matches[0])
    assert len(seen) > 10  # offsets and mirroring vary over the batch


def test_mirror_without_crop_is_random_in_both_phases():
    x = batch(n=40)
    for phase in (TRAIN, TEST):
        out = make("mirror: true", phase=phase)(x)
        flipped = [numpy.array_equal(o, s[:, :, ::-1].astype(numpy.float32)) for o, s in zip(out, x)]
        plain = [numpy.array_equal(o, s.astype(numpy.float32)) for o, s in zip(out, x)]
        assert all(f or p for f, p in zip(flipped, plain)) and any(flipped) and any(plain)


def test_center_crop_is_deterministic_at_test():
    x = batch(n=4, h=7, w=7)
    a = make("crop_size: 4", seed=1)(x)
    b = make("crop_size: 4", seed=2)(x)
    assert numpy.array_equal(a, b) and numpy.array_equal(a, x[:, :, 1:5, 1:5].astype(numpy.float32))


def test_dtype_preserved_float64_and_float_input():
    x = batch().astype(numpy.float32) / 7
    out = make("scale: 3", dtype=numpy.float64)(x)
    assert out.dtype == numpy.float64 and numpy.allclose(out, x * 3.0)


def test_errors(tmp_path):
    with pytest.raises(DefinitionError, match="mean_file and mean_value"):
        make('mean_file: "m" mean_value: 1')
    with pytest.raises(DefinitionError, match="force_color and force_gray"):
        make("force_color: true force_gray: true")
    with pytest.raises(DefinitionError, match="crop_size 9"):
        make("crop_size: 9")(batch())
    with pytest.raises(DefinitionError, match="1 mean_value or as many as channels: 2"):
        make("mean_value: 1 mean_value: 2 mean_value: 3")(batch())
    with pytest.raises(DefinitionError, match="does not exist"):
        make(f'mean_file: "{tmp_path}/nothing.binaryproto"')
    path = tmp_path / "m.binaryproto"
    path.write_bytes(db.mean_blobproto(numpy.zeros((2, 4, 4), numpy.float32)).SerializeToString())
    with pytest.raises(DefinitionError, match="mean file has shape"):
        make(f'mean_file: "{path}"')(batch())
