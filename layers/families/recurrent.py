"""Recurrent layers: RNN, LSTM and LSTMUnit, with Caffe's semantics.

Caffe builds an unrolled internal net for RNN/LSTM; here the same math runs
directly: all input projections in one matrix product, then a loop over the
T time steps (each step vectorized over streams and features), and full
backpropagation through time in reverse.

Caffe conventions kept:
- bottoms x (T, N, ...), cont (T, N), optional x_static (N, ...), then with
  recurrent_param.expose_hidden the initial states h_0 [, c_0] (1, N, num_output);
  tops: the sequence output (T, N, num_output), then h_T [, c_T] when exposed.
- h_{t-1} enters step t multiplied by cont_t (0 starts a new sequence); the LSTM
  forget gate is multiplied by cont_t too.
- without expose_hidden the state carries over between forward calls: h_0 (and
  c_0) of a call are h_T (and c_T) of the previous one (zeros at first).
- learnable blobs, Caffe's order: LSTM W_xc (4H, D), b_c (4H), [W_xc_static
  (4H, S)], W_hc (4H, H); RNN W_xh (H, D), b_h (H), [W_xh_static (H, S)],
  W_hh (H, H), W_ho (H, H), b_o (H). LSTM gates inside 4H: i, f, o, g.

One deliberate difference: Caffe never backpropagates through the blobs that
expose_hidden adds (it shares their data but not their diffs, so h_0/c_0 get no
gradient and the h_T/c_T top diffs are ignored). Here they take part in the
gradient like any other blob. Without expose_hidden the results are identical.
"""

import numpy

from brewnet.layers.base import Layer
from brewnet.layers.fillers import fill
from brewnet.layers.kernels.backend import to_numpy
from brewnet.layers.registry import register


def _sigmoid(xp, a):
    # tanh form: no overflow warnings for large |a|, same values as 1/(1+exp(-a))
    return xp.tanh(a * 0.5) * 0.5 + 0.5


def _lstm_activate(xp, gate_input, cont, hidden):
    """Gate activations (N, 4H) from pre-activations: sigmoid for i, f, o; tanh for g.

    As in Caffe's LSTMUnit the forget gate is scaled by cont (f = cont * sigmoid).
    """
    acts = xp.empty_like(gate_input)
    acts[:, : 3 * hidden] = _sigmoid(xp, gate_input[:, : 3 * hidden])
    acts[:, 3 * hidden :] = xp.tanh(gate_input[:, 3 * hidden :])
    acts[:, hidden : 2 * hidden] *= cont[:, None]
    return acts


def _lstm_cell(acts, c_prev, hidden, xp):
    """c_t = f * c_{t-1} + i * g, tanh(c_t), h_t = o * tanh(c_t)."""
    i, f, o, g = (acts[:, k * hidden : (k + 1) * hidden] for k in range(4))
    c = f * c_prev + i * g
    tanh_c = xp.tanh(c)
    return c, tanh_c, o * tanh_c


def _lstm_cell_backward(acts, c_prev, tanh_c, dc, dh, out, hidden):
    """Write d(gate pre-activations) into ``out`` (N, 4H); return d c_prev.

    dc, dh: gradients reaching c_t and h_t. Uses f*(1-f) with the cont-scaled f,
    exactly as Caffe's LSTMUnit does (the true derivative when cont is 0 or 1).
    """
    i, f, o, g = (acts[:, k * hidden : (k + 1) * hidden] for k in range(4))
    dc_total = dc + dh * o * (1 - tanh_c * tanh_c)
    out[:, :hidden] = dc_total * g * i * (1 - i)
    out[:, hidden : 2 * hidden] = dc_total * c_prev * f * (1 - f)
    out[:, 2 * hidden : 3 * hidden] = dh * tanh_c * o * (1 - o)
    out[:, 3 * hidden :] = dc_total * i * (1 - g * g)
    return dc_total * f


