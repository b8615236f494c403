"""brewnet's CPU threads (layers/parallel.py): jobs, BLAS threads, and layers split across threads."""

import threading

import numpy
import pytest
from google.protobuf import text_format

from brewnet.layers.kernels import parallel
from brewnet.layers.net import Net
from brewnet.netdef import caffe_pb2


@pytest.fixture
def threads():
    """Set the thread count for one test, then put it back."""
    before = parallel.thread_count()
    yield parallel.set_thread_count
    parallel.set_thread_count(before)


def test_run_does_every_job_once_on_valid_workers(threads):
    threads(3)
    seen, lock = [], threading.Lock()

    def job(j, worker):
        with lock:
            seen.append((j, worker, threading.current_thread().name))

    parallel.run(job, 50)
    assert sorted(j for j, _, _ in seen) == list(range(50))
    assert {w for _, w, _ in seen} <= {0, 1, 2}
    # worker 0 is the calling thread
    assert all(name == threading.current_thread().name for _, w, name in seen if w == 0)


def test_run_raises_the_jobs_error_and_restores_blas_threads(threads):
    threads(2)
    blas = parallel._blas()
    before = [lib.num_threads for lib in blas.libs]

    def job(j, worker):
        assert all(lib.num_threads == 1 for lib in blas.libs)  # single-threaded BLAS inside
        if j == 3:
            raise KeyError("job 3")

    with pytest.raises(KeyError, match="job 3"):
        parallel.run(job, 8)
    assert [lib.num_threads for lib in blas.libs] == before


def test_one_thread_runs_inline_and_cupy_is_never_split(threads):
    threads(1)
    names = []
    parallel.run(lambda j, w: names.append(threading.current_thread().name), 4)
    assert names == [threading.current_thread().name] * 4
    threads(4)
    assert parallel.workers(numpy) == 4
    assert parallel.workers(object()) == 1


@pytest.mark.parametrize("size,parts", [(10, 3), (2, 5), (0, 2), (7, 1)])
def test_split_covers_the_range(size, parts):
    ranges = parallel.split(size, parts)
    flat = [i for a, b in ranges for i in range(a, b)]
    assert flat == list(range(size))
    assert all(b > a for a, b in ranges) or size == 0


def test_bad_thread_count_names_the_variable(monkeypatch, threads):
    monkeypatch.setenv("BREWNET_THREADS", "many")
    parallel._state["threads"] = None
    with pytest.raises(ValueError, match="BREWNET_THREADS"):
        parallel.thread_count()
    monkeypatch.delenv("BREWNET_THREADS")
    parallel._state["threads"] = None


NET = """
name: "split"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 12 dim: 3 dim: 14 dim: 14 } shape { dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 20 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 }
                            bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
        convolution_param { num_output: 24 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool2" top: "ip"
        inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def _gradients(monkeypatch, n_threads, threads):
    """Every param diff and the data diff of one forward/backward with ``n_threads`` threads,
    the size thresholds lowered so that even this small net is split."""
    from brewnet.layers.families.inner_product import InnerProduct
    from brewnet.layers.families.pooling import PoolCore

    monkeypatch.setattr(PoolCore, "parallel_min_elements", 0)
    monkeypatch.setattr(InnerProduct, "parallel_min_macs", 0)
    monkeypatch.setattr(parallel, "jobs_for", lambda xp=numpy, big=True, per_thread=4: parallel.workers(xp) * per_thread)
    threads(n_threads)
    param = text_format.Parse(NET, caffe_pb2.NetParameter())
    param.state.phase = caffe_pb2.TRAIN
    param.force_backward = True
    net = Net(param, dtype=numpy.float64, rng=numpy.random.default_rng(3))
    rng = numpy.random.default_rng(0)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    net.blobs["label"].data[...] = rng.integers(0, 10, 12)
    net.clear_param_diffs()
    net.forward()
    net.backward()
    return [b.diff.copy() for b in net.learnable_params] + [net.blobs["data"].diff.copy()]


def test_net_gradients_do_not_depend_on_the_thread_count(monkeypatch, threads):
    serial = _gradients(monkeypatch, 1, threads)
    split = _gradients(monkeypatch, 2, threads)
    again = _gradients(monkeypatch, 2, threads)
    for a, b, c in zip(serial, split, again):
        numpy.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-13)
        numpy.testing.assert_array_equal(b, c)  # the same floats on every run
