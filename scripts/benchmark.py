#!/usr/bin/env python
"""Training throughput of brewnet next to PyTorch (CPU), on LeNet, CIFAR-10-quick and CaffeNet,
and (--nets modern) ResNet-50, GoogLeNet, Inception-v3, MobileNet v1/v2 and SqueezeNet 1.1 at batch 8.

One command: measures the float32 GEMM peak, then runs interleaved rounds (brewnet then
PyTorch, then PyTorch then brewnet, ...) in which every measurement is a fresh subprocess, so
that peak memory (ru_maxrss) belongs to one net and one framework only. The ratio is the median
of the rounds' own ratios, which a slow spell of the machine affects least. Training = forward + backward +
SGD update (momentum 0.9, weight decay 5e-4) through the brewnet Solver, and
torch.optim.SGD with the same settings on a model translated layer by layer from the
same prototxt (same shapes). Prints a table of medians and writes JSON.

This is a benchmark, not a test: nothing fails on timing. The machine may be shared;
the load average at start and end goes into the JSON so noisy runs can be told apart.

  python scripts/benchmark.py                       # all nets, 5 rounds
  python scripts/benchmark.py --nets lenet --rounds 3
  python scripts/benchmark.py --nets modern --rounds 2   # configs/modern/ (or --nets all)
  python scripts/benchmark.py --quick --no-torch    # a smoke run
  python scripts/benchmark.py --contend 1           # also under one competing busy process

With ``--contend N`` every measurement is repeated at once with N busy processes (pure-Python
spin loops) running beside it, for brewnet and PyTorch alike; the table adds each framework's
slowdown (quiet img/s over contended img/s, the median of the rounds' own ratios).

With ``--caffe PATH`` (a BVLC Caffe ``caffe`` binary; docs/BENCHMARKS.md says how to build one) Caffe
trains the same prototxt in every round too: ``caffe train`` on a solver with the same SGD settings,
timed from the microsecond stamps of its per-iteration log lines, and stopped once it has run long
enough. The table then adds Caffe's img/s and brewnet's ratio to it.
"""

import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
# the repository's packages first: a stray "solver" folder elsewhere on the path must not shadow ours
sys.path.insert(0, str(ROOT))
# brewnet names OpenBLAS's kernels for this CPU in os.environ (brewnet/blas_core.py), before any
# numpy loads; every worker inherits it, so the GEMM peak, brewnet and an OpenBLAS Caffe all get them
import brewnet  # noqa: E402,F401

# net key -> deploy prototxt (the train net is derived from it), batch, timing budget
NETS = {
    "lenet": dict(deploy="configs/lenet/lenet_deploy.prototxt", batch=64, min_seconds=3.0, warmup=5),
    "lenet_lmdb": dict(train="configs/lenet/lenet_train_test.prototxt", batch=64, min_seconds=3.0, warmup=5,
                       needs="data/mnist_train_lmdb"),
    "cifar10_quick": dict(deploy="configs/cifar10_quick/cifar10_quick_deploy.prototxt", batch=100,
                          min_seconds=4.0, warmup=3),
    "caffenet": dict(deploy="configs/caffenet/caffenet_deploy.prototxt", batch=10, min_seconds=6.0, warmup=2),
}
# the modern ImageNet nets of configs/modern/ (made by its make_nets.py), trained at batch 8
MODERN_NETS = ("resnet50", "googlenet", "inception_v3", "mobilenet_v1", "mobilenet_v2", "squeezenet11")
for _name in MODERN_NETS:
    NETS[_name] = dict(deploy=f"configs/modern/{_name}.prototxt", batch=8, min_seconds=8.0, warmup=1)
DEFAULT_NETS = "lenet,lenet_lmdb,cifar10_quick,caffenet"
# --nets accepts these group names beside net names
NET_GROUPS = {"classic": DEFAULT_NETS.split(","), "modern": list(MODERN_NETS),
              "all": DEFAULT_NETS.split(",") + list(MODERN_NETS)}
# figures measured on this machine kind (issue #8), shown for reference only
REFERENCE = {
    "lenet": {"caffe": 2690, "pytorch": 2920, "chainer": 920},
    "cifar10_quick": {"pytorch": 1250, "chainer": 150},
    "caffenet": {"caffe": 17.3, "pytorch": 19.4, "chainer": 10.2},
}
SGD = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


