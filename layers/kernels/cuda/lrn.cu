// Local response normalization, both regions. Forward keeps scale s and
// power p = s^-beta (backward needs both, as the array code does):
//   across channels: s = k + alpha/size * sum of x^2 over `size` channels
//   within channel:  s = 1 + alpha/size^2 * sum of x^2 over a size x size window
//   y = x * p
//   dx = dy * p - coef * x * window_sum(dy * x * p / s),  coef = 2 alpha beta / (window elements)

extern "C" __global__ void lrn_across_forward(const int count, const float* x, const int C,
                                              const int HW, const int size, const float alpha_n,
                                              const float k, const float neg_beta, float* scale,
                                              float* power, float* y) {
  BN_LOOP(index, count) {
    const int c = (index / HW) % C;
    const int half = (size - 1) / 2;
    const int c0 = max(c - half, 0), c1 = min(c + half + 1, C);
    const float* base = x + index - c * HW;
    float sum = 0.f;
    for (int d = c0; d < c1; ++d) {
      const float v = base[d * HW];
      sum += v * v;
    }
    const float s = sum * alpha_n + k;
    const float p = powf(s, neg_beta);
    scale[index] = s;
    power[index] = p;
    y[index] = x[index] * p;
  }
}

extern "C" __global__ void lrn_across_backward(const int count, const float* x, const float* dy,
                                               const float* scale, const float* power,
                                               const int C, const int HW, const int size,
                                               const float coef, float* dx) {
  BN_LOOP(index, count) {
    const int c = (index / HW) % C;
    const int half = (size - 1) / 2;
    const int c0 = max(c - half, 0), c1 = min(c + half + 1, C);
    const int first = index - c * HW;
    float acc = 0.f;
    for (int d = c0; d < c1; ++d) {
      const int e = first + d * HW;
      acc += dy[e] * x[e] * power[e] / scale[e];
    }
    dx[index] = dy[index] * power[index] - coef * x[index] * acc;
  }
}

extern "C" __global__ void lrn_within_forward(const int count, const float* x, const int H,
                                              const int W, const int size, const float alpha_n,
                                              const float neg_beta, float* scale, float* power,
                                              float* y) {
  BN_LOOP(index, count) {
    const int w = index % W;
    const int h = (index / W) % H;
    const int half = (size - 1) / 2;
    const float* plane = x + index - (h * W + w);
    float sum = 0.f;
    for (int i = max(h - half, 0); i < min(h + half + 1, H); ++i)
      for (int j = max(w - half, 0); j < min(w + half + 1, W); ++j) {
        const float v = plane[i * W + j];
        sum += v * v;
      }
    const float s = sum * alpha_n + 1.f;
    const float p = powf(s, neg_beta);
    scale[index] = s;
    power[index] = p;
    y[index] = x[index] * p;
  }
}

extern "C" __global__ void lrn_within_backward(const int count, const float* x, const float* dy,
                                               const float* scale, const float* power,
                                               const int H, const int W, const int size,
                                               const float coef, float* dx) {
  BN_LOOP(index, count) {
    const int w = index % W;
    const int h = (index / W) % H;
    const int half = (size - 1) / 2;
    const int first = index - (h * W + w);
    float acc = 0.f;
    for (int i = max(h - half, 0); i < min(h + half + 1, H); ++i)
      for (int j = max(w - half, 0); j < min(w + half + 1, W); ++j) {
        const int e = first + i * W + j;
        acc += dy[e] * x[e] * power[e] / scale[e];
      }
    dx[index] = dy[index] * power[index] - coef * x[index] * acc;
  }
}
