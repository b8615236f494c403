"""InnerProduct and Embed (layers/families/inner_product.py): Caffe semantics and Caffe's
own numbers. Their gradient checks are in tests/layers/gradient_cases.py."""

import numpy
import pytest

from brewnet.netdef import DefinitionError

from family_helpers import check_reference_case, randn, reference_case_names, run


def test_inner_product_weight_layout():
    layer, bottom, top = run('name: "ip" type: "InnerProduct" inner_product_param { num_output: 3 transpose: true '
                             'weight_filler { type: "gaussian" } }', [randn(2, 5)])
    assert layer.blobs[0].shape == (5, 3) and layer.blobs[1].shape == (3,)
    numpy.testing.assert_allclose(top[0].data, bottom[0].data @ layer.blobs[0].data)
    layer, _, top = run('name: "ip" type: "InnerProduct" inner_product_param { num_output: 3 axis: -1 }',
                        [randn(2, 4, 5)])
    assert layer.blobs[0].shape == (3, 5) and top[0].shape == (2, 4, 3)


def test_inner_product_rejects_changed_input_size():
    layer, bottom, top = run('name: "ip" type: "InnerProduct" inner_product_param { num_output: 3 }', [randn(2, 5)])
    bottom[0].reshape(2, 6)
    with pytest.raises(DefinitionError, match="'ip'"):
        layer.reshape(bottom, top)


def test_embed_forward():
    text = ('name: "e" type: "Embed" embed_param { num_output: 3 input_dim: 5 '
            'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }')
    idx = numpy.array([[0, 4, 2], [2, 2, 1]], dtype=float)
    layer, _, top = run(text, [idx])
    w, b = layer.blobs[0].data, layer.blobs[1].data
    assert top[0].shape == (2, 3, 3)
    numpy.testing.assert_allclose(top[0].data, w[idx.astype(int)] + b)
    with pytest.raises(DefinitionError, match="out of range"):
        run(text, [numpy.array([5.0])])


@pytest.mark.parametrize("case", reference_case_names("inner_product"))
def test_caffe_reference(fixtures, case):
    check_reference_case(fixtures, case)