def _maxrss_mib():
    # Linux reports kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------
# net definitions
# ---------------------------------------------------------------------------
def train_net_param(spec, batch):
    """A TRAIN NetParameter: the deploy net made trainable (deploy_to_train); or the
    train_test net as is (LMDB data)."""
    from brewnet import netdef

    if "train" in spec:
        return netdef.read_net(str(ROOT / spec["train"]))
    return deploy_to_train(netdef.read_net(str(ROOT / spec["deploy"])), batch, spec["deploy"])


def deploy_to_train(param, batch, where):
    """The deploy NetParameter ``param`` (read from ``where``) as a TRAIN net, in place: a
    (data, label) Input of ``batch`` and SoftmaxWithLoss in place of the final Softmax."""
    from brewnet.netdef import caffe_pb2

    inp = param.layer[0]
    if inp.type != "Input":
        raise SystemExit(f"{where}: the first layer must be an Input layer")
    inp.input_param.shape[0].dim[0] = batch
    del inp.input_param.shape[1:]
    inp.input_param.shape.add().dim.append(batch)
    del inp.top[1:]
    inp.top.append("label")
    last = param.layer[-1]
    if last.type == "Softmax":
        logits = last.bottom[0]
        del param.layer[-1]
    else:
        logits = last.top[0]
    loss = param.layer.add()
    loss.name, loss.type = "loss", "SoftmaxWithLoss"
    loss.bottom.extend([logits, "label"])
    loss.top.append("loss")
    param.state.phase = caffe_pb2.TRAIN
    return param


def training_flops(net, layer_params):
    """Multiply-adds x 2 of one training image: forward, weight gradient and data gradient of
    every Convolution/InnerProduct (no data gradient for a layer fed by the data)."""
    total = 0
    data_tops = set()
    for lp in layer_params:
        if lp.type in ("Input", "Data", "DummyData"):
            data_tops.update(lp.top)
    for layer, bottom, top in zip(net.layers, net.bottom_vecs, net.top_vecs):
        if layer.type not in ("Convolution", "InnerProduct"):
            continue
        weights = layer.blobs[0].count
        if layer.type == "Convolution":
            out_spatial = top[0].count // (top[0].shape[0] * top[0].shape[1])
            fwd = 2 * weights * out_spatial
        else:
            fwd = 2 * weights
        passes = 2 if layer.param.bottom[0] in data_tops else 3
        total += passes * fwd
    return total


# ---------------------------------------------------------------------------
# workers (each runs in its own process)
# ---------------------------------------------------------------------------
def _timed_loop(step, warmup, min_iters, min_seconds):
    for _ in range(warmup):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def sgd_solver_param(net_param):
    """brewnet's SGD SolverParameter with the settings in SGD, running until stopped, silent."""
    from brewnet.netdef import caffe_pb2

    sp = caffe_pb2.SolverParameter()
    sp.net_param.CopyFrom(net_param)
    sp.base_lr, sp.momentum, sp.weight_decay = SGD["lr"], SGD["momentum"], SGD["weight_decay"]
    sp.lr_policy = "fixed"
    sp.max_iter = 10 ** 9
    sp.display = 0
    sp.snapshot_after_train = False
    sp.random_seed = 1
    sp.type = "SGD"
    return sp


def fill_random_inputs(net, xp):
    """Random data and labels (drawn on the host, seed 0) into the net's data/label inputs."""
    import numpy

    rng = numpy.random.default_rng(0)
    data = net.blobs["data"]
    data.data[...] = xp.asarray(rng.standard_normal(data.shape, dtype=numpy.float32))
    label = net.blobs["label"]
    n_out = net.blobs[net.layers[-1].param.bottom[0]].shape[1]
    label.data[...] = xp.asarray(rng.integers(0, n_out, size=label.shape).astype(numpy.float32))