class _Recurrent(Layer):
    """What RNN and LSTM share: bottoms/tops layout, input projections, state carry-over."""

    n_states = 1  # recurrent state blobs: h (RNN) or h, c (LSTM)
    gate_mult = 1  # rows of the input projections per output unit

    def __init__(self, param, *args, **kwargs):
        super().__init__(param, *args, **kwargs)
        rp = param.recurrent_param
        self.num_output = int(rp.num_output)
        self.expose_hidden = bool(rp.expose_hidden)
        exposed = self.n_states if self.expose_hidden else 0
        # per-instance blob counts (they depend on expose_hidden), as Caffe's MinBottomBlobs etc.
        self.min_bottoms = 2 + exposed
        self.max_bottoms = 3 + exposed
        self.exact_tops = 1 + exposed
        self._state = None  # (h_T, c_T...) of the last forward, each (N, H)

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1  # never to the sequence indicators

    # -- exact resume: the state carried to the next forward -----------------------
    def resume_state(self):
        if self.expose_hidden or self._state is None:
            return None  # exposed states arrive through the bottoms
        return {"state": [to_numpy(a).tolist() for a in self._state]}

    def restore_resume_state(self, state):
        if self.expose_hidden or not state:
            return
        arrays = [numpy.asarray(a, dtype=self.dtype) for a in state["state"]]
        if len(arrays) != self.n_states or any(a.ndim != 2 or a.shape[1] != self.num_output for a in arrays):
            raise self.error(f"saved recurrent state has shapes {[a.shape for a in arrays]}, expected "
                       f"{self.n_states} of (N, {self.num_output})")
        self._state = tuple(self.xp.asarray(a) for a in arrays)

    # -- shapes and parameters ----------------------------------------------
    def _param_shapes(self, input_dim, static_dim):
        h, g = self.num_output, self.num_output * self.gate_mult
        shapes = [("weight", (g, input_dim)), ("bias", (g,))]
        if self.static_input:
            shapes.append(("weight", (g, static_dim)))
        shapes.append(("weight", (g, h)))
        return shapes

    def setup(self, bottom, top):
        if self.num_output <= 0:
            raise self.error("recurrent_param.num_output must be positive")
        if bottom[0].num_axes < 2:
            raise self.error(f"bottom[0] must have at least 2 axes (T, N, ...), got shape {bottom[0].shape}")
        exposed = self.n_states if self.expose_hidden else 0
        self.static_input = len(bottom) > 2 + exposed
        self.i_static = 2 if self.static_input else None
        self.i_hidden = 2 + int(self.static_input)  # first exposed-state bottom
        self.i_rec = 2 + int(self.static_input)  # first recurrent weight blob
        input_dim = bottom[0].count_range(2)
        static_dim = bottom[2].count_range(1) if self.static_input else 0
        shapes = self._param_shapes(input_dim, static_dim)
        rp = self.param.recurrent_param
        if not self.blobs:
            for kind, shape in shapes:
                blob = self.make_blob(shape)
                fill(blob, rp.weight_filler if kind == "weight" else rp.bias_filler, self.rng)
                self.blobs.append(blob)
        else:
            if len(self.blobs) != len(shapes):
                raise self.error(f"expected {len(shapes)} parameter blobs, got {len(self.blobs)}")
            for k, ((_, shape), blob) in enumerate(zip(shapes, self.blobs)):
                if blob.shape != shape:
                    raise self.error(f"parameter blob {k} has shape {blob.shape}, expected {shape}")

    def reshape(self, bottom, top):
        x, cont = bottom[0], bottom[1]
        if x.num_axes < 2:
            raise self.error(f"bottom[0] must have at least 2 axes (T, N, ...), got shape {x.shape}")
        T, N = x.shape[:2]
        if cont.shape != (T, N):
            raise self.error(f"cont (bottom[1]) must have shape (T, N) = {(T, N)}, got {cont.shape}")
        if x.count_range(2) != self.blobs[0].shape[1]:
            raise self.error(f"input has {x.count_range(2)} features per step, weights expect {self.blobs[0].shape[1]}")
        if self.static_input:
            xs = bottom[2]
            if xs.num_axes < 1 or xs.shape[0] != N:
                raise self.error(f"x_static (bottom[2]) must have shape (N, ...) with N = {N}, got {xs.shape}")
            if xs.count_range(1) != self.blobs[2].shape[1]:
                raise self.error(f"x_static has {xs.count_range(1)} features, weights expect {self.blobs[2].shape[1]}")
        H = self.num_output
        if self.expose_hidden:
            for j in range(self.n_states):
                b = bottom[self.i_hidden + j]
                if b.shape != (1, N, H):
                    raise self.error(f"bottom[{self.i_hidden + j}] (initial state) must have shape {(1, N, H)}, got {b.shape}")
        top[0].reshape(T, N, H)
        for j in range(1, len(top)):
            top[j].reshape(1, N, H)
        if self._state is None or self._state[0].shape != (N, H):
            # a new stream count: the carried-over state cannot be reused
            self._state = tuple(self.xp.zeros((N, H), dtype=self.dtype) for _ in range(self.n_states))

    # -- pieces shared by forward/backward -----------------------------------
    def _initial_state(self, bottom):
        if self.expose_hidden:
            return tuple(bottom[self.i_hidden + j].data[0] for j in range(self.n_states))
        return self._state

    def _project_inputs(self, bottom):
        """W_x x_t + b for all steps at once, plus W_static x_static: (T, N, G)."""
        x = bottom[0].data
        T, N = x.shape[:2]
        pre = x.reshape(T * N, -1) @ self.blobs[0].data.T
        pre += self.blobs[1].data
        pre = pre.reshape(T, N, -1)
        if self.static_input:
            xs = bottom[2].data.reshape(N, -1)
            pre += (xs @ self.blobs[2].data.T)[None]
        return pre

    def _backprop_inputs(self, d_pre, h_conted, bottom, propagate_down):
        """Gradients of the input projections and the recurrent weight from d_pre (T, N, G)."""
        T, N, G = d_pre.shape
        flat = d_pre.reshape(T * N, G)
        x = bottom[0].data.reshape(T * N, -1)
        if self.param_needs_grad(0):
            self.blobs[0].diff += flat.T @ x
        if self.param_needs_grad(1):
            self.blobs[1].diff += flat.sum(axis=0)
        if self.param_needs_grad(self.i_rec):
            self.blobs[self.i_rec].diff += flat.T @ h_conted.reshape(T * N, -1)
        if propagate_down[0]:
            bottom[0].diff[...] = (flat @ self.blobs[0].data).reshape(bottom[0].shape)
        if self.static_input:
            d_static = d_pre.sum(axis=0)  # x_static feeds every step
            if self.param_needs_grad(2):
                self.blobs[2].diff += d_static.T @ bottom[2].data.reshape(N, -1)
            if propagate_down[2]:
                bottom[2].diff[...] = (d_static @ self.blobs[2].data).reshape(bottom[2].shape)

    def _exposed_top_diffs(self, top):
        if not self.expose_hidden:
            return None
        return tuple(top[1 + j].diff[0] for j in range(self.n_states))

    def _write_initial_state_diffs(self, diffs, propagate_down, bottom):
        if not self.expose_hidden:
            return
        for j, d in enumerate(diffs):
            i = self.i_hidden + j
            if propagate_down[i]:
                bottom[i].diff[0] = d


