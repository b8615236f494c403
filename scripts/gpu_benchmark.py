#!/usr/bin/env python
"""GPU training throughput: brewnet on cupy next to PyTorch CUDA, same nets, same run.

Nets: LeNet (batch 64), CIFAR-10-quick (batch 100), CaffeNet (batch 128, or less with
--caffenet-batch). Training = forward + backward + SGD update (momentum 0.9, weight decay
5e-4): brewnet's SGD solver on the deploy prototxt turned into a train net (Input data and
label, SoftmaxWithLoss), and torch.optim.SGD on the same layers in torch.nn. Both run in
float32 with TF32 off (cupy does not use TF32; PyTorch's cuDNN would by default), on
random inputs. The device is synchronized before every timer read. Prints images/s and
the ratio brewnet/PyTorch (the issue's target: >= 0.5 on CIFAR-10-quick and CaffeNet).

  python scripts/gpu_benchmark.py                    # all three nets
  python scripts/gpu_benchmark.py --nets lenet --seconds 2 --json out.json

Without cupy or a CUDA device it exits with one line saying so (status 2).
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's packages, whatever is installed

# the net translation and training set-up are the CPU benchmark's (scripts/ is on the path when run)
from benchmark import deploy_to_train, fill_random_inputs, sgd_solver_param, torch_training_step  # noqa: E402

NETS = {
    "lenet": dict(deploy="configs/lenet/lenet_deploy.prototxt", batch=64),
    "cifar10_quick": dict(deploy="configs/cifar10_quick/cifar10_quick_deploy.prototxt", batch=100),
    "caffenet": dict(deploy="configs/caffenet/caffenet_deploy.prototxt", batch=128),
}
TARGET = {"cifar10_quick": 0.5, "caffenet": 0.5}


def _conv(name, bottom, n, k, s=1, p=0, g=1):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" convolution_param {{ '
            f'num_output: {n} kernel_size: {k} stride: {s} pad: {p} group: {g} '
            f'weight_filler {{ type: "gaussian" std: 0.01 }} }} }}\n'
            f'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')


def _pool(name, bottom):
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" '
            f'pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}\n')


def _lrn(name, bottom):
    return (f'layer {{ name: "{name}" type: "LRN" bottom: "{bottom}" top: "{name}" '
            f'lrn_param {{ local_size: 5 alpha: 0.0001 beta: 0.75 }} }}\n')


def _fc(name, bottom, n, relu=True, drop=True):
    text = (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
            f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" std: 0.005 }} }} }}\n')
    if relu:
        text += f'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
    if drop:
        text += (f'layer {{ name: "drop_{name}" type: "Dropout" bottom: "{name}" top: "{name}" '
                 f'dropout_param {{ dropout_ratio: 0.5 }} }}\n')
    return text


def caffenet_text(batch):
    """CaffeNet's layer stack, used when configs/caffenet is not in this checkout."""
    return ('name: "CaffeNet"\n'
            f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {batch} dim: 3 '
            f'dim: 227 dim: 227 }} }} }}\n'
            + _conv("conv1", "data", 96, 11, s=4) + _pool("pool1", "conv1") + _lrn("norm1", "pool1")
            + _conv("conv2", "norm1", 256, 5, p=2, g=2) + _pool("pool2", "conv2") + _lrn("norm2", "pool2")
            + _conv("conv3", "norm2", 384, 3, p=1) + _conv("conv4", "conv3", 384, 3, p=1, g=2)
            + _conv("conv5", "conv4", 256, 3, p=1, g=2) + _pool("pool5", "conv5")
            + _fc("fc6", "pool5", 4096) + _fc("fc7", "fc6", 4096) + _fc("fc8", "fc7", 1000, relu=False, drop=False)
            + 'layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }\n')


def train_net_param(net, batch):
    """The deploy net as a TRAIN net: Input (data, label) of ``batch`` and SoftmaxWithLoss."""
    from brewnet import netdef

    path = ROOT / NETS[net]["deploy"]
    if path.is_file():
        return deploy_to_train(netdef.read_net(str(path)), batch, NETS[net]["deploy"])
    if net == "caffenet":
        return deploy_to_train(netdef.parse_net(caffenet_text(batch), path="<caffenet>"), batch, "<caffenet>")
    raise SystemExit(f"gpu_benchmark: {path} is missing")


