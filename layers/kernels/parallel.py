"""brewnet's own CPU threads: the heavy layers split their work (samples, planes, features)
into jobs and run them on the cores this process may use, with the BLAS single-threaded.

Why not leave the threading to the BLAS: a GEMM split across OpenBLAS threads waits for its
slowest part at every call, and OpenBLAS's threads spin (and yield) while they wait. With two
busy processes beside it on 2 cores, descheduled BLAS threads turned GoogLeNet's 1x1
convolutions (batch 8) from 60 ms into 3 s. Here jobs are handed out as threads come free, several per thread, so a thread the
machine slowed down just takes fewer of them; waiting threads sleep (no spinning), and a helper
that wakes after the last job was taken returns without anybody waiting for it.

The policy, in one place:
- The thread count is the CPUs this process may use: its affinity mask, capped by the cgroup's
  CPU quota (``cpu.max``, or cgroup v1's ``cpu.cfs_quota_us``). ``BREWNET_THREADS=N`` overrides.
- With more than one thread, every BLAS library loaded (numpy's and scipy's OpenBLAS) is set to
  one thread, process-wide, at the first parallel call; ``restore_blas()`` (or
  ``set_thread_count(1)``) puts their own counts back. ``BREWNET_THREADS=1`` runs every job in
  the calling thread and leaves the BLAS threads alone.
- A big GEMM that is not already a job goes through ``matmul``, which cuts it into jobs.
- A parallel call made from inside a job runs inline in that job's thread (no nested pools).
- Only numpy work is split: on cupy, jobs run in order in the calling thread.
"""

import math
import os
import threading

import numpy

_state = {"threads": None, "pool": None, "blas": None}
_lock = threading.Lock()
_local = threading.local()  # .inside: this thread is running a job


# ---------------------------------------------------------------------------
# how many threads
# ---------------------------------------------------------------------------
def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _quota_v2(text):
    """CPUs from cgroup v2's ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"), None when unlimited."""
    fields = (text or "").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(quota_text, period_text):
    """CPUs from cgroup v1's ``cpu.cfs_quota_us`` (-1: unlimited) and ``cpu.cfs_period_us``."""
    try:
        quota, period = int((quota_text or "").strip()), int((period_text or "").strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _ancestors(path):
    """``/a/b`` -> ["/a/b", "/a", "/"]: a quota set on any enclosing group applies too."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup"):
    """The CPU quota of this process's cgroup (and the groups around it) in CPUs, e.g. 1.5;
    None when there is none (or no cgroup file system). ``root`` and ``proc_cgroup`` are
    parameters so tests can point them at fake files."""
    limits = []
    for line in (_read(proc_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path:
            continue
        # a container usually sees its own group mounted at the root: try the path and the root
        for group in dict.fromkeys(_ancestors(path) + ["/"]):
            base = os.path.join(root, group.lstrip("/"))
            if hierarchy == "0" and controllers == "":
                # v2 alone is mounted at the root; beside v1 ("hybrid") at unified/
                limit = _quota_v2(_read(os.path.join(base, "cpu.max")))
                if limit is None:
                    limit = _quota_v2(_read(os.path.join(root, "unified", group.lstrip("/"), "cpu.max")))
            elif "cpu" in controllers.split(","):
                for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                    vdir = os.path.join(root, mount, group.lstrip("/"))
                    limit = _quota_v1(_read(os.path.join(vdir, "cpu.cfs_quota_us")),
                                      _read(os.path.join(vdir, "cpu.cfs_period_us")))
                    if limit is not None:
                        break
            else:
                break
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def available_cpus():
    """The CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota
    (rounded to the nearest whole CPU, at least one)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, int(quota + 0.5)))
    return max(1, n)


