"""Fused chains of per-channel layers: BatchNorm -> Scale [-> ReLU | Clip], all in place on
one blob, as Caffe's ResNets, MobileNets and Inception-v3 write every convolution's tail.

Run layer by layer in training, the chain makes eight passes over the blob forward
(BatchNorm's statistics, its output and kept normalized copy, Scale's copy of its input and
its output, the activation) and nine backward; fused it makes three and four, in one compiled
kernel each (layers/kernels/channel_jit.py) whose arithmetic is the layers' own, step by step,
so the results are theirs. With stored statistics (TEST, or use_global_stats) BatchNorm is an
affine map: seven passes forward as layers, three fused (the input read, the kept Scale input
and the top written).

The Net runs a chain fused only when one call runs all of it with nothing watching in between
(no hooks, no debug_info) and the arrays suit the CPU kernels; otherwise the layers run. After
a fused forward each layer holds what its own backward needs, so a backward that stops inside
a chain still works. `brewnet time` times a chain as one unit (Net.run_units).

A Convolution followed by a ReLU in place on its top (GoogLeNet, SqueezeNet, VGG, ...) is a
lighter chain: the ReLU runs on each block of the convolution's output as the threads finish
it, in cache, instead of as a pass of its own; backward runs the two layers. A plain Eltwise
sum followed by a ReLU in place (ResNet's residual sums) is the same kind of chain.
``BREWNET_FUSE=0`` turns fusion off.
"""

import os

import numpy

from brewnet.layers.kernels import channel_ops


def enabled():
    return os.environ.get("BREWNET_FUSE", "1") != "0"


class ChannelChain:
    """Layers start..end of a net: BatchNorm, Scale and an optional activation on one blob."""

    def __init__(self, net, start, has_activation):
        self.net = net
        self.start = start
        self.end = start + (2 if has_activation else 1)
        self.bn, self.scale = net.layers[start], net.layers[start + 1]
        self.activation = net.layers[start + 2] if has_activation else None
        act = self.activation.fused_activation() if has_activation else (0, 0, 0)
        self.act_code, self.act_params = act[0], act[1:]
        self.blob = net.top_vecs[start][0]
        self.forward_fused = False
        self.unfused_ready = True

    def __repr__(self):
        names = [self.net.layer_names[i] for i in range(self.start, self.end + 1)]
        return f"<ChannelChain {' -> '.join(names)}>"

    def _reshape(self):
        net = self.net
        for i in range(self.start, self.end + 1):
            net.layers[i].reshape(net.bottom_vecs[i], net.top_vecs[i])

    def _operands(self, dtype):
        """(scale, bias, activation constants) as the kernels take them."""
        sc = self.scale
        scale = sc.blobs[0].data.reshape(-1)
        bias = (sc.blobs[sc.bias_index].data.reshape(-1) if sc.bias_index is not None
                else numpy.zeros(sc.dim, dtype=dtype))
        q = numpy.array([*self.act_params, 1, 0], dtype=dtype)
        return scale, bias, q

    def forward(self):
        """Run the chain's forward fused and return True, or return False (run the layers)."""
        self.forward_fused = False
        bn, sc = self.bn, self.scale
        self._reshape()
        if (sc.outer, sc.dim, sc.inner) != (bn.n, bn.channels, bn.spatial) or len(sc.blobs) == 0:
            return False
        data = self.blob.data
        x = data.reshape(bn.n, bn.channels, bn.spatial)
        # BatchNorm's output, which Scale reads: the normalized batch (batch statistics) or the
        # affine map of the stored ones, kept for backward in one buffer
        kept = bn.x_norm_buffer(x)
        scale, bias, q = self._operands(x.dtype)
        jit = channel_ops.kernels(bn.xp, x, kept, scale, bias)
        if jit is None:
            return False
        bias = bias.astype(x.dtype, copy=False)
        if bn.use_global_stats:
            inv, shift = bn.stored_affine(*bn.stored_statistics(), x.dtype)
            if channel_ops.kernels(bn.xp, inv, shift) is None:
                return False
            channel_ops.over_channels(jit.bn_scale_act_stored_forward, bn.channels, x.size, x, x, kept, inv, shift,
                                      scale, bias, self.act_code, q)
        else:
            mean = numpy.empty(bn.channels, dtype=x.dtype)
            var = numpy.empty(bn.channels, dtype=x.dtype)
            channel_ops.over_channels(jit.bn_scale_act_train_forward, bn.channels, x.size, x, x, kept, mean, var,
                                      bn.eps, scale, bias, self.act_code, q)
            bn.update_statistics(mean, var)
            bn.std = numpy.sqrt(var + bn.eps)
            bn.x_norm = kept
        self.kept = kept
        sc.x_saved = kept.reshape(data.shape)  # Scale's input was BatchNorm's output
        self.forward_fused = True
        self.unfused_ready = self.activation is None or self.act_code != 2
        return True

    def prepare_unfused_backward(self):
        """Give the layers what a fused forward did not: Clip's input (kept * scale + bias)."""
        if self.forward_fused and not self.unfused_ready:
            scale, bias, _ = self._operands(self.kept.dtype)
            z = self.kept * scale[None, :, None] + bias[None, :, None]
            self.activation.keep_input(z.reshape(self.blob.shape))
            self.unfused_ready = True

    def backward(self):
        """Run the chain's backward fused and return True, or return False (run the layers)."""
        net = self.net
        if not self.forward_fused:
            return False
        for i in range(self.start, self.end + 1):
            if not (net.layer_need_backward[i] and net.bottom_need_backward[i][0]):
                return False
        bn, sc = self.bn, self.scale
        diff = self.blob.diff
        dy = diff.reshape(bn.n, bn.channels, bn.spatial)
        scale, bias, q = self._operands(dy.dtype)
        std = bn.std.astype(dy.dtype, copy=False)
        jit = channel_ops.kernels(bn.xp, dy, self.kept, scale, bias, std)
        if jit is None:
            return False
        bias = bias.astype(dy.dtype, copy=False)
        d_scale = numpy.empty(bn.channels, dtype=dy.dtype)
        d_bias = numpy.empty(bn.channels, dtype=dy.dtype)
        if bn.use_global_stats:
            channel_ops.over_channels(jit.bn_scale_act_stored_backward, bn.channels, dy.size, dy, self.kept, dy,
                                      std, scale, bias, self.act_code, q, d_scale, d_bias)
        else:
            inv_std = (1 / bn.std).astype(dy.dtype)
            channel_ops.over_channels(jit.bn_scale_act_train_backward, bn.channels, dy.size, dy, self.kept, dy,
                                      inv_std, scale, bias, self.act_code, q, d_scale, d_bias)
        sc.add_param_diffs(net.bottom_vecs[self.start + 1], net.bottom_need_backward[self.start + 1],
                           d_scale, d_bias)
        return True


