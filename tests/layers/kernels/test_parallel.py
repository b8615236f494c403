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


def test_run_raises_the_jobs_error_with_blas_single_threaded_until_restored(threads):
    threads(2)
    blas = parallel._blas()
    parallel.restore_blas()
    before = [lib.num_threads for lib in blas.libs]
    assert blas.libs, "numpy's BLAS should be visible to threadpoolctl"

    def job(j, worker):
        assert all(lib.num_threads == 1 for lib in blas.libs)  # single-threaded BLAS inside
        if j == 3:
            raise KeyError("job 3")

    with pytest.raises(KeyError, match="job 3"):
        parallel.run(job, 8)
    # the policy holds process-wide between calls (no per-call switching) ...
    assert all(lib.num_threads == 1 for lib in blas.libs)
    # ... until given back, explicitly or by going to one thread
    parallel.restore_blas()
    assert [lib.num_threads for lib in blas.libs] == before
    parallel.run(lambda j, w: None, 4)
    assert all(lib.num_threads == 1 for lib in blas.libs)
    threads(1)
    assert [lib.num_threads for lib in blas.libs] == before
    parallel.run(lambda j, w: None, 4)  # one thread leaves the BLAS its own threads
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


# -- how many threads ------------------------------------------------------------------
def _fake_cgroup(tmp_path, proc_lines, files):
    """A fake /proc/self/cgroup and cgroup tree under tmp_path; returns cgroup_cpu_limit's answer."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text("".join(line + "\n" for line in proc_lines))
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return parallel.cgroup_cpu_limit(str(root), str(proc))


def test_cgroup_v2_quota_is_read_from_the_group_and_its_ancestors(tmp_path):
    assert _fake_cgroup(tmp_path, ["0::/user/job"], {"user/job/cpu.max": "150000 100000\n"}) == 1.5
    # the tightest of the group and the groups around it
    assert _fake_cgroup(tmp_path, ["0::/user/job"], {"user/job/cpu.max": "max 100000\n",
                                                      "user/cpu.max": "100000 100000\n"}) == 1.0
    # a container sees its own group at the root of the mount
    assert _fake_cgroup(tmp_path / "c", ["0::/docker/abc"], {"cpu.max": "300000 100000"}) == 3.0
    # v2 beside v1 (a "hybrid" layout) is mounted at unified/
    assert _fake_cgroup(tmp_path / "h", ["1:cpu:/", "0::/j"], {"unified/j/cpu.max": "250000 100000"}) == 2.5


def test_cgroup_without_a_quota_or_files_is_no_limit(tmp_path):
    assert _fake_cgroup(tmp_path, ["0::/"], {"cpu.max": "max 100000\n"}) is None
    assert _fake_cgroup(tmp_path / "none", [], {}) is None
    assert _fake_cgroup(tmp_path / "junk", ["0::/"], {"cpu.max": "garbage"}) is None


def test_cgroup_v1_cfs_quota(tmp_path):
    lines = ["12:memory:/x", "4:cpu,cpuacct:/x"]
    assert _fake_cgroup(tmp_path, lines, {"cpu,cpuacct/x/cpu.cfs_quota_us": "50000\n",
                                          "cpu,cpuacct/x/cpu.cfs_period_us": "100000\n"}) == 0.5
    assert _fake_cgroup(tmp_path / "u", lines, {"cpu/cpu.cfs_quota_us": "-1\n",
                                                "cpu/cpu.cfs_period_us": "100000\n"}) is None


def test_thread_count_follows_affinity_and_quota_and_the_variable_overrides(monkeypatch, threads):
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(parallel, "cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("BREWNET_THREADS", raising=False)
    assert parallel.available_cpus() == 4
    monkeypatch.setattr(parallel, "cgroup_cpu_limit", lambda: 1.6)
    assert parallel.available_cpus() == 2
    monkeypatch.setattr(parallel, "cgroup_cpu_limit", lambda: 0.3)
    assert parallel.available_cpus() == 1
    parallel._state["threads"] = None
    assert parallel.thread_count() == 1
    monkeypatch.setenv("BREWNET_THREADS", "3")
    parallel._state["threads"] = None
    assert parallel.thread_count() == 3


# -- nesting and GEMMs ------------------------------------------------------------------
def test_a_parallel_call_inside_a_job_runs_inline_on_that_jobs_worker(threads):
    threads(2)
    seen, lock = [], threading.Lock()

    def inner(outer_worker):
        def job(j, worker):
            with lock:
                seen.append((outer_worker, worker, threading.current_thread().name))
        return job

    def outer(j, worker):
        me = threading.current_thread().name
        parallel.run(inner(worker), 5)
        with lock:
            assert all(name == me for w, _, name in seen if w == worker)
        assert parallel.inside_job()

    parallel.run(outer, 6)
    assert len(seen) == 30
    assert all(outer_w == w for outer_w, w, _ in seen)  # the nested jobs reuse the enclosing worker
    assert not parallel.inside_job()


GEMM_CASES = [((64, 512), (512, 3136)),            # split by columns
              ((2000, 300), (300, 100)),           # split by rows
              ((8, 1, 48, 96), (1, 96, 784)),      # stacked: split along the leading axis
              ((1, 40, 96), (6, 1, 96, 900)),      # broadcast leading axis on the left
              ((16, 8, 100, 200), (8, 200, 300)),  # the right operand broadcast
              ((3, 5), (5, 4))]                    # too small to split


@pytest.mark.parametrize("shape_a,shape_b", GEMM_CASES)
def test_matmul_equals_numpy_with_the_same_floats_for_any_thread_count(shape_a, shape_b, threads, monkeypatch):
    rng = numpy.random.default_rng(1)
    a = rng.standard_normal(shape_a, dtype=numpy.float32)
    b = rng.standard_normal(shape_b, dtype=numpy.float32)
    expected = numpy.matmul(a, b)
    results = []
    for n in (1, 2, 3):
        threads(n)
        calls = []
        real_run = parallel.run
        monkeypatch.setattr(parallel, "run", lambda fn, n_jobs, xp=numpy: (calls.append(n_jobs), real_run(fn, n_jobs, xp)))
        out = numpy.full(expected.shape, numpy.nan, numpy.float32)
        assert parallel.matmul(a, b, out=out) is out
        results.append(out)
        a_view = numpy.asfortranarray(a) if a.ndim == 2 else a  # an F-ordered operand, out allocated
        results.append(parallel.matmul(a_view, b))
        monkeypatch.setattr(parallel, "run", real_run)
        big = expected.size * shape_a[-1] >= parallel.MATMUL_MIN_MACS
        assert len(calls) == (2 if n > 1 and big else 0)  # both calls were cut into jobs
        assert all(2 <= c <= parallel.MATMUL_MAX_BLOCKS for c in calls)
    for r in results:
        numpy.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-4)
    # with 2 or 3 threads: the same blocks, so the same floats (1 thread is numpy's own call)
    numpy.testing.assert_array_equal(results[4], results[2])
    numpy.testing.assert_array_equal(results[5], results[3])


def test_matmul_inside_a_job_is_one_call(threads, monkeypatch):
    threads(2)
    a = numpy.ones((256, 256), numpy.float32)
    sizes = []

    def job(j, worker):
        real = parallel.split
        monkeypatch.setattr(parallel, "split", lambda size, parts: sizes.append(parts) or real(size, parts))
        assert parallel.matmul(a, a)[0, 0] == 256
        monkeypatch.setattr(parallel, "split", real)

    parallel.run(job, 1)  # one job runs inline in the caller, not marked as inside a job
    parallel.run(job, 4)
    assert len(sizes) <= 1  # only the single-job call (not a job on the pool) may split


def test_a_forked_child_gets_helpers_of_its_own(threads):
    import os
    import signal

    threads(2)
    parallel.run(lambda j, w: None, 4)  # the parent's helpers exist
    pid = os.fork()
    if pid == 0:  # the child: its helpers must run jobs (the parent's threads are not here)
        code = 1
        try:
            signal.alarm(20)
            workers_seen = set()
            for _ in range(50):
                parallel.run(lambda j, w: (workers_seen.add(w), __import__("time").sleep(0.002)), 8)
            code = 0 if workers_seen == {0, 1} else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