def thread_count():
    """How many threads run jobs (1: the calling thread alone)."""
    if _state["threads"] is None:
        value = os.environ.get("BREWNET_THREADS", "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"BREWNET_THREADS must be a positive integer, got {value!r}") from None
        else:
            n = available_cpus()
        _state["threads"] = max(1, n)
    return _state["threads"]


def set_thread_count(n):
    """Change the thread count (tests; the API's counterpart of BREWNET_THREADS). The BLAS
    libraries get their own thread counts back; the next parallel call applies the policy again."""
    with _lock:
        if _state["pool"] is not None:
            _state["pool"].shutdown(wait=True)
        _state["pool"] = None
        _state["threads"] = max(1, int(n))
    restore_blas()


def workers(xp=numpy):
    """Number of workers jobs on arrays of module ``xp`` are spread over."""
    return thread_count() if xp is numpy else 1


def inside_job():
    """Whether the calling thread is running a job (a parallel call there runs inline)."""
    return getattr(_local, "inside", False)


class _Helpers:
    """The helper threads (workers 1..n-1), each waiting on its own queue for a function to call
    with its worker number. A C-level queue's put and get are all a hand-over costs: under load a
    ThreadPoolExecutor's submit (a Future, two locks, its thread bookkeeping) took 7% of the
    calling thread's time."""

    def __init__(self, n):
        import queue

        self.queues = [queue.SimpleQueue() for _ in range(n)]
        self.threads = [threading.Thread(target=self._serve, args=(q, w + 1), name=f"brewnet-{w + 1}", daemon=True)
                        for w, q in enumerate(self.queues)]
        for t in self.threads:
            t.start()

    @staticmethod
    def _serve(q, worker):
        while True:
            fn = q.get()  # sleeps in the kernel until there is something to do
            if fn is None:
                return
            fn(worker)

    def hand(self, worker, fn):
        """Have helper ``worker`` (1..n) call fn(worker) when it next runs."""
        self.queues[worker - 1].put(fn)

    def shutdown(self, wait=True):
        for q in self.queues:
            q.put(None)
        if wait:
            for t in self.threads:
                t.join()


def _forget_helpers_after_fork():
    # a forked child has none of the parent's threads: it starts helpers of its own when needed
    _state["pool"] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers_after_fork)


def _helpers():
    if _state["pool"] is None:
        with _lock:
            if _state["pool"] is None:
                _state["pool"] = _Helpers(thread_count() - 1)
    return _state["pool"]


# ---------------------------------------------------------------------------
# the BLAS libraries' own threads
# ---------------------------------------------------------------------------
class _Blas:
    """numpy's and scipy's BLAS libraries: set to one thread while brewnet's threads split the
    work, and given their own counts back by ``restore``."""

    def __init__(self):
        try:  # load scipy's OpenBLAS now (layers/kernels/blas.py calls it), so it is covered too
            import scipy.linalg.blas  # noqa: F401
        except ImportError:  # pragma: no cover - scipy missing: numpy's BLAS alone
            pass
        try:
            from threadpoolctl import ThreadpoolController

            self.libs = ThreadpoolController().select(user_api="blas").lib_controllers
        except Exception:  # pragma: no cover - threadpoolctl missing or failing: leave BLAS as is
            self.libs = []
        self.saved = None  # the libraries' own counts while the policy holds

    def single(self):
        if self.saved is None:
            self.saved = [lib.num_threads for lib in self.libs]
            for lib in self.libs:
                lib.set_num_threads(1)

    def restore(self):
        if self.saved is not None:
            for lib, n in zip(self.libs, self.saved):
                lib.set_num_threads(n)
            self.saved = None


def _blas():
    if _state["blas"] is None:
        with _lock:
            if _state["blas"] is None:
                _state["blas"] = _Blas()
    return _state["blas"]


def apply_blas_policy():
    """Single-threaded BLAS when brewnet's threads split the work (thread count > 1); nothing
    otherwise. Called by every parallel call; only the first one after a change does anything."""
    if thread_count() > 1:
        blas = _blas()
        if blas.saved is None:
            with _lock:
                blas.single()


def restore_blas():
    """Give the BLAS libraries back the thread counts they had before the policy."""
    if _state["blas"] is not None:
        with _lock:
            _state["blas"].restore()


# ---------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------
def _inline(fn, n_jobs):
    for job in range(n_jobs):
        fn(job, 0)


