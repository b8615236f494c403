"""LRN (layers/families/lrn.py): values against naive references and Caffe's own numbers;
its gradient cases are in tests/layers/gradient_cases.py."""

import numpy
import pytest

from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.netdef import DefinitionError

from family_helpers import check_vision_case, vision_case_names

RNG = numpy.random.default_rng(7)


def test_lrn_across_values():
    x = RNG.standard_normal((2, 7, 3, 2))
    layer = make_layer('name: "n" type: "LRN" lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 }')
    bottom, top = setup_layer(layer, [x])
    layer.forward(bottom, top)
    sq = numpy.pad(x ** 2, ((0, 0), (2, 2), (0, 0), (0, 0)))
    scale = 2 + 0.5 / 5 * sum(sq[:, i:i + 7] for i in range(5))
    numpy.testing.assert_allclose(top[0].data, x * scale ** -0.75, rtol=1e-12)


def test_lrn_within_values():
    # WITHIN_CHANNEL ignores k (Caffe shifts by 1) and divides by size^2 at borders too
    x = RNG.standard_normal((1, 2, 4, 3))
    layer = make_layer('name: "n" type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 7 '
                       'norm_region: WITHIN_CHANNEL }')
    bottom, top = setup_layer(layer, [x])
    layer.forward(bottom, top)
    sq = numpy.pad(x ** 2, ((0, 0), (0, 0), (1, 1), (1, 1)))
    s = sum(sq[:, :, i:i + 4, j:j + 3] for i in range(3) for j in range(3)) / 9
    numpy.testing.assert_allclose(top[0].data, x * (1 + 0.5 * s) ** -0.75, rtol=1e-12)


def test_lrn_even_size_rejected():
    with pytest.raises(DefinitionError, match="odd"):
        setup_layer(make_layer('name: "n" type: "LRN" lrn_param { local_size: 4 }'), [numpy.zeros((1, 4, 2, 2))])


@pytest.mark.parametrize("name", vision_case_names("lrn"))
def test_vision_case_matches_caffe(fixtures, name):
    check_vision_case(fixtures, name)
