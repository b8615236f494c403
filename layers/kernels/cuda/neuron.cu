// Elementwise activations. Backward reads what it needs (x for ReLU, y for
// sigmoid and tanh); in place the buffers may alias, which an elementwise
// kernel allows.

extern "C" __global__ void relu_forward(const int count, const float* x, const float slope,
                                        float* y) {
  BN_LOOP(i, count) {
    const float v = x[i];
    y[i] = v > 0.f ? v : v * slope;
  }
}

// in place x is already y, whose sign is x's for a non-negative slope
extern "C" __global__ void relu_backward(const int count, const float* dy, const float* x,
                                         const float slope, float* dx) {
  BN_LOOP(i, count) { dx[i] = x[i] > 0.f ? dy[i] : dy[i] * slope; }
}

extern "C" __global__ void sigmoid_forward(const int count, const float* x, float* y) {
  BN_LOOP(i, count) { y[i] = 0.5f * tanhf(0.5f * x[i]) + 0.5f; }
}

extern "C" __global__ void sigmoid_backward(const int count, const float* dy, const float* y,
                                            float* dx) {
  BN_LOOP(i, count) {
    const float v = y[i];
    dx[i] = dy[i] * (v * (1.f - v));
  }
}

extern "C" __global__ void tanh_forward(const int count, const float* x, float* y) {
  BN_LOOP(i, count) { y[i] = tanhf(x[i]); }
}

extern "C" __global__ void tanh_backward(const int count, const float* dy, const float* y,
                                         float* dx) {
  BN_LOOP(i, count) {
    const float v = y[i];
    dx[i] = dy[i] * (1.f - v * v);
  }
}

// Dropout from the host's uniform draws u (the same numbers on CPU and GPU):
// kept where u >= ratio, scaled by 1 / (1 - ratio). Backward reads u again,
// so no mask array is kept.
extern "C" __global__ void dropout_forward(const int count, const float* x, const float* u,
                                           const float ratio, const float scale, float* y) {
  BN_LOOP(i, count) { y[i] = u[i] >= ratio ? x[i] * scale : 0.f; }
}

extern "C" __global__ void dropout_backward(const int count, const float* dy, const float* u,
                                            const float ratio, const float scale, float* dx) {
  BN_LOOP(i, count) { dx[i] = u[i] >= ratio ? dy[i] * scale : 0.f; }
}
