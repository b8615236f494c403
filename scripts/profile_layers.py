#!/usr/bin/env python
"""Per-layer training profile of a benchmark net: wall time and CPU time of every layer's forward
and backward, and their sums by layer type. A fused chain (layers/fusion.py) is one row, typed
by its layers ("BatchNorm+Scale+ReLU"); BREWNET_FUSE=0 profiles the layers one by one.

On a machine shared with other work, wall time measures the machine's load as much as the code;
the CPU time this process spends (time.process_time) moves much less. With one thread
(BREWNET_THREADS=1 OPENBLAS_NUM_THREADS=1) the CPU time is the work itself, which is the figure
to compare two versions of the code by:

  BREWNET_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/profile_layers.py resnet50 --json-out runs/r50.json
  # the same profile of another checkout of brewnet (e.g. `git archive main | tar -x -C /tmp/base`):
  ... python scripts/profile_layers.py resnet50 --root /tmp/base

NET is a key of scripts/benchmark.py's NETS (its training net at the benchmark's batch, random
data), or a train prototxt with an Input "data" and "label". Not a test: nothing is checked.
"""

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(net_name, batch):
    import numpy

    import benchmark
    from brewnet.layers.net import Net
    from brewnet.netdef import caffe_pb2
    from brewnet import netdef

    if net_name in benchmark.NETS:
        spec = benchmark.NETS[net_name]
        param = benchmark.train_net_param(spec, batch or spec["batch"])
    else:
        param = netdef.read_net(net_name)
    net = Net(param, phase=caffe_pb2.TRAIN)
    benchmark.fill_random_inputs(net, numpy)
    return net


def profile(net, iterations, warmup):
    n = len(net.layers)
    # a fused chain (BatchNorm -> Scale -> activation) runs as one step: timed as one row
    units = net.run_units() if hasattr(net, "run_units") else [(i, i) for i in range(n)]
    wall = {"forward": [0.0] * n, "backward": [0.0] * n}
    cpu = {"forward": [0.0] * n, "backward": [0.0] * n}
    for it in range(warmup + iterations):
        for direction, order in (("forward", units), ("backward", units[::-1])):
            for first, last in order:
                w0, c0 = time.perf_counter(), time.process_time()
                if direction == "forward":
                    net.forward_from_to(first, last)
                else:
                    net.backward_from_to(last, first)
                if it >= warmup:
                    wall[direction][first] += time.perf_counter() - w0
                    cpu[direction][first] += time.process_time() - c0
    scale = 1000.0 / iterations
    rows = []
    for first, last in units:
        name = net.layer_names[first] + (f" .. {net.layer_names[last]}" if last > first else "")
        kind = "+".join(net.layers[i].type for i in range(first, last + 1))
        i = first
        rows.append(dict(layer=name, type=kind,
                         wall_fwd_ms=wall["forward"][i] * scale, wall_bwd_ms=wall["backward"][i] * scale,
                         cpu_fwd_ms=cpu["forward"][i] * scale, cpu_bwd_ms=cpu["backward"][i] * scale))
    return rows


def by_type(rows):
    agg = collections.OrderedDict()
    for r in sorted(rows, key=lambda r: -(r["cpu_fwd_ms"] + r["cpu_bwd_ms"])):
        a = agg.setdefault(r["type"], dict(type=r["type"], layers=0, wall_fwd_ms=0.0, wall_bwd_ms=0.0,
                                           cpu_fwd_ms=0.0, cpu_bwd_ms=0.0))
        a["layers"] += 1
        for k in ("wall_fwd_ms", "wall_bwd_ms", "cpu_fwd_ms", "cpu_bwd_ms"):
            a[k] += r[k]
    return sorted(agg.values(), key=lambda a: -(a["cpu_fwd_ms"] + a["cpu_bwd_ms"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("net")
    ap.add_argument("--batch", type=int, default=None, help="default: the benchmark's batch")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--root", default=str(HERE.parent), help="the brewnet checkout to profile")
    ap.add_argument("--layers", action="store_true", help="print every layer, not only the sums by type")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    # the checkout's packages first, then this folder's benchmark.py (its net table)
    sys.path[:0] = [str(Path(args.root).resolve()), str(HERE)]
    os.chdir(HERE.parent)
    import brewnet.layers.families  # noqa: F401

    net = build(args.net, args.batch)
    load = os.getloadavg()
    rows = profile(net, args.iterations, args.warmup)
    types = by_type(rows)
    total = {k: sum(r[k] for r in rows) for k in ("wall_fwd_ms", "wall_bwd_ms", "cpu_fwd_ms", "cpu_bwd_ms")}
    head = f"{'':<28} {'wall fwd':>9} {'wall bwd':>9} {'cpu fwd':>9} {'cpu bwd':>9}  (ms per iteration)"
    print(f"{args.net}: batch {net.blobs['data'].shape[0]}, {args.iterations} iterations, "
          f"threads {os.environ.get('BREWNET_THREADS', 'default')}, load average {load[0]:.2f}, "
          f"brewnet from {args.root}")
    print(head)
    listing = rows if args.layers else []
    for r in listing + [dict(r, layer=f"[{r['type']} x{r['layers']}]") for r in types]:
        print(f"{r['layer'][:28]:<28} {r['wall_fwd_ms']:9.1f} {r['wall_bwd_ms']:9.1f} "
              f"{r['cpu_fwd_ms']:9.1f} {r['cpu_bwd_ms']:9.1f}")
    print(f"{'total':<28} {total['wall_fwd_ms']:9.1f} {total['wall_bwd_ms']:9.1f} "
          f"{total['cpu_fwd_ms']:9.1f} {total['cpu_bwd_ms']:9.1f}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(dict(net=args.net, load_average=load, root=args.root,
                                                       threads=os.environ.get("BREWNET_THREADS"), layers=rows,
                                                       types=types, total=total), indent=1))


if __name__ == "__main__":
    main()