class ReLUEpilogueChain:
    """Layers start, start + 1 of a net: a Convolution or Eltwise and a ReLU in place on its
    top. Forward, the ReLU runs on each block of the first layer's output as the threads finish
    it, while it is in cache (one pass over the top fewer); backward, the layers run as they are."""

    # the layer types with a forward_with_epilogue
    PRODUCERS = ("Convolution", "Eltwise")

    def __init__(self, net, start):
        self.net = net
        self.start, self.end = start, start + 1
        self.producer, self.relu = net.layers[start], net.layers[start + 1]
        self.forward_fused = False

    def __repr__(self):
        return f"<ReLUEpilogueChain {self.net.layer_names[self.start]} -> {self.net.layer_names[self.end]}>"

    def forward(self):
        net, i = self.net, self.start
        bottom, top = net.bottom_vecs[i], net.top_vecs[i]
        self.producer.reshape(bottom, top)
        self.relu.reshape(net.bottom_vecs[i + 1], net.top_vecs[i + 1])
        self.forward_fused = type(top[0].data) is numpy.ndarray and self.producer.forward_with_epilogue(
            bottom, top, self.relu.epilogue())
        if not self.forward_fused:
            self.producer.forward(bottom, top)
            self.relu.forward(net.bottom_vecs[i + 1], net.top_vecs[i + 1])
        return True

    def backward(self):
        return False  # the ReLU's backward reads the top, the first layer's its diff: as layers

    def prepare_unfused_backward(self):
        pass


def find_chains(net, loss_layers):
    """{first layer index: chain} for every BatchNorm -> Scale [-> activation] run of
    consecutive layers in place on one blob, and every Convolution (one bottom) or Eltwise
    followed by a ReLU in place on its top, none of them in ``loss_layers`` (indices)."""
    chains = {}
    layers, types = net.layers, [layer.type for layer in net.layers]

    def in_place_on(i, blob):
        return (len(net.bottom_vecs[i]) == 1 and len(net.top_vecs[i]) == 1
                and net.bottom_vecs[i][0] is blob and net.top_vecs[i][0] is blob and i not in loss_layers)

    i = 0
    while i + 1 < len(layers):
        if (types[i] in ReLUEpilogueChain.PRODUCERS and types[i + 1] == "ReLU"
                and (len(net.bottom_vecs[i]) == 1 or types[i] == "Eltwise")
                and len(net.top_vecs[i]) == 1 and i not in loss_layers
                and in_place_on(i + 1, net.top_vecs[i][0]) and layers[i + 1].fused_activation() is not None):
            chains[i] = ReLUEpilogueChain(net, i)
            i += 2
            continue
        if types[i] == "BatchNorm" and types[i + 1] == "Scale":
            blob = net.top_vecs[i][0]
            if in_place_on(i, blob) and in_place_on(i + 1, blob):
                activation = layers[i + 2] if i + 2 < len(layers) else None
                fusable = getattr(activation, "fused_activation", None)
                has_act = bool(fusable and in_place_on(i + 2, blob) and fusable() is not None)
                chain = ChannelChain(net, i, has_act)
                chains[i] = chain
                i = chain.end + 1
                continue
        i += 1
    return chains
