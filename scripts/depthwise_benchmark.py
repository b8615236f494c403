#!/usr/bin/env python
"""CPU time of a depthwise convolution (group == channels) on brewnet's depthwise kernel and on
the im2col path it replaces, for three MobileNet-sized layers (batch 16, float32).

  BREWNET_THREADS=1 python scripts/depthwise_benchmark.py

Process CPU time (best of 7), not wall time: on a shared machine it is the steadier figure.
"""

import pathlib
import sys
import time

import numpy

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

LAYERS = [((16, 32, 112, 112), "num_output: 32 group: 32 kernel_size: 3 pad: 1"),
          ((16, 256, 28, 28), "num_output: 256 group: 256 kernel_size: 3 pad: 1 stride: 2"),
          ((16, 512, 14, 14), "num_output: 512 group: 512 kernel_size: 3 pad: 1")]


def best_times(shape, params, depthwise, reps=7):
    """(forward, backward) seconds of CPU time, the best of ``reps``."""
    from brewnet.layers.kernels.conv_plan import ConvPlan
    from brewnet.layers.gradcheck import make_layer, setup_layer

    ConvPlan.use_depthwise = depthwise
    layer = make_layer(f'name: "c" type: "Convolution" convolution_param {{ {params} '
                       'weight_filler { type: "gaussian" } }', dtype=numpy.float32)
    x = numpy.random.default_rng(0).random(shape, dtype=numpy.float32)
    bottom, top = setup_layer(layer, [x], dtype=numpy.float32)
    layer.forward(bottom, top)  # compiles and plans
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for i, step in enumerate((lambda: layer.forward(bottom, top), lambda: layer.backward(top, [True], bottom))):
            start = time.process_time()
            step()
            best[i] = min(best[i], time.process_time() - start)
    return best


def main():
    for shape, params in LAYERS:
        fast, slow = best_times(shape, params, True), best_times(shape, params, False)
        print(f"{'x'.join(map(str, shape))} {params}: depthwise forward {fast[0] * 1e3:.1f} ms, backward "
              f"{fast[1] * 1e3:.1f} ms; im2col forward {slow[0] * 1e3:.1f} ms, backward {slow[1] * 1e3:.1f} ms "
              f"({slow[0] / fast[0]:.2f}x, {slow[1] / fast[1]:.2f}x)")


if __name__ == "__main__":
    main()