def run(fn, n_jobs, xp=numpy):
    """Call ``fn(job, worker)`` for job in 0..n_jobs-1, spread over the threads.

    ``worker`` (0..workers(xp)-1) names the thread, so that a job can use that thread's
    scratch buffers and partial sums; jobs go to whichever thread is free next, the calling
    thread first. It returns once every job is done, without waiting for helper threads
    that woke too late to take one (waking a thread costs tens of microseconds here, and a
    descheduled one much longer). The first exception raised by a job is raised here, after
    the jobs in flight have ended. Called from inside a job, it runs the jobs inline, in
    order, as that job's worker: nested calls never wait on the pool.
    """
    if inside_job():
        # the enclosing job owns its worker's scratch: the nested jobs run there, in order
        worker = _local.worker
        for job in range(n_jobs):
            fn(job, worker)
        return
    n_threads = min(workers(xp), n_jobs)
    if n_threads <= 1:
        if xp is numpy:
            apply_blas_policy()
        _inline(fn, n_jobs)
        return
    apply_blas_policy()
    jobs = iter(range(n_jobs))
    done = threading.Condition()
    in_flight = [0]
    failed = []

    def take():
        with done:  # handing out a job and counting it in flight happen together
            job = next(jobs, None)
            if job is not None:
                in_flight[0] += 1
            return job

    def loop(worker):
        _local.inside, _local.worker = True, worker
        try:
            while not failed:
                job = take()
                if job is None:
                    return
                try:
                    fn(job, worker)
                except BaseException as exc:  # the other threads stop taking jobs
                    failed.append(exc)
                finally:
                    with done:
                        in_flight[0] -= 1
                        done.notify_all()
        finally:
            _local.inside = False

    helpers = _helpers()
    for worker in range(1, n_threads):
        helpers.hand(worker, loop)
    loop(0)
    with done:  # sleeps on a condition: a job still running elsewhere is waited for, not spun on
        done.wait_for(lambda: in_flight[0] == 0)
    if failed:
        raise failed[0]


def jobs_for(xp=numpy, big=True, per_thread=4):
    """How many jobs to cut work into: several per thread when it is big enough, so that a
    thread slowed by the machine's other load takes fewer of them; one when it is small."""
    return workers(xp) * per_thread if big and workers(xp) > 1 else 1


def over_ranges(fn, size, xp=numpy, big=True, per_thread=4):
    """Call ``fn(start, stop)`` over 0..size cut into contiguous ranges spread across the
    threads: ``jobs_for(xp, big, per_thread)`` of them, so one call when the work is small."""
    ranges = split(size, jobs_for(xp, big, per_thread))
    run(lambda j, worker: fn(*ranges[j]), len(ranges), xp)


def elementwise(fn, size, xp=numpy, min_size=1 << 18):
    """``over_ranges`` for elementwise work on flat views, split from ``min_size`` elements up."""
    over_ranges(fn, size, xp, size >= min_size)


def copy(dst, src, xp=numpy, min_size=1 << 18):
    """dst[...] = src for two C-contiguous arrays of one size (a gradient handed on), over
    element ranges on brewnet's threads from ``min_size`` elements up."""
    d, s = dst.reshape(-1), src.reshape(-1)
    elementwise(lambda a, z: xp.copyto(d[a:z], s[a:z]), d.size, xp, min_size)


def add(a, b, out, xp=numpy, min_size=1 << 18):
    """out = a + b for C-contiguous arrays of one size, over element ranges on brewnet's threads."""
    fa, fb, fo = a.reshape(-1), b.reshape(-1), out.reshape(-1)
    elementwise(lambda lo, hi: xp.add(fa[lo:hi], fb[lo:hi], out=fo[lo:hi]), fo.size, xp, min_size)


