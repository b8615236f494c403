"""Caffe's learnable utility layers: InnerProduct (fully connected) and Embed."""

import numpy

from brewnet.layers.base import Layer
from brewnet.layers.families.axes import canonical_axis, int_indices
from brewnet.layers.fillers import fill
from brewnet.layers.kernels import parallel
from brewnet.layers.kernels.blas import matmul_acc
from brewnet.layers.registry import register


@register("InnerProduct", v1="INNER_PRODUCT")
class InnerProduct(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        p = self.param.inner_product_param
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise self.error("inner_product_param.num_output must be positive")
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        self.axis = canonical_axis(self, bottom[0], p.axis)
        self.k = bottom[0].count_range(self.axis)
        if not self.blobs:
            n, k = self.num_output, self.k
            weight = self.make_blob((k, n) if self.transpose else (n, k))
            self.blobs.append(weight)
            fill(weight, p.weight_filler, self.rng)
            if self.bias_term:
                bias = self.make_blob((n,))
                self.blobs.append(bias)
                fill(bias, p.bias_filler, self.rng)

    def reshape(self, bottom, top):
        axis = canonical_axis(self, bottom[0], self.param.inner_product_param.axis)
        k = bottom[0].count_range(axis)
        if k != self.k:
            raise self.error(f"input size {k} (shape {bottom[0].shape} from axis {axis}) "
                                    f"does not match the weights' input size {self.k}")
        self.axis = axis
        self.m = bottom[0].count_range(0, axis)
        top[0].reshape(bottom[0].shape[:axis] + (self.num_output,))

    def _weight_nk(self):
        # weights viewed as (N, K) whatever the stored layout
        w = self.blobs[0].data
        return w.T if self.transpose else w

    # below this many multiply-adds a GEMM is cheaper than handing out jobs
    parallel_min_macs = 1 << 21

    def _split(self, fn, size):
        """fn(start, stop) over 0..size in blocks across the CPU threads (one when the layer is small)."""
        big = self.m * self.k * self.num_output >= self.parallel_min_macs
        parallel.over_ranges(fn, size, self.xp, big, per_thread=2)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.m, self.k)
        out = top[0].data.reshape(self.m, self.num_output)
        w = self._weight_nk()
        # output features split across threads: each reads its own rows of the weights once
        def block(a, b):
            if self.xp is numpy and b - a >= 64:
                # computed as (features, samples): OpenBLAS streams the weights 1.2-1.4x faster
                # into that shape than into (samples, features) when the batch is small
                out[:, a:b] = self.xp.matmul(w[a:b], x.T).T
            else:
                self.xp.matmul(x, w[a:b].T, out=out[:, a:b])
            if self.bias_term:
                out[:, a:b] += self.blobs[1].data[a:b]

        self._split(block, self.num_output)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.m, self.num_output)
        x = bottom[0].data.reshape(self.m, self.k)
        if self.param_needs_grad(0):
            # accumulate straight into the diff (a weight-sized temporary costs more than the GEMM),
            # or write it there where the diff was just cleared; threads take row blocks of the weight
            diff, zero = self.blobs[0].diff_to_overwrite()

            def weight_block(a, b):
                lhs, rhs = (x[:, a:b].T, dy) if self.transpose else (dy[:, a:b].T, x)
                if zero:
                    self.xp.matmul(lhs, rhs, out=diff[a:b])
                else:
                    matmul_acc(lhs, rhs, diff[a:b])

            self._split(weight_block, diff.shape[0])
        if self.bias_term and self.param_needs_grad(1):
            self.blobs[1].diff += dy.sum(axis=0)
        if propagate_down[0]:
            dx = bottom[0].diff.reshape(self.m, self.k)
            w = self._weight_nk()

            def input_block(a, b):
                if self.xp is numpy:
                    # as (inputs, samples), like forward: a thread's column block of the weight
                    # streams about 1.25x faster that way at CaffeNet's batch of 10
                    self.xp.matmul(w[:, a:b].T, dy.T, out=dx[:, a:b].T)
                else:
                    self.xp.matmul(dy, w[:, a:b], out=dx[:, a:b])

            self._split(input_block, self.k)


@register("Embed")
class Embed(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def allow_force_backward(self, bottom_index):
        return False  # the bottom holds indices

    def setup(self, bottom, top):
        p = self.param.embed_param
        self.num_output = int(p.num_output)
        self.input_dim = int(p.input_dim)
        if self.num_output <= 0:
            raise self.error("embed_param.num_output must be positive")
        if self.input_dim <= 0:
            raise self.error("embed_param.input_dim must be positive")
        self.bias_term = p.bias_term
        if not self.blobs:
            weight = self.make_blob((self.input_dim, self.num_output))
            self.blobs.append(weight)
            fill(weight, p.weight_filler, self.rng)
            if self.bias_term:
                bias = self.make_blob((self.num_output,))
                self.blobs.append(bias)
                fill(bias, p.bias_filler, self.rng)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def forward(self, bottom, top):
        self.index = int_indices(self, bottom[0].data.reshape(-1), self.input_dim, "embed index")
        out = top[0].data.reshape(-1, self.num_output)
        out[...] = self.blobs[0].data[self.index]
        if self.bias_term:
            out += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(-1, self.num_output)
        if self.param_needs_grad(0):
            w = self.blobs[0]
            self.xp.add.at(w.diff, self.index, dy)
        if self.bias_term and self.param_needs_grad(1):
            self.blobs[1].diff += dy.sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = 0  # indices have no gradient
