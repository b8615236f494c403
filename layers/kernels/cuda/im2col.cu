// im2col / col2im for 2-D (de)convolution over a whole chunk of samples.
//
// Column layout (c, ki, kj, n, oi, oj): for group g the rows
// [g*Cg*kh*kw, (g+1)*Cg*kh*kw) form Caffe's column matrix with the samples of
// the chunk side by side, so one GEMM per group covers the whole chunk.

extern "C" __global__ void im2col(const int count, const float* x, const int N, const int C,
                                  const int H, const int W, const int kh, const int kw,
                                  const int ph, const int pw, const int sh, const int sw,
                                  const int dh, const int dw, const int oh, const int ow,
                                  float* col) {
  BN_LOOP(index, count) {
    int t = index;
    const int oj = t % ow; t /= ow;
    const int oi = t % oh; t /= oh;
    const int n = t % N; t /= N;
    const int kj = t % kw; t /= kw;
    const int ki = t % kh;
    const int c = t / kh;
    const int h = oi * sh - ph + ki * dh;
    const int w = oj * sw - pw + kj * dw;
    float v = 0.f;
    if (h >= 0 && h < H && w >= 0 && w < W) v = x[((n * C + c) * H + h) * W + w];
    col[index] = v;
  }
}

// Each image element gathers the column entries that read it: no atomics, and
// the same sum order on every run.
extern "C" __global__ void col2im(const int count, const float* col, const int N, const int C,
                                  const int H, const int W, const int kh, const int kw,
                                  const int ph, const int pw, const int sh, const int sw,
                                  const int dh, const int dw, const int oh, const int ow,
                                  float* x) {
  BN_LOOP(index, count) {
    int t = index;
    const int w = t % W; t /= W;
    const int h = t % H; t /= H;
    const int c = t % C;
    const int n = t / C;
    float sum = 0.f;
    for (int ki = 0; ki < kh; ++ki) {
      const int hs = h + ph - ki * dh;  // oi * sh when this offset reads row h
      if (hs < 0 || hs % sh != 0) continue;
      const int oi = hs / sh;
      if (oi >= oh) continue;
      for (int kj = 0; kj < kw; ++kj) {
        const int ws = w + pw - kj * dw;
        if (ws < 0 || ws % sw != 0) continue;
        const int oj = ws / sw;
        if (oj >= ow) continue;
        sum += col[((((c * kh + ki) * kw + kj) * N + n) * oh + oi) * ow + oj];
      }
    }
    x[index] = sum;
  }
}

// (A, B, L) -> (B, A, L), plus bias[a] when has_bias: the GEMM's (channel,
// sample, position) order to the blob's (sample, channel, position) order and
// back (the same kernel both ways; the bias is added on the way to the blob).
extern "C" __global__ void swap_leading_axes(const int count, const float* src, const int A,
                                             const int B, const int L, const float* bias,
                                             const int has_bias, float* dst) {
  BN_LOOP(index, count) {
    int t = index;
    const int l = t % L; t /= L;
    const int b = t % B;
    const int a = t / B;
    float v = src[index];
    if (has_bias) v += bias[a];
    dst[(b * A + a) * L + l] = v;
  }
}