def chunk_ranges(n, chunk, xp=numpy):
    """(start, stop) ranges of at most ``chunk`` samples covering 0..n, in a whole number of
    rounds of equal chunks per thread (so no thread is left with the odd one at the end)."""
    count = -(-n // chunk)
    threads = workers(xp)
    if threads > 1:
        count = -(-count // threads) * threads
    size = max(1, -(-n // max(1, count)))
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def split(size, parts):
    """``parts`` contiguous (start, stop) ranges covering 0..size, as equal as possible."""
    parts = max(1, min(parts, size))
    bounds = [size * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:])]


# ---------------------------------------------------------------------------
# big single GEMMs
# ---------------------------------------------------------------------------
# below this many multiply-adds a GEMM runs as one call: cutting it costs more than it saves
MATMUL_MIN_MACS = 1 << 22
# the smallest blocks a GEMM is cut into (rows of the result, columns, or leading-axis items):
# narrower blocks run the BLAS kernels at a fraction of their speed
MATMUL_MIN_ROWS = 32
MATMUL_MIN_COLS = 128
# how many blocks: enough for several per thread on a small machine (a thread slowed by other
# load takes fewer), and the same for every thread count, so the floats never depend on it
MATMUL_BLOCKS = 8
MATMUL_MAX_BLOCKS = 16


def _matmul_split(out_shape, macs):
    """(axis, parts) to cut a GEMM of result shape ``out_shape`` along: -1 (columns), -2 (rows)
    or 0 (the leading stacking axis); None when it runs as one call. It depends on the shape
    alone, not on the thread count."""
    if macs < MATMUL_MIN_MACS:
        return None
    m, n = out_shape[-2], out_shape[-1]
    candidates = [(-1, n // MATMUL_MIN_COLS), (-2, m // MATMUL_MIN_ROWS)]
    if len(out_shape) > 2:
        candidates.insert(0, (0, out_shape[0]))
    # the first that gives enough blocks, else the one that gives the most
    axis, parts = next(((a, p) for a, p in candidates if p >= MATMUL_BLOCKS), max(candidates, key=lambda c: c[1]))
    parts = min(parts, MATMUL_MAX_BLOCKS)
    return (axis, parts) if parts >= 2 else None


def _operand_slice(x, axis, a, b, out_ndim):
    """The part of operand ``x`` that the result's block [a:b] along ``axis`` needs."""
    if axis == 0:
        if x.ndim == out_ndim and x.shape[0] != 1:
            return x[a:b]
        return x  # broadcast along the stacking axis
    return x[..., a:b, :] if axis == -2 else x[..., :, a:b]


def matmul(a, b, out=None):
    """``numpy.matmul(a, b, out=out)`` (stacked and broadcast as numpy does), cut into blocks
    of the result that run as jobs on brewnet's threads when it is big enough.

    The contract for call sites: any numpy or cupy arrays that ``numpy.matmul`` accepts with
    ``a`` and ``b`` at least 2-D; ``out``, if given, has the result's shape and dtype and does
    not overlap ``a`` or ``b``. Returns the result (``out`` when given). The blocks depend on the
    shapes alone and each is one single-threaded BLAS call, so with two threads or more the
    floats are the same whatever the count. Inside a job, on cupy, with one thread (the BLAS's
    own threads then), or below MATMUL_MIN_MACS it is one plain matmul call.
    """
    xp = numpy if type(a) is numpy.ndarray and type(b) is numpy.ndarray else None
    if xp is None or inside_job() or a.ndim < 2 or b.ndim < 2:
        if xp is None:
            import cupy  # only cupy arrays reach here: brewnet's arrays are numpy or cupy

            return cupy.matmul(a, b, out=out)
        return numpy.matmul(a, b, out=out)
    batch = numpy.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out_shape = batch + (a.shape[-2], b.shape[-1])
    macs = math.prod(out_shape) * a.shape[-1]
    plan = _matmul_split(out_shape, macs) if workers(numpy) > 1 else None
    if plan is None:
        apply_blas_policy()
        return numpy.matmul(a, b, out=out)
    if out is None:
        out = numpy.empty(out_shape, numpy.result_type(a, b))
    axis, parts = plan
    ranges = split(out_shape[axis], parts)
    nd = len(out_shape)

    def job(j, worker):
        lo, hi = ranges[j]
        block = out[lo:hi] if axis == 0 else (out[..., lo:hi, :] if axis == -2 else out[..., :, lo:hi])
        a_part = _operand_slice(a, axis, lo, hi, nd) if axis != -1 else a
        b_part = _operand_slice(b, axis, lo, hi, nd) if axis != -2 else b
        numpy.matmul(a_part, b_part, out=block)

    run(job, len(ranges), numpy)
    return out
