"""Checks that span several families: float32 stays float32 through InnerProduct, the
arithmetic and the normalization layers, and the caffe-reference manifest holds the vision
cases that test_conv.py, test_pooling.py, test_lrn.py and test_plumbing.py replay."""

import numpy

from brewnet.netdef import caffe_pb2

from family_helpers import randn, run, vision_cases


def test_float32_preserved():
    cases = [
        ('name: "l" type: "InnerProduct" inner_product_param { num_output: 2 weight_filler { type: "xavier" } }', 1),
        ('name: "l" type: "Softmax"', 1), ('name: "l" type: "Reduction" reduction_param { operation: MEAN }', 1),
        ('name: "l" type: "Eltwise" eltwise_param { coeff: 0.5 coeff: 2 }', 2),
        ('name: "l" type: "BatchNorm"', 1), ('name: "l" type: "MVN"', 1), ('name: "l" type: "Scale"', 1),
    ]
    for text, n in cases:
        for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
            layer, bottom, top = run(text, [randn(2, 3, 2) for _ in range(n)], phase=phase, dtype=numpy.float32)
            top[0].diff[...] = 1
            layer.backward(top, [True] * n, bottom)
            assert top[0].data.dtype == numpy.float32 and bottom[0].diff.dtype == numpy.float32, text
            assert all(b.data.dtype == numpy.float32 for b in layer.blobs), text


def test_vision_fixture_cases_present(fixtures):
    assert len(vision_cases(fixtures)) >= 20
