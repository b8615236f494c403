"""The CUDA kernels (layers/kernels/cuda/*.cu) on the CPU, against their numpy twins.

tests/cuda_harness.py compiles each .cu with g++ behind a shim of CUDA's launch model, and
ops.use_host_kernels lets the layers' BREWNET_CUDA_KERNELS hooks run them on numpy arrays. Each
test runs a layer twice, with the switch off (the array code, the reference) and on (the
kernels, through the same ops.py glue a GPU runs), checks the kernels really ran, and compares
tops, bottom gradients and parameter gradients. A last group compiles every .cu to PTX with
nvcc where it is installed.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy
import pytest

from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.layers.kernels import backend
from brewnet.layers.kernels.cuda import ops, sources
from brewnet.netdef import caffe_pb2

TESTS = pathlib.Path(__file__).resolve().parents[2]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
import cuda_harness  # noqa: E402

needs_gxx = pytest.mark.skipif(not cuda_harness.have_compiler(), reason="g++ is not installed")
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    if not cuda_harness.have_compiler():
        pytest.skip("g++ is not installed")
    return cuda_harness.HostKernels()


@pytest.fixture
def switch(host, monkeypatch):
    """``switch(True)`` turns the kernels on (run on the CPU through the harness), ``switch(False)`` off."""
    ops.use_host_kernels(host)

    def set_to(on):
        monkeypatch.setenv(ops.SWITCH, "1" if on else "0")
        host.launches.clear()
        return host

    yield set_to
    ops.use_host_kernels(None)


def run_layer(prototxt, inputs, n_tops=1, phase=caffe_pb2.TEST, seed=0, in_place=False, top_diffs=None, xp=numpy):
    """(top data, bottom diffs, param diffs) of one forward and backward of a float32 layer
    (numpy arrays; ``xp``: the module the layer computes with, cupy in tests/gpu)."""
    layer = make_layer(prototxt, phase=phase, dtype=numpy.float32, seed=seed, xp=xp)
    bottom, top = setup_layer(layer, [numpy.asarray(a, numpy.float32) for a in inputs], n_tops, dtype=numpy.float32)
    if in_place:
        top = [bottom[0]]
        layer.reshape(bottom, top)
    layer.forward(bottom, top)
    tops = [t.data.copy() for t in top]
    rng = numpy.random.default_rng(seed + 1)
    for i, t in enumerate(top):
        t.diff[...] = xp.asarray(top_diffs[i] if top_diffs else rng.standard_normal(t.shape).astype(numpy.float32))
    for blob in layer.blobs:
        blob.diff[...] = 0
    propagate = [True] + [False] * (len(bottom) - 1)
    layer.backward(top, propagate, bottom)
    host = backend.to_numpy
    return [host(t) for t in tops], [host(bottom[0].diff).copy()], [host(b.diff).copy() for b in layer.blobs]


def compare(switch, kernel_names, prototxt, inputs, rtol=RTOL, atol=ATOL, **kw):
    switch(False)
    want = run_layer(prototxt, inputs, **kw)
    host = switch(True)
    got = run_layer(prototxt, inputs, **kw)
    for name in kernel_names:
        assert name in host.launches, f"{name} did not run (launched: {host.launches})"
    for w_list, g_list in zip(want, got):
        for w, g in zip(w_list, g_list):
            numpy.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    return got


def normal(*shape, seed=0):
    return numpy.random.default_rng(seed).standard_normal(shape).astype(numpy.float32)


# -- convolution --------------------------------------------------------------------------------

CONV_CASES = [
    # (input shape, convolution_param body)
    ((2, 3, 7, 6), "num_output: 4 kernel_size: 3"),
    ((3, 4, 9, 8), "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2"),
    ((2, 2, 10, 9), "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 2 pad_w: 0 dilation: 2"),
    ((2, 6, 5, 5), "num_output: 6 kernel_size: 1 group: 3 bias_term: false"),
    ((1, 3, 11, 11), "num_output: 2 kernel_size: 5 stride: 4 pad: 2"),
]


@needs_gxx
@pytest.mark.parametrize("shape,body", CONV_CASES)
def test_convolution(switch, shape, body):
    proto = (f'name: "c" type: "Convolution" convolution_param {{ {body} weight_filler {{ type: "gaussian" std: 0.3 }} '
             f'bias_filler {{ type: "gaussian" std: 0.3 }} }}')
    compare(switch, ["im2col", "col2im", "swap_leading_axes"], proto, [normal(*shape)], rtol=1e-4, atol=1e-5)


@needs_gxx
@pytest.mark.parametrize("shape,body", CONV_CASES)
def test_deconvolution(switch, shape, body):
    proto = (f'name: "d" type: "Deconvolution" convolution_param {{ {body} weight_filler {{ type: "gaussian" '
             f'std: 0.3 }} bias_filler {{ type: "gaussian" std: 0.3 }} }}')
    compare(switch, ["im2col", "col2im", "swap_leading_axes"], proto, [normal(*shape)], rtol=1e-4, atol=1e-5)


@needs_gxx
def test_convolution_in_chunks(switch, host, monkeypatch):
    # a column budget of two samples: the batch runs in chunks, partial weight gradients summed
    monkeypatch.setattr(ops.ConvPlan, "max_col_bytes", 2 * 4 * (4 * 9) * 25)
    proto = ('name: "c" type: "Convolution" '
             'convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "xavier" } }')
    compare(switch, ["im2col", "col2im"], proto, [normal(5, 4, 7, 7)], rtol=1e-4, atol=1e-5)
    assert host.launches.count("im2col") == 6  # chunks of 2, 2 and 1 samples, forward and backward


# -- pooling ------------------------------------------------------------------------------------

POOL_CASES = [
    ((2, 3, 7, 7), "pool: MAX kernel_size: 3 stride: 2"),
    ((2, 2, 6, 7), "pool: MAX kernel_size: 2 stride: 2 pad: 1"),
    ((1, 2, 8, 8), "pool: MAX kernel_size: 2 stride: 3"),  # ceil windows past the image
    ((2, 3, 7, 7), "pool: AVE kernel_size: 3 stride: 2"),
    ((2, 2, 9, 8), "pool: AVE kernel_h: 3 kernel_w: 2 stride: 2 pad: 1"),
    ((2, 3, 5, 6), "pool: AVE global_pooling: true"),
    ((1, 2, 6, 6), "pool: MAX kernel_size: 3 stride: 1 pad: 1 round_mode: FLOOR"),
]


@needs_gxx
@pytest.mark.parametrize("shape,body", POOL_CASES)
def test_pooling(switch, shape, body):
    is_max = "MAX" in body
    names = ["max_pool_forward", "max_pool_backward"] if is_max else ["ave_pool_forward", "ave_pool_backward"]
    # distinct values: the argmax has no ties to break
    x = numpy.random.default_rng(3).permutation(numpy.prod(shape)).reshape(shape).astype(numpy.float32) / 7
    compare(switch, names, f'name: "p" type: "Pooling" pooling_param {{ {body} }}', [x], n_tops=2 if is_max else 1)


@needs_gxx
def test_max_pooling_ties_go_to_the_first_maximum(switch):
    x = numpy.zeros((1, 1, 4, 4), numpy.float32)
    tops, diffs, _ = compare(switch, ["max_pool_forward"], 'name: "p" type: "Pooling" pooling_param { pool: MAX '
                             'kernel_size: 2 stride: 2 }', [x], n_tops=2)
    assert tops[1].ravel().tolist() == [0, 2, 8, 10]


# -- LRN, neurons, softmax ------------------------------------------------------------------------

@needs_gxx
@pytest.mark.parametrize("body,names", [
    ("local_size: 5 alpha: 0.2 beta: 0.75 k: 2", ["lrn_across_forward", "lrn_across_backward"]),
    ("local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL", ["lrn_within_forward", "lrn_within_backward"]),
])
def test_lrn(switch, body, names):
    compare(switch, names, f'name: "n" type: "LRN" lrn_param {{ {body} }}', [normal(2, 7, 5, 4)], rtol=1e-4, atol=1e-5)


@needs_gxx
@pytest.mark.parametrize("proto,names", [
    ('type: "ReLU"', ["relu_forward", "relu_backward"]),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', ["relu_forward", "relu_backward"]),
    ('type: "Sigmoid"', ["sigmoid_forward", "sigmoid_backward"]),
    ('type: "TanH"', ["tanh_forward", "tanh_backward"]),
])
@pytest.mark.parametrize("in_place", [False, True])
def test_neurons(switch, proto, names, in_place):
    compare(switch, names, f'name: "a" {proto}', [normal(3, 4, 5)], in_place=in_place)


@needs_gxx
def test_dropout_draws_the_same_mask(switch):
    proto = 'name: "d" type: "Dropout" dropout_param { dropout_ratio: 0.3 }'
    tops, _, _ = compare(switch, ["dropout_forward", "dropout_backward"], proto, [normal(4, 50)],
                         phase=caffe_pb2.TRAIN)
    assert 0.15 < (tops[0] == 0).mean() < 0.45


@needs_gxx
@pytest.mark.parametrize("shape,axis", [((4, 10), 1), ((2, 5, 3, 4), 1), ((2, 3, 6), 2)])
def test_softmax(switch, shape, axis):
    compare(switch, ["softmax_forward", "softmax_backward"],
            f'name: "s" type: "Softmax" softmax_param {{ axis: {axis} }}', [normal(*shape) * 4])


# -- losses and accuracy ------------------------------------------------------------------------

def labels(shape, classes, seed=0, ignore=None):
    lab = numpy.random.default_rng(seed).integers(0, classes, shape).astype(numpy.float32)
    if ignore is not None:
        lab.reshape(-1)[::3] = ignore
    return lab


@needs_gxx
@pytest.mark.parametrize("loss_param", ["", "ignore_label: 2", "ignore_label: -1 normalization: FULL",
                                        "normalization: BATCH_SIZE", "normalization: NONE",
                                        "ignore_label: 1 normalize: false"])
def test_softmax_loss(switch, loss_param):
    ignore = None
    if "ignore_label" in loss_param:
        ignore = int(loss_param.split("ignore_label:")[1].split()[0])
    x, lab = normal(3, 4, 2, 3) * 3, labels((3, 1, 2, 3), 4, ignore=ignore)
    proto = f'name: "l" type: "SoftmaxWithLoss" loss_param {{ {loss_param} }}'
    compare(switch, ["softmax_forward", "softmax_loss_forward", "softmax_loss_backward"], proto, [x, lab],
            n_tops=2, top_diffs=[numpy.float32(1.5), numpy.zeros((3, 4, 2, 3), numpy.float32)])


@needs_gxx
def test_softmax_loss_reports_a_bad_label_at_the_deferred_check(switch):
    host = switch(True)
    layer = make_layer('name: "l" type: "SoftmaxWithLoss"', dtype=numpy.float32)
    bottom, top = setup_layer(layer, [normal(2, 3), numpy.array([0, 7], numpy.float32)], 1, dtype=numpy.float32)
    layer.forward(bottom, top)  # no host read here
    assert "softmax_loss_forward" in host.launches
    with pytest.raises(Exception, match=r"label is outside \[0, 3\)"):
        ops.run_deferred_checks()
    ops.run_deferred_checks()  # reported once


@needs_gxx
@pytest.mark.parametrize("accuracy_param", ["", "top_k: 2", "ignore_label: 1", "axis: 2 top_k: 3"])
def test_accuracy(switch, accuracy_param):
    x = normal(6, 5, 4).round(1)  # ties between classes
    lab_shape = (6, 5) if "axis: 2" in accuracy_param else (6, 4)
    classes = 4 if "axis: 2" in accuracy_param else 5
    ignore = 1 if "ignore_label" in accuracy_param else None
    switch(False)
    proto = f'name: "a" type: "Accuracy" accuracy_param {{ {accuracy_param} }}'

    def forward():
        layer = make_layer(proto, dtype=numpy.float32)
        bottom, top = setup_layer(layer, [x, labels(lab_shape, classes, ignore=ignore)], 1, dtype=numpy.float32)
        layer.forward(bottom, top)
        return float(top[0].data)

    want = forward()
    host = switch(True)
    got = forward()
    assert host.launches == ["accuracy_forward"]
    assert got == pytest.approx(want, rel=1e-6)
    ops.run_deferred_checks()


# -- BatchNorm and Scale ----------------------------------------------------------------------------

@needs_gxx
@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_batch_norm(switch, phase):
    names = ["channel_normalize"] + (["batch_norm_backward"] if phase == caffe_pb2.TRAIN else [])
    x = normal(4, 3, 5) * 2 + 1
    compare(switch, names, 'name: "b" type: "BatchNorm"', [x], phase=phase, rtol=1e-4, atol=1e-5)


@needs_gxx
@pytest.mark.parametrize("body", ["", "bias_term: true bias_filler { type: 'gaussian' }", "axis: 1 num_axes: 2"])
def test_scale(switch, body):
    proto = f'name: "s" type: "Scale" scale_param {{ {body} filler {{ type: "gaussian" }} }}'
    compare(switch, ["channel_scale"], proto, [normal(2, 3, 4, 5)])


# -- the solver updates -----------------------------------------------------------------------------

RULE_PARAMS = {"sgd": dict(momentum=0.9), "nesterov": dict(momentum=0.9), "adagrad": dict(delta=1e-8),
               "rmsprop": dict(delta=1e-8, rms_decay=0.95), "adadelta": dict(delta=1e-6, momentum=0.95),
               "adam": dict(delta=1e-8, momentum=0.9, momentum2=0.999)}
HISTORIES = {"adadelta": 2, "adam": 2}


@needs_gxx
@pytest.mark.parametrize("rule", sorted(RULE_PARAMS))
@pytest.mark.parametrize("regularization,iter_size", [("L2", 1), ("L1", 2)])
def test_solver_step_kernels_match_the_update_functions(switch, rule, regularization, iter_size):
    from brewnet.solver import updates

    host = switch(True)
    param = caffe_pb2.SolverParameter(**RULE_PARAMS[rule])
    rng = numpy.random.default_rng(5)
    w0, g0 = rng.standard_normal(1000).astype(numpy.float32), rng.standard_normal(1000).astype(numpy.float32)
    hist0 = [numpy.abs(rng.standard_normal(1000)).astype(numpy.float32) for _ in range(HISTORIES.get(rule, 1))]
    rate, decay, iteration = 0.01, 0.0005, 3
    # the reference: solver/updates.py's functions then Net.update (data -= diff)
    w, g, hist = w0.copy(), g0.copy(), [h.copy() for h in hist0]
    updates.normalize(g, iter_size)
    updates.regularize(g, w, decay, regularization, numpy)
    getattr(updates, rule)(g, hist, rate, param, iteration, numpy)
    w -= g
    # the kernel
    wk, gk, histk = w0.copy(), g0.copy(), [h.copy() for h in hist0]
    ops.apply_step(numpy, rule, wk, gk, histk, iter_size, decay, regularization, rate, param, iteration)
    assert host.launches == [f"{rule}_step"]
    numpy.testing.assert_allclose(gk, g, rtol=1e-5, atol=1e-8)
    numpy.testing.assert_allclose(wk, w, rtol=1e-6, atol=1e-7)
    for h, hk in zip(hist, histk):
        numpy.testing.assert_allclose(hk, h, rtol=1e-5, atol=1e-8)


# -- the harness itself and the sources ---------------------------------------------------------------

@needs_gxx
def test_the_harness_refuses_wrong_argument_types(host):
    x = numpy.zeros(4, numpy.float64)
    with pytest.raises(TypeError, match="float array"):
        host("relu_forward", 4, x, numpy.float32(0), x)
    with pytest.raises(TypeError, match="numpy.float32"):
        host("relu_forward", 4, x.astype(numpy.float32), 0.0, x.astype(numpy.float32))


@needs_gxx
def test_every_element_is_visited_once_whatever_the_grid(tmp_path):
    # more threads than elements, and fewer: the grid-stride loop covers each element once
    for grid, block in ((1, 1), (2, 3), (7, 5)):
        kernels = cuda_harness.HostKernels(tmp_path, grid=grid, block=block)
        x = numpy.arange(-6, 7, dtype=numpy.float32)
        y = numpy.full_like(x, numpy.nan)
        kernels("relu_forward", x.size, x, numpy.float32(0.5), y)
        numpy.testing.assert_array_equal(y, numpy.where(x > 0, x, x * numpy.float32(0.5)))


def test_the_kernel_table_reads_every_source():
    table = sources.kernel_table()
    assert {k.file for k in table.values()} == set(sources.source_files())
    assert table["im2col"].params[0] == sources.Param("count", "int")
    assert table["max_pool_forward"].params[-1] == sources.Param("mask", "int*")


def test_the_switch_is_off_by_default_and_the_cpu_never_runs_kernels(monkeypatch):
    monkeypatch.delenv(ops.SWITCH, raising=False)
    assert not ops.switched_on()
    x = numpy.zeros(3, numpy.float32)
    assert not ops.active(numpy, x)
    monkeypatch.setenv(ops.SWITCH, "1")
    assert not ops.active(numpy, x)  # numpy arrays only through a test's harness


NVCC = shutil.which("nvcc")


@pytest.fixture(scope="module")
def ptx_folder(tmp_path_factory):
    """Every .cu compiled to PTX for sm_90 by one nvcc call (as NVRTC gets them: header in front)."""
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    folder = tmp_path_factory.mktemp("ptx")
    files = []
    for file in sources.source_files():
        (folder / file).write_text(sources.source_text(file))
        files.append(str(folder / file))
    done = subprocess.run([NVCC, "-ptx", "-arch=sm_90", *sources.COMPILE_OPTIONS, "-odir", str(folder), *files],
                          capture_output=True, text=True, cwd=folder)
    return folder, done


@pytest.mark.parametrize("file", sources.source_files())
def test_each_source_compiles_to_ptx(ptx_folder, file):
    folder, done = ptx_folder
    assert done.returncode == 0, done.stderr
    ptx = (folder / file).with_suffix(".ptx").read_text()
    for name, kernel in sources.kernel_table().items():
        if kernel.file == file:
            assert f".entry {name}(" in ptx


# -- against real Caffe -------------------------------------------------------------------------------

def _load_test_module(relative, name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, TESTS / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


caffe_layers = _load_test_module("test_caffe_reference.py", "cuda_sources_caffe_layers")
caffe_solvers = _load_test_module("solver/test_solver_caffe_reference.py", "cuda_sources_caffe_solvers")
solvers_dir = caffe_solvers.solvers_dir  # the solver cases' fixture (needs BREWNET_FIXTURES)


# the layer types with kernels (the other cases run no kernel: tests/test_caffe_reference.py has them)
HOOKED = {"Accuracy", "BatchNorm", "Convolution", "Deconvolution", "Dropout", "LRN", "Pooling", "ReLU", "Scale",
          "Sigmoid", "Softmax", "SoftmaxWithLoss", "TanH"}


@needs_gxx
@pytest.mark.parametrize("case", [c for c in caffe_layers._cases() if c.values[0] is None
                                  or c.values[0]["type"] in HOOKED])
def test_caffe_reference_layer_cases_with_the_kernels(switch, fixtures, case):
    """Caffe's own outputs and gradients (tests/test_caffe_reference.py's cases and tolerances)."""
    switch(True)  # (Dropout in TEST and per-class Accuracy keep their array code)
    caffe_layers.test_layer_case_matches_caffe(case, fixtures)


@needs_gxx
@pytest.mark.parametrize("case", caffe_solvers.CASES)
def test_caffe_reference_solver_cases_with_the_kernels(switch, solvers_dir, case):
    """Caffe's loss trajectories and final weights, with the fused solver steps and layer kernels."""
    host = switch(True)
    caffe_solvers.test_trajectory_matches_caffe(solvers_dir, case)
    assert any(name.endswith("_step") for name in host.launches)


@needs_gxx
def test_the_device_tests_run_on_the_cupy_stand_in():
    """tests/gpu/test_gpu_cuda_kernels.py against tests/cuda_standin (numpy + these kernels on the
    CPU): a device session must not be the first to find the file broken."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS / "cuda_standin"), os.environ.get("PYTHONPATH", "")]),
           ops.SWITCH: "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(TESTS / "gpu" / "test_gpu_cuda_kernels.py")],
                          capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]
