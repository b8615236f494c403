// MAX and AVE pooling on (N, C, H, W) with Caffe's windows: the output size
// (ceil rounding included) comes from the caller; a window starts at
// o * stride - pad and is clipped to the image.

extern "C" __global__ void max_pool_forward(const int count, const float* x, const int H,
                                            const int W, const int oh, const int ow,
                                            const int kh, const int kw, const int sh,
                                            const int sw, const int ph, const int pw,
                                            float* y, int* mask) {
  BN_LOOP(index, count) {
    const int oj = index % ow;
    const int oi = (index / ow) % oh;
    const int plane = index / (ow * oh);
    int h0 = oi * sh - ph, w0 = oj * sw - pw;
    const int h1 = min(h0 + kh, H), w1 = min(w0 + kw, W);
    h0 = max(h0, 0);
    w0 = max(w0, 0);
    const float* xp = x + plane * H * W;
    float best = -BN_FLT_MAX;
    int where = -1;  // a window wholly outside the image keeps -FLT_MAX and -1, as in Caffe
    for (int h = h0; h < h1; ++h)
      for (int w = w0; w < w1; ++w)
        if (xp[h * W + w] > best) {  // strict: the first maximum in row-major order wins
          best = xp[h * W + w];
          where = h * W + w;
        }
    y[index] = best;
    mask[index] = where;
  }
}

// Each input element sums the gradients of the windows whose maximum it was.
extern "C" __global__ void max_pool_backward(const int count, const float* dy, const int* mask,
                                             const int H, const int W, const int oh,
                                             const int ow, const int kh, const int kw,
                                             const int sh, const int sw, const int ph,
                                             const int pw, float* dx) {
  BN_LOOP(index, count) {
    const int w = index % W;
    const int h = (index / W) % H;
    const int plane = index / (W * H);
    const int i0 = (h + ph < kh) ? 0 : (h + ph - kh) / sh + 1;
    const int i1 = min((h + ph) / sh + 1, oh);
    const int j0 = (w + pw < kw) ? 0 : (w + pw - kw) / sw + 1;
    const int j1 = min((w + pw) / sw + 1, ow);
    const int me = h * W + w;
    const float* g = dy + plane * oh * ow;
    const int* m = mask + plane * oh * ow;
    float sum = 0.f;
    for (int i = i0; i < i1; ++i)
      for (int j = j0; j < j1; ++j)
        if (m[i * ow + j] == me) sum += g[i * ow + j];
    dx[index] = sum;
  }
}

// Caffe's divisor: the window clipped to image + pad, before clipping to the image.
__device__ __forceinline__ int ave_pool_size(int oi, int oj, int H, int W, int kh, int kw,
                                             int sh, int sw, int ph, int pw) {
  const int h0 = oi * sh - ph, w0 = oj * sw - pw;
  const int h1 = min(h0 + kh, H + ph), w1 = min(w0 + kw, W + pw);
  return (h1 - h0) * (w1 - w0);
}

extern "C" __global__ void ave_pool_forward(const int count, const float* x, const int H,
                                            const int W, const int oh, const int ow,
                                            const int kh, const int kw, const int sh,
                                            const int sw, const int ph, const int pw,
                                            float* y) {
  BN_LOOP(index, count) {
    const int oj = index % ow;
    const int oi = (index / ow) % oh;
    const int plane = index / (ow * oh);
    const int size = ave_pool_size(oi, oj, H, W, kh, kw, sh, sw, ph, pw);
    const int h0 = max(oi * sh - ph, 0), w0 = max(oj * sw - pw, 0);
    const int h1 = min(oi * sh - ph + kh, H), w1 = min(oj * sw - pw + kw, W);
    const float* xp = x + plane * H * W;
    float sum = 0.f;
    for (int h = h0; h < h1; ++h)
      for (int w = w0; w < w1; ++w) sum += xp[h * W + w];
    y[index] = sum / size;
  }
}

extern "C" __global__ void ave_pool_backward(const int count, const float* dy, const int H,
                                             const int W, const int oh, const int ow,
                                             const int kh, const int kw, const int sh,
                                             const int sw, const int ph, const int pw,
                                             float* dx) {
  BN_LOOP(index, count) {
    const int w = index % W;
    const int h = (index / W) % H;
    const int plane = index / (W * H);
    // windows (before clipping) that contain (h, w)
    const int i0 = (h + ph < kh) ? 0 : (h + ph - kh) / sh + 1;
    const int i1 = min((h + ph) / sh + 1, oh);
    const int j0 = (w + pw < kw) ? 0 : (w + pw - kw) / sw + 1;
    const int j1 = min((w + pw) / sw + 1, ow);
    const float* g = dy + plane * oh * ow;
    float sum = 0.f;
    for (int i = i0; i < i1; ++i)
      for (int j = j0; j < j1; ++j)
        sum += g[i * ow + j] / ave_pool_size(i, j, H, W, kh, kw, sh, sw, ph, pw);
    dx[index] = sum;
  }
}