def worker_brewnet(job):
    import numpy

    os.chdir(ROOT)  # the LMDB source path is relative to the repository
    import brewnet.layers.families  # noqa: F401  (the baseline includes the framework's code)
    from brewnet import solver as solver_pkg

    rss0 = _maxrss_mib()

    spec = NETS[job["net"]]
    sp = sgd_solver_param(train_net_param(spec, spec["batch"]))
    import logging

    logging.disable(logging.INFO)  # no per-iteration log lines inside the timing
    solver = solver_pkg.get_solver(sp)
    net = solver.net
    if "data" in net.inputs:
        fill_random_inputs(net, numpy)
    flops = training_flops(net, solver.net.net_param.layer)
    times = _timed_loop(lambda: solver.step(1), job["warmup"], job["min_iters"], job["min_seconds"])
    loss = float(net.blobs["loss"].data)
    return dict(times=times, flops_per_image=flops, loss=loss, rss_base_mib=rss0, rss_peak_mib=_maxrss_mib())


def torch_model(net_param, who="benchmark"):
    """(PyTorch module, input shape) translated from a train NetParameter by scripts/torch_net.py
    (chains and branching nets alike); ``who`` names the script in the error for a layer type
    it cannot translate."""
    from torch_net import torch_model as translate

    return translate(net_param, who)


def torch_training_step(net_param, device="cpu", who="benchmark"):
    """A PyTorch training step (forward, cross-entropy, backward, SGD update with the settings
    in SGD) of the net translated from ``net_param``, on a fixed random batch on ``device``.
    Returns (step, last): after each step, last["loss"] is its loss tensor."""
    import torch

    model, shape = torch_model(net_param, who)
    model = model.to(device).train()
    x = torch.randn(*shape, device=device)
    with torch.no_grad():
        n_out = model(x[:1]).shape[1]
    y = torch.randint(0, n_out, (shape[0],), device=device)
    opt = torch.optim.SGD(model.parameters(), **SGD)
    lossf = torch.nn.CrossEntropyLoss()
    last = {}

    def step():
        opt.zero_grad()
        loss = lossf(model(x), y)
        loss.backward()
        opt.step()
        last["loss"] = loss

    return step, last


def worker_torch(job):
    import torch

    rss0 = _maxrss_mib()  # after the import: the delta is what training itself takes
    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = NETS[job["net"]]
    step, last = torch_training_step(train_net_param(spec, spec["batch"]))
    times = _timed_loop(step, job["warmup"], job["min_iters"], job["min_seconds"])
    return dict(times=times, loss=float(last["loss"]), rss_base_mib=rss0, rss_peak_mib=_maxrss_mib(),
                threads=torch.get_num_threads())


# a Caffe solver's per-iteration display line: glog's stamp (date, time to the microsecond, thread
# id, source), then "Iteration K (" -- the line Solver::Step logs after each update when display is 1
CAFFE_ITERATION = re.compile(r"^I\d{4,8} (\d\d):(\d\d):(\d\d\.\d+) +\d+ solver\.cpp:\d+\] "
                             r"Iteration (\d+) \(.*loss = (\S+)")


def caffe_iteration_times(lines, warmup, min_iters, min_seconds):
    """Seconds per iteration from a ``caffe train`` log (display: 1), reading ``lines`` only until
    ``warmup`` iterations plus at least ``min_iters`` and ``min_seconds`` of timed ones have passed.
    Returns (times, last loss)."""
    stamps, loss = [], None
    for line in lines:
        m = CAFFE_ITERATION.match(line)
        if not m:
            continue
        hours, minutes, seconds = int(m.group(1)), int(m.group(2)), float(m.group(3))
        stamp = 3600 * hours + 60 * minutes + seconds
        if stamps and stamp < stamps[-1]:
            stamp += 86400  # the run crossed midnight
        stamps.append(stamp)
        loss = float(m.group(5))
        # the first stamp ends iteration 0: the deltas after it are whole iterations
        timed = stamps[warmup:]
        if len(timed) > min_iters and timed[-1] - timed[0] >= min_seconds:
            break
    times = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    return times, loss


