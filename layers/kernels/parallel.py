"""brewnet's own CPU threads: the heavy layers split their work (samples, planes, features)
into jobs and run them on every core, with the BLAS single-threaded inside.

Why not leave the threading to the BLAS: a GEMM split across threads must wait for its slowest
part at every call, and most of the GEMMs here are small (a chunk of a convolution's columns).
On a shared 2-core machine that wait made OpenBLAS's two threads slower than one for seconds at
a time, and everything between the GEMMs (im2col copies, pooling, the SGD step) ran on one
core. Jobs handed out as threads come free keep both cores busy, and a slowed core just takes
fewer jobs.

``BREWNET_THREADS=N`` sets the thread count (default: the cores this process may use);
``BREWNET_THREADS=1`` runs every job in the calling thread and leaves the BLAS threads alone.
Only numpy work is split: on cupy, jobs run in order in the calling thread.
"""

import os
import threading

import numpy

_state = {"threads": None, "pool": None, "blas": None}
_lock = threading.Lock()


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
            try:
                n = len(os.sched_getaffinity(0))
            except AttributeError:  # not on Linux
                n = os.cpu_count() or 1
        _state["threads"] = max(1, n)
    return _state["threads"]


def set_thread_count(n):
    """Change the thread count (tests; the API's counterpart of BREWNET_THREADS)."""
    with _lock:
        if _state["pool"] is not None:
            _state["pool"].shutdown(wait=True)
        _state["pool"] = None
        _state["threads"] = max(1, int(n))


def workers(xp=numpy):
    """Number of workers jobs on arrays of module ``xp`` are spread over."""
    return thread_count() if xp is numpy else 1


def _executor():
    if _state["pool"] is None:
        with _lock:
            if _state["pool"] is None:
                from concurrent.futures import ThreadPoolExecutor

                _state["pool"] = ThreadPoolExecutor(thread_count() - 1, thread_name_prefix="brewnet")
    return _state["pool"]


class _Blas:
    """numpy's and scipy's BLAS libraries, whose thread count is set to one around jobs."""

    def __init__(self):
        try:
            from threadpoolctl import ThreadpoolController

            self.libs = ThreadpoolController().select(user_api="blas").lib_controllers
        except Exception:  # pragma: no cover - threadpoolctl missing or failing: leave BLAS as is
            self.libs = []

    def single(self):
        before = [lib.num_threads for lib in self.libs]
        for lib in self.libs:
            lib.set_num_threads(1)
        return before

    def restore(self, before):
        for lib, n in zip(self.libs, before):
            lib.set_num_threads(n)


def _blas():
    if _state["blas"] is None:
        _state["blas"] = _Blas()
    return _state["blas"]


def run(fn, n_jobs, xp=numpy):
    """Call ``fn(job, worker)`` for job in 0..n_jobs-1, spread over the threads.

    ``worker`` (0..workers(xp)-1) names the thread, so that a job can use that thread's
    scratch buffers and partial sums; jobs go to whichever thread is free next, the calling
    thread first. It returns once every job is done, without waiting for helper threads
    that woke too late to take one (waking a thread costs tens of microseconds here). The
    first exception raised by a job is raised here, after the jobs in flight have ended.
    """
    n_threads = min(workers(xp), n_jobs)
    if n_threads <= 1:
        for job in range(n_jobs):
            fn(job, 0)
        return
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

    blas = _blas()
    before = blas.single()
    try:
        for worker in range(1, n_threads):
            _executor().submit(loop, worker)
        loop(0)
        with done:
            done.wait_for(lambda: in_flight[0] == 0)
    finally:
        blas.restore(before)
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
