"""`brewnet export NET WEIGHTS OUT.onnx`: a deploy net and its weights as an ONNX model (opset 17)."""

import os
import sys

import click


def _fail(message):
    click.echo(f"brewnet: error: {message}", err=True)
    sys.exit(1)


def _shape(shape):
    return "(" + " ".join(d.dim_param or str(d.dim_value) for d in shape) + ")"


def _value_shapes(values):
    return ", ".join(f"{v.name} {_shape(v.type.tensor_type.shape.dim)}" for v in values)


@click.command("export")
@click.argument("net")
@click.argument("weights")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--level", default=0, show_default=True, help="NetState level.")
@click.option("--stage", multiple=True, help="NetState stage (repeatable).")
@click.option("--dynamic-batch", is_flag=True,
              help="Make the first axis of inputs and outputs a symbolic N instead of the prototxt's batch.")
@click.option("--check", is_flag=True,
              help="Run the exported model in onnxruntime on random inputs and print its largest difference "
                   "from brewnet's forward pass (needs onnxruntime).")
def export_cmd(net, weights, output, level, stage, dynamic_batch, check):
    """Export NET (a deploy prototxt or zoo:NAME, TEST phase) with WEIGHTS (.caffemodel, .h5 or zoo:NAME)
    to OUTPUT in ONNX (opset 17). A layer without an ONNX equivalent stops the export with its name."""
    from brewnet import onnx_export

    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        _fail(f"{output}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        _fail(f"{output}: folder {folder} is not writable")
    try:
        onnx_export.require(check=check)  # before the net is built: a missing package is said at once
        net_obj, missing = onnx_export.load_net_for_export(net, weights, level=level, stages=list(stage) or None)
        if missing:
            click.echo(f"brewnet: warning: {weights} has no weights for layer(s) {', '.join(missing)}: "
                       f"exported with their fillers' values", err=True)
        model, seconds = onnx_export.timed_export(net_obj, output, dynamic_batch=dynamic_batch)
        n_weights = sum(int(t.ByteSize()) for t in model.graph.initializer)
        click.echo(f"Wrote {output}: ONNX opset {onnx_export.OPSET}, {len(model.graph.node)} nodes, "
                   f"{n_weights / 2**20:.1f} MiB of weights, in {seconds:.2f} s")
        click.echo(f"  inputs:  {_value_shapes(model.graph.input)}")
        click.echo(f"  outputs: {_value_shapes(model.graph.output)}")
        if check:
            inputs = onnx_export.random_inputs(net_obj, batch=2 if dynamic_batch else None)
            for name, (diff, scale) in onnx_export.compare_with_onnxruntime(net_obj, output, inputs).items():
                click.echo(f"  check: {name}: max |onnxruntime - brewnet| = {diff:.3g} (outputs up to {scale:.3g})")
    except onnx_export.MissingPackageError as exc:
        _fail(str(exc))


COMMANDS = [export_cmd]