def _timed(step, sync, warmup, seconds, min_iters):
    for _ in range(warmup):
        step()
    sync()
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < seconds:
        step()
        iters += 1
        if iters % 5 == 0 or iters >= min_iters:
            sync()  # timers are read only after the queued work is done
    sync()
    return iters, time.perf_counter() - start


def bench_brewnet(cupy, net, batch, seconds):
    from brewnet import solver as solver_pkg
    from brewnet.layers.kernels import backend

    backend.set_mode_gpu()
    s = solver_pkg.get_solver(sgd_solver_param(train_net_param(net, batch)), xp=cupy)
    fill_random_inputs(s.net, cupy)
    iters, elapsed = _timed(lambda: s.step(1), cupy.cuda.Device().synchronize, 3, seconds, 5)
    return dict(images_per_s=batch * iters / elapsed, iters=iters, loss=float(s.net.blobs["loss"].data))


def bench_torch(net, batch, seconds, device="cuda"):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    step, last = torch_training_step(train_net_param(net, batch), device, who="gpu_benchmark")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    iters, elapsed = _timed(step, sync, 3, seconds, 5)
    return dict(images_per_s=batch * iters / elapsed, iters=iters, loss=float(last["loss"].detach()))


def _gpu_or_exit():
    try:
        import cupy
    except ImportError as exc:
        print(f"gpu_benchmark: needs cupy and a CUDA device: pip install 'brewnet[gpu]' (cupy: {exc})",
              file=sys.stderr)
        sys.exit(2)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver or device
        count, why = 0, str(exc)
    else:
        why = "no CUDA device"
    if count < 1:
        print(f"gpu_benchmark: needs a CUDA device; cupy {cupy.__version__} sees none ({why})", file=sys.stderr)
        sys.exit(2)
    return cupy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", default="lenet,cifar10_quick,caffenet", help="comma-separated: " + ", ".join(NETS))
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per net and framework")
    ap.add_argument("--caffenet-batch", type=int, default=128)
    ap.add_argument("--no-torch", action="store_true", help="brewnet only")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in nets if n not in NETS]
    if unknown:
        ap.error(f"unknown net(s) {', '.join(unknown)}; known: {', '.join(NETS)}")
    cupy = _gpu_or_exit()
    logging.disable(logging.INFO)  # no solver log lines inside the timing
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    torch_ok = not args.no_torch
    if torch_ok:
        try:
            import torch

            torch_ok = torch.cuda.is_available()
            torch_version = torch.__version__
        except ImportError:
            torch_ok = False
        if not torch_ok:
            print("gpu_benchmark: PyTorch with CUDA is not available here: brewnet figures only", file=sys.stderr)
    results = {"gpu": gpu, "cupy": cupy.__version__, "torch": torch_version if torch_ok else None, "nets": {}}
    print(f"GPU: {gpu}; cupy {cupy.__version__}" + (f"; torch {torch_version}" if torch_ok else ""))
    print(f"{'net':<14} {'batch':>5} {'brewnet img/s':>14} {'pytorch img/s':>14} {'ratio':>6}  target")
    failed = False
    for net in nets:
        batch = args.caffenet_batch if net == "caffenet" else NETS[net]["batch"]
        row = {"batch": batch}
        try:
            row["brewnet"] = bench_brewnet(cupy, net, batch, args.seconds)
        except Exception as exc:  # report and go on to the next net
            row["brewnet_error"] = f"{type(exc).__name__}: {exc}"
            failed = True
        cupy.get_default_memory_pool().free_all_blocks()
        if torch_ok:
            try:
                row["pytorch"] = bench_torch(net, batch, args.seconds)
            except Exception as exc:
                row["pytorch_error"] = f"{type(exc).__name__}: {exc}"
            torch.cuda.empty_cache()
        ours = row.get("brewnet", {}).get("images_per_s")
        theirs = row.get("pytorch", {}).get("images_per_s")
        ratio = ours / theirs if ours and theirs else None
        row["ratio"] = ratio
        target = TARGET.get(net)
        verdict = "" if target is None or ratio is None else ("ok" if ratio >= target else f"BELOW {target}")
        print(f"{net:<14} {batch:>5} {ours or float('nan'):>14.1f} {theirs or float('nan'):>14.1f} "
              f"{ratio if ratio is not None else float('nan'):>6.2f}  {verdict}")
        for key in ("brewnet_error", "pytorch_error"):
            if key in row:
                print(f"  {key}: {row[key]}")
        results["nets"][net] = row
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