@register("LSTM")
class LSTM(_Recurrent):
    n_states = 2
    gate_mult = 4

    def forward(self, bottom, top):
        xp, H = self.xp, self.num_output
        pre = self._project_inputs(bottom)
        T, N = pre.shape[:2]
        cont = bottom[1].data
        W_hc = self.blobs[self.i_rec].data
        h_prev, c_prev = self._initial_state(bottom)
        # saved for backward
        self._acts = xp.empty((T, N, 4 * H), dtype=self.dtype)
        self._c = xp.empty((T + 1, N, H), dtype=self.dtype)
        self._tanh_c = xp.empty((T, N, H), dtype=self.dtype)
        self._h_conted = xp.empty((T, N, H), dtype=self.dtype)
        self._c[0] = c_prev
        out = top[0].data
        for t in range(T):
            h_conted = h_prev * cont[t][:, None]
            self._h_conted[t] = h_conted
            acts = _lstm_activate(xp, pre[t] + h_conted @ W_hc.T, cont[t], H)
            self._acts[t] = acts
            c, tanh_c, h = _lstm_cell(acts, self._c[t], H, xp)
            self._c[t + 1] = c
            self._tanh_c[t] = tanh_c
            out[t] = h
            h_prev = out[t]
        self._state = (out[T - 1].copy(), self._c[T].copy())
        if self.expose_hidden:
            top[1].data[0] = self._state[0]
            top[2].data[0] = self._state[1]

    def backward(self, top, propagate_down, bottom):
        xp, H = self.xp, self.num_output
        T, N = top[0].shape[:2]
        cont = bottom[1].data
        W_hc = self.blobs[self.i_rec].data
        top_diff = top[0].diff
        exposed = self._exposed_top_diffs(top)
        if exposed is None:
            dh_next = xp.zeros((N, H), dtype=self.dtype)
            dc_next = xp.zeros((N, H), dtype=self.dtype)
        else:
            dh_next, dc_next = exposed[0].copy(), exposed[1].copy()
        d_pre = xp.empty((T, N, 4 * H), dtype=self.dtype)
        for t in range(T - 1, -1, -1):
            dh = top_diff[t] + dh_next
            dc_next = _lstm_cell_backward(self._acts[t], self._c[t], self._tanh_c[t], dc_next, dh, d_pre[t], H)
            dh_next = (d_pre[t] @ W_hc) * cont[t][:, None]
        self._backprop_inputs(d_pre, self._h_conted, bottom, propagate_down)
        self._write_initial_state_diffs((dh_next, dc_next), propagate_down, bottom)


