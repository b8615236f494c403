"""Input, DummyData, Parameter and Silence (layers/families/sources.py): Caffe semantics
and Caffe's own numbers."""

import numpy
import pytest

from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.netdef import DefinitionError

from family_helpers import check_reference_case, randn, reference_case_names, run


def test_silence_zeroes_bottom_diffs():
    layer = make_layer('name: "s" type: "Silence"')
    bottom, top = setup_layer(layer, [randn(2, 3), randn(4)], n_tops=0)
    layer.forward(bottom, top)
    for b in bottom:
        b.diff[...] = 3
    layer.backward(top, [True, False], bottom)
    assert not bottom[0].diff.any() and (bottom[1].diff == 3).all()


def test_parameter():
    text = 'name: "p" type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }'
    layer, _, top = run(text, [])
    assert top[0].shape == (2, 3) and not top[0].data.any()  # fresh blob: zeros


def test_input_shapes():
    layer = make_layer('name: "i" type: "Input" input_param { shape { dim: 2 dim: 3 } shape { dim: 4 } }')
    _, top = setup_layer(layer, [], n_tops=2)
    assert [t.shape for t in top] == [(2, 3), (4,)]
    layer = make_layer('name: "i" type: "Input" input_param { shape { dim: 5 } }')
    _, top = setup_layer(layer, [], n_tops=3)
    assert [t.shape for t in top] == [(5,)] * 3


def test_dummy_data():
    _, _, top = run('name: "d" type: "DummyData" dummy_data_param { shape { dim: 2 dim: 3 } '
                    'data_filler { type: "constant" value: 1.5 } }', [])
    assert top[0].shape == (2, 3) and (top[0].data == 1.5).all()
    layer, bottom, top = run('name: "d" type: "DummyData" dummy_data_param { num: 2 channels: 3 height: 1 width: 2 '
                             'num: 1 channels: 1 height: 1 width: 1 '
                             'data_filler { type: "gaussian" } data_filler { type: "constant" value: 2 } }',
                             [], n_tops=2)
    assert top[0].shape == (2, 3, 1, 2) and top[1].shape == (1, 1, 1, 1)
    first = top[0].data.copy()
    assert first.std() > 0 and top[1].data[0, 0, 0, 0] == 2
    layer.forward(bottom, top)  # random fillers refill on every forward
    assert not numpy.array_equal(first, top[0].data)
    _, _, top = run('name: "d" type: "DummyData" dummy_data_param { shape { dim: 3 } }', [], n_tops=2)
    assert all(t.shape == (3,) and not t.data.any() for t in top)
    with pytest.raises(DefinitionError):
        run('name: "d" type: "DummyData" dummy_data_param { shape { dim: 3 } shape { dim: 2 } }', [], n_tops=3)


@pytest.mark.parametrize("case", reference_case_names("sources"))
def test_caffe_reference(fixtures, case):
    check_reference_case(fixtures, case)
