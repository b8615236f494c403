"""`brewnet time`: benchmark a net layer by layer, like `caffe time`."""

import time

import click

from brewnet.netdef import caffe_pb2


def _batch_size(net):
    """First dimension of the net's first input (or of the first layer's first top)."""
    blobs = net.input_blobs or (net.top_vecs[0] if net.top_vecs else [])
    for blob in blobs:
        if blob.shape:
            return int(blob.shape[0])
    return 1


@click.command("time")
@click.option("--model", required=True, type=click.Path(dir_okay=False), help="The net prototxt to time.")
@click.option("--iterations", default=50, show_default=True, type=click.IntRange(min=1),
              help="Forward+backward passes to average over.")
@click.option("--phase", type=click.Choice(["train", "test"], case_sensitive=False), default="train",
              show_default=True, help="Net phase (caffe time uses TRAIN).")
@click.option("--level", default=0, show_default=True, help="NetState level.")
@click.option("--stage", multiple=True, help="NetState stage (repeatable).")
@click.option("--weights", default=None, help="Optional weights (.caffemodel, .h5 or zoo:NAME).")
@click.option("--gpu", default=None, type=int, help="Run on this GPU (needs cupy).")
def time_cmd(model, iterations, phase, level, stage, weights, gpu):
    """Average per-layer forward/backward time over ITERATIONS passes."""
    from brewnet.layers.kernels import backend
    from brewnet.layers.net import Net

    if gpu is not None:
        backend.set_mode_gpu()
        backend.set_device(gpu)
    else:
        backend.set_mode_cpu()
    from brewnet import netdef
    from brewnet.api import resolve_model, resolve_weights

    source = str(resolve_model(model))
    net_param = netdef.read_net(source)
    phase_value = caffe_pb2.TRAIN if phase.lower() == "train" else caffe_pb2.TEST
    net = Net(net_param, phase=phase_value, level=level, stages=list(stage) or None, source=source)
    if not any(net.layer_need_backward):
        # a deploy net has no loss: time the backward a training net would run
        net_param.force_backward = True
        net = Net(net_param, phase=phase_value, level=level, stages=list(stage) or None, source=source)
    if weights:
        net.copy_trained_layers_from(str(resolve_weights(weights)))

    # one untimed pass so allocations and lazy buffers are out of the way
    loss = net.forward()
    net.backward()
    net.synchronize()
    click.echo(f"Initial loss: {loss:g}")

    start = time.perf_counter()
    fwd, bwd = net.time_layers(iterations)
    total_ms = (time.perf_counter() - start) * 1000.0 / iterations

    name_w = max([len("layer")] + [len(n) for n in net.layer_names])
    type_w = max([len("type")] + [len(layer.type or "") for layer in net.layers])
    click.echo(f"Average time per layer over {iterations} iteration(s) "
               f"({'GPU %d' % gpu if gpu is not None else 'CPU'}):")
    click.echo(f"{'layer':<{name_w}}  {'type':<{type_w}}  {'forward ms':>11}  {'backward ms':>11}")
    fused = {}
    for first, last in net.run_units():
        for i in range(first, last + 1):
            if i == first:
                fused[i] = f"  (and the next {last - first}: run fused)" if last > first else ""
            else:
                fused[i] = f"  (timed in {net.layer_names[first]})"
    for i, (name, layer, f, b) in enumerate(zip(net.layer_names, net.layers, fwd, bwd)):
        click.echo(f"{name:<{name_w}}  {layer.type or '':<{type_w}}  {f:>11.4f}  {b:>11.4f}{fused[i]}")
    forward_ms, backward_ms = sum(fwd), sum(bwd)
    batch = _batch_size(net)
    click.echo(f"Average Forward pass: {forward_ms:.4f} ms.")
    click.echo(f"Average Backward pass: {backward_ms:.4f} ms.")
    click.echo(f"Average Forward-Backward: {total_ms:.4f} ms.")
    click.echo(f"Total Time: {total_ms * iterations:.4f} ms.")
    rate = batch * 1000.0 / total_ms if total_ms > 0 else float("inf")
    click.echo(f"Throughput: {rate:.1f} images/s (batch {batch})")


COMMANDS = [time_cmd]