def worker_caffe(job):
    """``caffe train`` on the benchmark's train net with the same SGD settings, logging every
    iteration; stopped as soon as enough iterations were timed."""
    from google.protobuf import text_format

    spec = NETS[job["net"]]
    net_param = train_net_param(spec, spec["batch"])
    solver = sgd_solver_param(net_param)
    solver.ClearField("net_param")
    solver.display = 1
    solver.solver_mode = solver.CPU
    with tempfile.TemporaryDirectory(prefix="brewnet-bench-caffe-") as tmp:
        net_path = Path(tmp) / "train.prototxt"
        net_path.write_text(text_format.MessageToString(net_param))
        solver.net = str(net_path)
        solver_path = Path(tmp) / "solver.prototxt"
        solver_path.write_text(text_format.MessageToString(solver))
        proc = subprocess.Popen([job["caffe"], "train", "-solver", str(solver_path)], cwd=str(ROOT),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        tail = []

        def logged():
            for line in proc.stderr:
                tail[:] = (tail + [line.rstrip()])[-3:]
                yield line

        try:
            times, loss = caffe_iteration_times(logged(), job["warmup"], job["min_iters"], job["min_seconds"])
        finally:
            proc.kill()
            proc.wait()
    if len(times) < job["min_iters"]:
        raise SystemExit(f"caffe ran {len(times)} timed iterations: " + " | ".join(tail))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    # a C++ program has no framework import to subtract: its whole peak is what training took
    return dict(times=times, loss=loss, rss_base_mib=0.0, rss_peak_mib=peak)


def worker_gemm(job):
    import numpy

    n = job["size"]
    rng = numpy.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=numpy.float32)
    b = rng.standard_normal((n, n), dtype=numpy.float32)
    c = numpy.empty((n, n), dtype=numpy.float32)
    numpy.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(job["repeats"]):
        t0 = time.perf_counter()
        numpy.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return dict(gflops=2.0 * n ** 3 / best / 1e9, seconds=best, size=n)


WORKERS = {"brewnet": worker_brewnet, "pytorch": worker_torch, "caffe": worker_caffe, "gemm": worker_gemm}


def run_worker(job):
    """One measurement in a fresh interpreter; returns its JSON answer (or an error dict)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    load = os.getloadavg()[0]  # others' work on the machine skews the timing: keep it with the result
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "load_average_1min": load}
    result = json.loads(lines[-1])
    result["load_average_1min"] = load
    return result


def torch_available():
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    return proc.returncode == 0


# a busy process: spins until stopped, or until its parent (this script, whose pid is its
# argument) is gone, so that no spinner outlives a benchmark killed without a chance to clean up
SPIN = "import os, sys\nparent = int(sys.argv[1])\nwhile os.getppid() == parent:\n    pass\n"


@contextmanager
def busy_processes(n):
    """N busy processes for the duration of the block; yields their pids. They are killed when
    the block ends, however it ends (Ctrl-C and SIGTERM included: SIGTERM is turned into an
    exception here so that the block's cleanup runs)."""
    procs = []
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    in_main = threading_is_main()
    if in_main:
        signal.signal(signal.SIGTERM, on_term)
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid())],
                                          stdin=subprocess.DEVNULL))
        time.sleep(0.2)  # let them reach the scheduler's run queue before the timing starts
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def threading_is_main():
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------
def _median(values):
    return statistics.median(values) if values else None


def _fmt(value, spec):
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return "-".rjust(width) if value is None else format(value, spec)


# the frameworks a round can time, brewnet first; brewnet's ratio is taken to each of the others
FRAMEWORKS = ("brewnet", "pytorch", "caffe")


