// BatchNorm's and Scale's per-channel arithmetic on (outer, C, inner) arrays.
// The per-channel sums are reductions the caller makes (cupy's reduce kernels);
// these kernels do the elementwise passes.

// y = (x - mean[c]) * inv_std[c]
extern "C" __global__ void channel_normalize(const int count, const float* x, const float* mean,
                                             const float* inv_std, const int C, const int inner,
                                             float* y) {
  BN_LOOP(i, count) {
    const int c = (i / inner) % C;
    y[i] = (x[i] - mean[c]) * inv_std[c];
  }
}

// BatchNorm's gradient with batch statistics:
// dx = (dy - mean(dy)[c] - y * mean(dy * y)[c]) * inv_std[c]
extern "C" __global__ void batch_norm_backward(const int count, const float* dy, const float* y,
                                               const float* mean_dy, const float* mean_dy_y,
                                               const float* inv_std, const int C,
                                               const int inner, float* dx) {
  BN_LOOP(i, count) {
    const int c = (i / inner) % C;
    dx[i] = (dy[i] - mean_dy[c] - y[i] * mean_dy_y[c]) * inv_std[c];
  }
}

// y = x * scale[c] (+ bias[c] when has_bias); also Scale's data gradient (dy * scale[c]).
extern "C" __global__ void channel_scale(const int count, const float* x, const float* scale,
                                         const float* bias, const int has_bias, const int C,
                                         const int inner, float* y) {
  BN_LOOP(i, count) {
    const int c = (i / inner) % C;
    float v = x[i] * scale[c];
    if (has_bias) v += bias[c];
    y[i] = v;
  }
}
