"""The compiled CPU kernels (layers/cpu_kernels.py) against their array-code twins."""

import numpy
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from brewnet.layers.families.conv import Convolution
from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.layers.kernels import cpu_kernels, pooling
from brewnet.layers.kernels.conv_plan import ConvPlan

pytestmark = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="numba is not installed")


def _run(params, x, dy, compiled):
    """(top, mask or None, bottom diff) of one Pooling forward/backward."""
    is_max = "MAX" in params
    layer = make_layer(f'name: "p" type: "Pooling" pooling_param {{ {params} }}', dtype=x.dtype)
    switch = cpu_kernels.enabled_for_test() if compiled else cpu_kernels.disabled()
    with switch:
        bottom, top = setup_layer(layer, [x], n_tops=2 if is_max else 1, dtype=x.dtype)
        layer.forward(bottom, top)
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
    return top[0].data.copy(), (top[1].data.copy() if is_max else None), bottom[0].diff.copy()


# ceil-mode AVE windows past the image divide by zero, as in Caffe
@pytest.mark.filterwarnings("ignore:.*divide:RuntimeWarning")
@settings(max_examples=100, deadline=None)
@given(method=st.sampled_from(["MAX", "AVE"]), k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 3),
       h=st.integers(1, 9), w=st.integers(1, 9), levels=st.sampled_from([3, 1000]),
       dtype=st.sampled_from([numpy.float32, numpy.float64]), seed=st.integers(0, 2 ** 16),
       plane_elements=st.sampled_from([pooling.PLANE_ELEMENTS, 1]))
def test_pooling_kernels_match_array_code(method, k, s, p, h, w, levels, dtype, seed, plane_elements):
    # plane_elements 1: the pass over one output row's windows, which only large planes take
    before = pooling.PLANE_ELEMENTS
    pooling.PLANE_ELEMENTS = plane_elements
    try:
        _compare_with_array_code(method, k, s, p, h, w, levels, dtype, seed)
    finally:
        pooling.PLANE_ELEMENTS = before


def _compare_with_array_code(method, k, s, p, h, w, levels, dtype, seed):
    p = min(p, k - 1)  # Caffe requires pad < kernel
    assume(h + 2 * p >= k and w + 2 * p >= k)
    rng = numpy.random.default_rng(seed)
    x = rng.integers(-levels, levels + 1, size=(2, 3, h, w)).astype(dtype)  # 3 levels: many ties
    params = f"pool: {method} kernel_size: {k} stride: {s} pad: {p}"
    probe = make_layer(f'name: "p" type: "Pooling" pooling_param {{ {params} }}')
    _, top = setup_layer(probe, [x])
    dy = rng.standard_normal(top[0].shape).astype(dtype)
    y_c, mask_c, dx_c = _run(params, x, dy, compiled=True)
    y_a, mask_a, dx_a = _run(params, x, dy, compiled=False)
    tol = 1e-6 if dtype == numpy.float32 else 1e-12
    numpy.testing.assert_allclose(y_c, y_a, rtol=tol, atol=tol)
    if method == "MAX":
        numpy.testing.assert_array_equal(mask_c, mask_a)  # the same (first) maximum
    numpy.testing.assert_allclose(dx_c, dx_a, rtol=tol, atol=tol)


def test_kernels_off_for_cupy_arrays_and_by_switch():
    class NotNumpy:
        pass

    assert not cpu_kernels.enabled(NotNumpy)
    with cpu_kernels.disabled():
        assert not cpu_kernels.enabled(numpy)
    with cpu_kernels.enabled_for_test():
        assert cpu_kernels.enabled(numpy)


def test_brewnet_jit_0_turns_the_kernels_off():
    import subprocess
    import sys

    code = "import numpy; from brewnet.layers.kernels import cpu_kernels; print(cpu_kernels.enabled(numpy))"
    env = dict(__import__("os").environ, BREWNET_JIT="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[3]))
    assert out.stdout.strip() == "False", out.stderr


@settings(max_examples=40, deadline=None)
@given(kh=st.integers(1, 4), kw=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2), d=st.integers(1, 2),
       group=st.sampled_from([1, 2]), cin=st.sampled_from([2, 4, 18]), cout=st.sampled_from([2, 6]),
       h=st.integers(4, 9), w=st.integers(4, 9), seed=st.integers(0, 2 ** 16))
def test_compiled_col2im_data_gradient_matches_array_code(kh, kw, s, p, d, group, cin, cout, h, w, seed):
    from brewnet.layers.kernels import im2col

    assume(h + 2 * p >= d * (kh - 1) + 1 and w + 2 * p >= d * (kw - 1) + 1)
    params = (f"num_output: {cout} kernel_h: {kh} kernel_w: {kw} stride: {s} pad: {p} dilation: {d} "
              f"group: {group} weight_filler {{ type: \"gaussian\" std: 0.5 }}")
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((3, cin, h, w))
    grads = []
    for compiled in (True, False):
        layer = make_layer(f'name: "c" type: "Convolution" convolution_param {{ {params} }}')
        switch = cpu_kernels.enabled_for_test() if compiled else cpu_kernels.disabled()
        # im2col's col2im is under test: group == channels would take the depthwise kernel
        with switch, pytest.MonkeyPatch.context() as patch:
            patch.setattr(ConvPlan, "use_depthwise", False)
            im2col.ConvEngine.force_layout = "A"
            im2col.ConvEngine.dcol_block_bytes = 1  # one sample's column diff at a time
            try:
                bottom, top = setup_layer(layer, [x])
                assert layer.plan.engine.compiled_data_path() == compiled
                layer.forward(bottom, top)
                top[0].diff[...] = numpy.random.default_rng(seed + 1).standard_normal(top[0].shape)
                layer.backward(top, [True], bottom)
            finally:
                im2col.ConvEngine.force_layout = None
                im2col.ConvEngine.dcol_block_bytes = 4 << 20
        grads.append((bottom[0].diff.copy(), layer.blobs[0].diff.copy()))
    for a, b in zip(*grads):
        numpy.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_a_kernel_build_failure_falls_back_to_array_code(monkeypatch, caplog):
    # e.g. numba refusing to cache in a read-only install: warn once, run the array code
    def broken():
        raise RuntimeError("cannot cache function: no locator available")

    monkeypatch.setattr(cpu_kernels, "_build", broken)
    monkeypatch.setitem(cpu_kernels._state, "kernels", None)
    monkeypatch.setitem(cpu_kernels._state, "failed", False)
    with caplog.at_level("WARNING", logger="brewnet"):
        assert cpu_kernels.kernels() is None
    assert not cpu_kernels.enabled(numpy)
    assert "no locator" in caplog.text