def summarize(net, spec, runs, peak):
    """Medians over rounds for one net: img/s, ratios, % of peak, memory."""
    out = {"batch": spec["batch"]}
    for fw in FRAMEWORKS:
        good = [r for r in runs.get(fw, []) if "error" not in r]
        errors = [r["error"] for r in runs.get(fw, []) if "error" in r]
        if not good:
            out[fw] = {"errors": errors} if errors else None
            continue
        # per round: the median iteration time; across rounds: the median of those
        per_round = [spec["batch"] / statistics.median(r["times"]) for r in good]
        rec = {
            "img_per_s": _median(per_round),
            "img_per_s_rounds": per_round,
            "img_per_s_spread": [min(per_round), max(per_round)],
            "iterations": [len(r["times"]) for r in good],
            "peak_rss_mib": _median([r["rss_peak_mib"] for r in good]),
            "rss_delta_mib": _median([r["rss_peak_mib"] - r["rss_base_mib"] for r in good]),
            "final_loss": good[-1]["loss"],
        }
        if errors:
            rec["errors"] = errors
        if "flops_per_image" in good[0]:
            rec["flops_per_image"] = good[0]["flops_per_image"]
        out[fw] = rec
    b = out.get("brewnet")
    flops = (b or {}).get("flops_per_image")
    for fw in FRAMEWORKS:
        rec = out.get(fw)
        if rec and "img_per_s" in rec and flops and peak:
            rec["gemm_peak_fraction"] = rec["img_per_s"] * flops / (peak * 1e9)
    for other in FRAMEWORKS[1:]:
        o = out.get(other)
        if not (b and o and "img_per_s" in b and "img_per_s" in o):
            continue
        # the median of each round's ratio: the two measurements of a round ran minutes apart at
        # most, so a slow spell of the machine that spans both cancels out
        paired = [statistics.median(ro["times"]) / statistics.median(rb["times"])
                  for rb, ro in zip(runs["brewnet"], runs[other]) if "times" in rb and "times" in ro]
        out[f"ratio_rounds_{other}"] = paired
        out[f"ratio_brewnet_over_{other}"] = _median(paired)
        out[f"ratio_of_medians_{other}"] = b["img_per_s"] / o["img_per_s"]
        if o["rss_delta_mib"]:
            out[f"memory_ratio_brewnet_over_{other}"] = b["rss_delta_mib"] / o["rss_delta_mib"]
    if "ratio_rounds_pytorch" in out:  # the names earlier reports used
        out["ratio_rounds"] = out["ratio_rounds_pytorch"]
        out["ratio_of_medians"] = out["ratio_of_medians_pytorch"]
    out["reference_img_per_s"] = REFERENCE.get(net)
    out["raw"] = {fw: [{"load_average_1min": r.get("load_average_1min")} for r in runs[fw]] for fw in runs}
    return out


def summarize_contention(spec, quiet_runs, busy_runs):
    """Per framework: contended img/s and the slowdown (quiet / contended img/s), the median of
    the rounds' own ratios (each round measured quiet and contended back to back)."""
    out = {}
    for fw in FRAMEWORKS:
        pairs = [(q, c) for q, c in zip(quiet_runs.get(fw, []), busy_runs.get(fw, []))
                 if "times" in q and "times" in c]
        errors = [c["error"] for c in busy_runs.get(fw, []) if "error" in c]
        if not pairs:
            out[fw] = {"errors": errors} if errors else None
            continue
        rates = [spec["batch"] / statistics.median(c["times"]) for _, c in pairs]
        ratios = [statistics.median(c["times"]) / statistics.median(q["times"]) for q, c in pairs]
        out[fw] = {"img_per_s": _median(rates), "img_per_s_rounds": rates,
                   "slowdown": _median(ratios), "slowdown_rounds": ratios,
                   "load_average_1min": [c.get("load_average_1min") for _, c in pairs]}
        if errors:
            out[fw]["errors"] = errors
    return out