@register("RNN")
class RNN(_Recurrent):
    n_states = 1
    gate_mult = 1

    def _param_shapes(self, input_dim, static_dim):
        h = self.num_output
        return super()._param_shapes(input_dim, static_dim) + [("weight", (h, h)), ("bias", (h,))]

    def forward(self, bottom, top):
        xp, H = self.xp, self.num_output
        pre = self._project_inputs(bottom)
        T, N = pre.shape[:2]
        cont = bottom[1].data
        W_hh = self.blobs[self.i_rec].data
        W_ho, b_o = self.blobs[self.i_rec + 1].data, self.blobs[self.i_rec + 2].data
        (h_prev,) = self._initial_state(bottom)
        self._h = xp.empty((T, N, H), dtype=self.dtype)
        self._h_conted = xp.empty((T, N, H), dtype=self.dtype)
        for t in range(T):
            h_conted = h_prev * cont[t][:, None]
            self._h_conted[t] = h_conted
            self._h[t] = xp.tanh(pre[t] + h_conted @ W_hh.T)
            h_prev = self._h[t]
        # the output layer does not recur: all steps in one product
        o = self._h.reshape(T * N, H) @ W_ho.T
        o += b_o
        top[0].data[...] = xp.tanh(o).reshape(T, N, H)
        self._state = (self._h[T - 1].copy(),)
        if self.expose_hidden:
            top[1].data[0] = self._state[0]

    def backward(self, top, propagate_down, bottom):
        xp, H = self.xp, self.num_output
        T, N = top[0].shape[:2]
        cont = bottom[1].data
        i_ho = self.i_rec + 1
        W_hh, W_ho = self.blobs[self.i_rec].data, self.blobs[i_ho].data
        o = top[0].data
        d_o = (top[0].diff * (1 - o * o)).reshape(T * N, H)
        h_flat = self._h.reshape(T * N, H)
        if self.param_needs_grad(i_ho):
            self.blobs[i_ho].diff += d_o.T @ h_flat
        if self.param_needs_grad(i_ho + 1):
            self.blobs[i_ho + 1].diff += d_o.sum(axis=0)
        dh_out = (d_o @ W_ho).reshape(T, N, H)
        exposed = self._exposed_top_diffs(top)
        dh_next = xp.zeros((N, H), dtype=self.dtype) if exposed is None else exposed[0].copy()
        d_pre = xp.empty((T, N, H), dtype=self.dtype)
        for t in range(T - 1, -1, -1):
            h = self._h[t]
            d_pre[t] = (dh_out[t] + dh_next) * (1 - h * h)
            dh_next = (d_pre[t] @ W_hh) * cont[t][:, None]
        self._backprop_inputs(d_pre, self._h_conted, bottom, propagate_down)
        self._write_initial_state_diffs((dh_next,), propagate_down, bottom)


@register("LSTMUnit")
class LSTMUnit(Layer):
    """One LSTM step: bottoms c_prev (1, N, H), gate inputs (1, N, 4H), cont (1, N); tops c, h."""

    exact_bottoms = 3
    exact_tops = 2

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def reshape(self, bottom, top):
        c_prev, x = bottom[0], bottom[1]
        for k, b in enumerate(bottom):
            axes = 2 if k == 2 else 3
            if b.num_axes != axes or b.shape[0] != 1 or b.shape[1] != c_prev.shape[1]:
                raise self.error(
                    f"bottom[{k}] must have shape (1, N{', ...' if axes == 3 else ''})"
                    f" with {axes} axes and N = {c_prev.shape[1] if c_prev.num_axes > 1 else '?'}, got {b.shape}"
                )
        self.hidden = c_prev.shape[2]
        if x.shape[2] != 4 * self.hidden:
            raise self.error(
                f"bottom[1] must have 4 * {self.hidden} gate inputs, got {x.shape[2]}"
            )
        top[0].reshape(c_prev.shape)
        top[1].reshape(c_prev.shape)

    def forward(self, bottom, top):
        xp = self.xp
        acts = _lstm_activate(xp, bottom[1].data[0], bottom[2].data[0], self.hidden)
        c, tanh_c, h = _lstm_cell(acts, bottom[0].data[0], self.hidden, xp)
        self._acts, self._tanh_c = acts, tanh_c
        top[0].data[0] = c
        top[1].data[0] = h

    def backward(self, top, propagate_down, bottom):
        if not (propagate_down[0] or propagate_down[1]):
            return
        d_x = self.xp.empty_like(self._acts)
        d_c_prev = _lstm_cell_backward(
            self._acts, bottom[0].data[0], self._tanh_c, top[0].diff[0], top[1].diff[0], d_x, self.hidden
        )
        if propagate_down[0]:
            bottom[0].diff[0] = d_c_prev
        if propagate_down[1]:
            bottom[1].diff[0] = d_x
