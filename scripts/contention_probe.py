#!/usr/bin/env python
"""Forward time of a net at a small batch, quiet and beside N busy processes, per layer type:
where the time goes when another process takes a core. A measurement tool, not a test.

  python scripts/contention_probe.py                        # GoogLeNet-shaped net, batch 8, 1 busy
  python scripts/contention_probe.py --contend 2 --torch    # PyTorch's GoogLeNet beside it
  python scripts/contention_probe.py --model NET.prototxt --by-type

The default net is scripts/googlenet_like.py's (BVLC GoogLeNet's sizes, no auxiliary heads);
``--torch`` times the same net written in PyTorch (2 threads) under the same load.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import benchmark  # noqa: E402  (busy_processes)
import googlenet_like  # noqa: E402


def _load():
    return os.getloadavg()[0]


def brewnet_net(model):
    import numpy

    import brewnet.layers.families  # noqa: F401
    from brewnet import netdef
    from brewnet.layers.net import Net
    from brewnet.netdef import caffe_pb2

    param = netdef.read_net(model)
    param.state.phase = caffe_pb2.TEST
    net = Net(param, dtype=numpy.float32, rng=numpy.random.default_rng(0))
    data = net.blobs[net.inputs[0]]
    data.data[...] = numpy.random.default_rng(0).standard_normal(data.shape, dtype=numpy.float32)
    return net


def _kind(layer):
    plan = getattr(layer, "plan", None) or getattr(layer, "_plan", None)
    path = getattr(plan, "path", None)
    return f"{layer.type}:{path}" if path else layer.type


def time_brewnet(net, iterations, by_type):
    """Median forward seconds, the process's CPU seconds per forward (all its threads: time spent
    spinning shows here even when the wall time hides it among other load), and per layer type
    the mean milliseconds (when by_type)."""
    net.forward()
    times, per_type = [], defaultdict(float)
    cpu0 = time.process_time()
    for _ in range(iterations):
        t0 = time.perf_counter()
        if by_type:
            for i, layer in enumerate(net.layers):
                t1 = time.perf_counter()
                net.forward_from_to(i, i)
                per_type[_kind(layer)] += time.perf_counter() - t1
        else:
            net.forward()
        times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / iterations
    return statistics.median(times), cpu, {k: 1000 * v / iterations for k, v in per_type.items()}


def torch_googlenet(batch):
    """GoogLeNet-shaped net in PyTorch, as googlenet_like writes it."""
    import torch
    from torch import nn

    def conv(cin, cout, k, s=1, p=0):
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, p), nn.ReLU(inplace=True))

    class Inception(nn.Module):
        def __init__(self, cin, sizes):
            super().__init__()
            n1, r3, n3, r5, n5, pp = sizes
            self.b1 = conv(cin, n1, 1)
            self.b3 = nn.Sequential(conv(cin, r3, 1), conv(r3, n3, 3, p=1))
            self.b5 = nn.Sequential(conv(cin, r5, 1), conv(r5, n5, 5, p=2))
            self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), conv(cin, pp, 1))
            self.out = n1 + n3 + n5 + pp

        def forward(self, x):
            return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)

    mods = [conv(3, 64, 7, 2, 3), nn.MaxPool2d(3, 2, ceil_mode=True), nn.LocalResponseNorm(5, 1e-4, 0.75),
            conv(64, 64, 1), conv(64, 192, 3, p=1), nn.LocalResponseNorm(5, 1e-4, 0.75),
            nn.MaxPool2d(3, 2, ceil_mode=True)]
    channels = 192
    for item in googlenet_like.INCEPTION:
        if isinstance(item, str):
            mods.append(nn.MaxPool2d(3, 2, ceil_mode=True))
        else:
            block = Inception(channels, item[1])
            mods.append(block)
            channels = block.out
    mods += [nn.AvgPool2d(7, 1), nn.Flatten(), nn.Dropout(0.4), nn.Linear(channels, 1000), nn.Softmax(1)]
    return nn.Sequential(*mods).eval(), torch.randn(batch, 3, 224, 224)


def torch_worker(batch, iterations):
    import torch

    torch.set_num_threads(2)
    model, x = torch_googlenet(batch)
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_torch(batch, iterations):
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import contention_probe as p; "
            f"print(json.dumps(p.torch_worker({batch}, {iterations})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"PyTorch run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return float(proc.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--model", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Deploy prototxt (default: the GoogLeNet-shaped net at --batch).")
@click.option("--batch", default=8, show_default=True, help="Batch of the default net.")
@click.option("--contend", default=1, show_default=True, type=click.IntRange(min=1), help="Busy processes.")
@click.option("--iterations", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--by-type", is_flag=True, help="Per layer type milliseconds, quiet and busy.")
@click.option("--torch", "use_torch", is_flag=True, help="Also time the GoogLeNet-shaped net in PyTorch.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False))
def main(model, batch, contend, iterations, by_type, use_torch, json_out):
    """Quiet and contended forward times."""
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            model = os.path.join(tmp, "googlenet_like.prototxt")
            Path(model).write_text(googlenet_like.googlenet(batch))
        net = brewnet_net(model)
        result = {"model": model, "contend": contend, "load_average_start": _load()}
        quiet, quiet_cpu, quiet_types = time_brewnet(net, iterations, by_type)
        with benchmark.busy_processes(contend):
            busy, busy_cpu, busy_types = time_brewnet(net, iterations, by_type)
    result["brewnet"] = {"quiet_s": quiet, "busy_s": busy, "slowdown": busy / quiet,
                         "quiet_cpu_s": quiet_cpu, "busy_cpu_s": busy_cpu}
    click.echo(f"brewnet  quiet {quiet * 1000:8.1f} ms  with {contend} busy {busy * 1000:8.1f} ms  "
               f"slowdown {busy / quiet:5.2f}   CPU time per forward {quiet_cpu * 1000:.0f} / {busy_cpu * 1000:.0f} ms")
    if by_type:
        result["by_type_ms"] = {"quiet": quiet_types, "busy": busy_types}
        for kind in sorted(quiet_types, key=lambda k: -quiet_types[k]):
            q, b = quiet_types[kind], busy_types.get(kind, 0.0)
            if q >= 0.5:
                click.echo(f"  {kind:<24} {q:8.1f} ms {b:8.1f} ms  x{b / q:5.2f}")
    if use_torch:
        tq = time_torch(batch, iterations)
        with benchmark.busy_processes(contend):
            tb = time_torch(batch, iterations)
        result["pytorch"] = {"quiet_s": tq, "busy_s": tb, "slowdown": tb / tq}
        click.echo(f"PyTorch  quiet {tq * 1000:8.1f} ms  with {contend} busy {tb * 1000:8.1f} ms  "
                   f"slowdown {tb / tq:5.2f}")
    result["load_average_end"] = _load()
    click.echo(f"1-min load average {result['load_average_start']:.2f} -> {result['load_average_end']:.2f}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