def print_table(results, peak):
    click.echo(f"float32 GEMM peak (2048^3 matmul, best of N): {peak:.1f} GFLOP/s")
    busy = any("contended" in r for r in results.values())
    caffe = any((r.get("caffe") or {}).get("img_per_s") or (r.get("caffe") or {}).get("errors")
                for r in results.values())
    head = (f"{'net (batch)':<20} {'brewnet img/s':>14} {'PyTorch img/s':>14} {'ratio':>6} "
            f"{'%peak bn':>8} {'%peak pt':>8} {'MiB bn':>8} {'MiB pt':>8} {'rounds':>6} "
            f"{'bn min-max':>15} {'pt min-max':>15}")
    if caffe:
        head += f" {'Caffe img/s':>12} {'bn/caffe':>8}"
    if busy:
        head += f" {'bn busy':>8} {'pt busy':>8} {'bn slow':>7} {'pt slow':>7}"
        if caffe:
            head += f" {'cf slow':>7}"
    click.echo(head)
    click.echo("-" * len(head))
    for net, r in results.items():
        b, t, c = r.get("brewnet") or {}, r.get("pytorch") or {}, r.get("caffe") or {}
        def spread(rec):
            lo_hi = rec.get("img_per_s_spread")
            return f"{lo_hi[0]:.1f}-{lo_hi[1]:.1f}" if lo_hi else "-"
        frac_b = b.get("gemm_peak_fraction")
        frac_t = t.get("gemm_peak_fraction")
        row = (f"{net + ' (' + str(r['batch']) + ')':<20} {_fmt(b.get('img_per_s'), '14.1f')} "
               f"{_fmt(t.get('img_per_s'), '14.1f')} {_fmt(r.get('ratio_brewnet_over_pytorch'), '6.2f')} "
               f"{_fmt(frac_b and 100 * frac_b, '7.1f')}% {_fmt(frac_t and 100 * frac_t, '7.1f')}% "
               f"{_fmt(b.get('rss_delta_mib'), '8.0f')} {_fmt(t.get('rss_delta_mib'), '8.0f')} "
               f"{len(b.get('img_per_s_rounds', [])):>6} {spread(b):>15} {spread(t):>15}")
        if caffe:
            row += f" {_fmt(c.get('img_per_s'), '12.1f')} {_fmt(r.get('ratio_brewnet_over_caffe'), '8.2f')}"
        if busy:
            row += contention_columns(r.get("contended"), caffe)
        click.echo(row)
        for fw, rec in (("brewnet", b), ("pytorch", t), ("caffe", c)):
            for err in rec.get("errors", []):
                click.echo(f"    {fw} error: {err}")
    click.echo("ratio = median over rounds of brewnet / PyTorch within the round (the two run back to back, "
               "in alternating order); MiB = peak RSS growth of the measuring process (ru_maxrss after training "
               "minus after importing the framework); %peak = img/s x training FLOP per image / GEMM peak.")
    if caffe:
        click.echo("bn/caffe = the same median ratio against `caffe train` (timed from its per-iteration log stamps).")
    if busy:
        n = next(r["contended"]["processes"] for r in results.values() if "contended" in r)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        click.echo(f"busy = img/s with {n} busy process(es) beside it; slow = busy / quiet time per "
                   f"iteration (median over rounds; 1.0 = unaffected; a fair share of {cpus} CPUs: "
                   f"{(cpus + n) / cpus:.2f}).")
    loads = [r.get("load_average_1min") for res in results.values() for fw in FRAMEWORKS
             for r in (res.get("raw", {}).get(fw) or [])]
    loads = [x for x in loads if x is not None]
    if loads and max(loads) > 1.5:
        click.echo(f"note: the machine was busy (1-min load average {min(loads):.1f}-{max(loads):.1f} on "
                   f"{os.cpu_count()} CPUs): timings are noisy; PyTorch's thread pool suffers most when oversubscribed.")


def contention_columns(contended, caffe=False):
    """The busy img/s and slowdown columns of one net's row (Caffe's slowdown too with ``caffe``)."""
    contended = contended or {}
    b, t = contended.get("brewnet") or {}, contended.get("pytorch") or {}
    cols = (f" {_fmt(b.get('img_per_s'), '8.1f')} {_fmt(t.get('img_per_s'), '8.1f')} "
            f"{_fmt(b.get('slowdown'), '7.2f')} {_fmt(t.get('slowdown'), '7.2f')}")
    if caffe:
        cols += f" {_fmt((contended.get('caffe') or {}).get('slowdown'), '7.2f')}"
    return cols


@click.command()
@click.option("--nets", default=DEFAULT_NETS, show_default=True,
              help=f"Comma-separated nets from: {', '.join(NETS)}; or a group: {', '.join(NET_GROUPS)}.")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(min=1),
              help="Interleaved rounds (brewnet, PyTorch, brewnet, ...); medians are reported.")
@click.option("--quick", is_flag=True, help="A smoke run: one round, a couple of iterations each.")
@click.option("--torch/--no-torch", "use_torch", default=None,
              help="Also time PyTorch (default: when `import torch` works).")
@click.option("--json-out", default="runs/benchmark.json", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the results as JSON.")
@click.option("--caffe", "caffe_bin", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A BVLC Caffe `caffe` binary: also time `caffe train` on every net (docs/BENCHMARKS.md).")
@click.option("--contend", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also time every measurement with this many busy processes running beside it.")
@click.option("--worker", default=None, hidden=True, help="Internal: run one measurement (JSON job).")
def main(nets, rounds, quick, use_torch, json_out, caffe_bin, contend, worker):
    """Time brewnet training against PyTorch (and Caffe) on the same machine."""
    if worker is not None:
        job = json.loads(worker)
        click.echo(json.dumps(WORKERS[job["kind"]](job)))
        return
    names = []
    for n in (n.strip() for n in nets.split(",")):
        for name in NET_GROUPS.get(n, [n] if n else []):
            if name not in names:
                names.append(name)
    unknown = [n for n in names if n not in NETS]
    if unknown:
        raise click.BadParameter(f"unknown net(s) {', '.join(unknown)}; choose from {', '.join(NETS)}",
                                 param_hint="--nets")
    skipped = {}
    for n in list(names):
        need = NETS[n].get("needs")
        if need and not (ROOT / need).exists():
            skipped[n] = f"{need} is missing (make it with scripts/get_mnist.py and scripts/convert_mnist.py)"
            names.remove(n)
            click.echo(f"skipping {n}: {skipped[n]}", err=True)
    if use_torch is None:
        use_torch = torch_available()
    if quick:
        rounds = 1
    gemm_job = {"kind": "gemm", "size": 512 if quick else 2048, "repeats": 2 if quick else 10}
    load_start = os.getloadavg()
    peaks = [run_worker(gemm_job)]
    frameworks = ["brewnet"] + (["pytorch"] if use_torch else []) + (["caffe"] if caffe_bin else [])
    runs = {n: {fw: [] for fw in frameworks} for n in names}
    busy_runs = {n: {fw: [] for fw in frameworks} for n in names}
    spinner_pids = []
    for r in range(rounds):
        for n in names:
            spec = NETS[n]
            # alternate who goes first, so that a machine slowing down or speeding up over a
            # round favours neither
            for fw in (frameworks if r % 2 == 0 else frameworks[::-1]):
                if fw == "pytorch" and "deploy" not in spec:
                    continue  # the LMDB variant is brewnet's data path only
                job = {"kind": fw, "net": n,
                       "warmup": 1 if quick else spec["warmup"],
                       "min_iters": 2 if quick else 3,
                       "min_seconds": 0.0 if quick else spec["min_seconds"]}
                if fw == "caffe":
                    job["caffe"] = str(Path(caffe_bin).resolve())
                res = run_worker(job)
                runs[n][fw].append(res)
                if "times" in res:
                    rate = spec["batch"] / statistics.median(res["times"])
                    click.echo(f"round {r + 1}/{rounds} {n:<14} {fw:<8} {rate:10.1f} img/s", err=True)
                else:
                    click.echo(f"round {r + 1}/{rounds} {n:<14} {fw:<8} failed: {res.get('error')}", err=True)
                if contend:
                    # the same measurement at once, with the busy processes beside it
                    with busy_processes(contend) as pids:
                        spinner_pids.extend(pids)
                        res = run_worker(job)
                    busy_runs[n][fw].append(res)
                    if "times" in res:
                        rate = spec["batch"] / statistics.median(res["times"])
                        click.echo(f"round {r + 1}/{rounds} {n:<14} {fw:<8} {rate:10.1f} img/s "
                                   f"with {contend} busy", err=True)
    peaks.append(run_worker(gemm_job))
    good_peaks = [p["gflops"] for p in peaks if "gflops" in p]
    peak = max(good_peaks) if good_peaks else None
    results = {n: summarize(n, NETS[n], runs[n], peak) for n in names}
    if contend:
        for n in names:
            results[n]["contended"] = dict(processes=contend, **summarize_contention(NETS[n], runs[n], busy_runs[n]))
    print_table(results, peak or 0.0)
    import numpy

    report = {
        "gemm_peak_gflops": peak,
        "gemm_peak_runs": peaks,
        "nets": results,
        "skipped": skipped,
        "raw": runs,
        "raw_contended": busy_runs if contend else None,
        "settings": {"rounds": rounds, "quick": quick, "torch": use_torch, "caffe": caffe_bin, "sgd": SGD,
                     "contend": contend, "busy_pids": spinner_pids},
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "numpy": numpy.__version__, "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
            "load_average_start": load_start, "load_average_end": os.getloadavg(),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
