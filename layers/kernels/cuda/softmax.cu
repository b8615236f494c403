// Softmax over the class axis of an (outer, C, inner) array, the softmax loss
// and top-k accuracy. One thread per (outer, inner) position loops over the
// classes. Losses and counts are written per position; the caller sums them
// on the device, so nothing is read back to the host.

extern "C" __global__ void softmax_forward(const int count, const float* x, const int C,
                                           const int inner, float* y) {
  BN_LOOP(pos, count) {
    const int o = pos / inner, i = pos % inner;
    const float* xs = x + o * C * inner + i;
    float* ys = y + o * C * inner + i;
    float top = -BN_FLT_MAX;
    for (int c = 0; c < C; ++c) top = fmaxf(top, xs[c * inner]);
    float sum = 0.f;
    for (int c = 0; c < C; ++c) {
      const float e = expf(xs[c * inner] - top);
      ys[c * inner] = e;
      sum += e;
    }
    for (int c = 0; c < C; ++c) ys[c * inner] /= sum;
  }
}

// dx = (dy - sum_c dy * y) * y
extern "C" __global__ void softmax_backward(const int count, const float* y, const float* dy,
                                            const int C, const int inner, float* dx) {
  BN_LOOP(pos, count) {
    const int first = (pos / inner) * C * inner + pos % inner;
    float dot = 0.f;
    for (int c = 0; c < C; ++c) dot += dy[first + c * inner] * y[first + c * inner];
    for (int c = 0; c < C; ++c) {
      const int e = first + c * inner;
      dx[e] = (dy[e] - dot) * y[e];
    }
  }
}

// Labels arrive as the label blob's floats and are truncated like static_cast<int>.
// valid: 1 where the position counts (0 at ignore_label); bad: set to 1 when a
// counted label is outside [0, C) (the caller reports it at its next check).
extern "C" __global__ void softmax_loss_forward(const int count, const float* prob,
                                                const float* label, const int C, const int inner,
                                                const int has_ignore, const int ignore_label,
                                                float* loss, float* valid, int* bad) {
  BN_LOOP(pos, count) {
    const int lab = (int)label[pos];
    if (has_ignore && lab == ignore_label) {
      loss[pos] = 0.f;
      valid[pos] = 0.f;
      continue;
    }
    if (lab < 0 || lab >= C) {
      bad[0] = 1;
      loss[pos] = 0.f;
      valid[pos] = 0.f;
      continue;
    }
    const float p = prob[((pos / inner) * C + lab) * inner + pos % inner];
    loss[pos] = -logf(fmaxf(p, BN_FLT_MIN));
    valid[pos] = 1.f;
  }
}

// dx = (prob - onehot(label)) * scale[0] * valid; scale = loss weight / normalizer,
// a device scalar (read here, never on the host).
extern "C" __global__ void softmax_loss_backward(const int count, const float* prob,
                                                 const float* label, const float* valid,
                                                 const float* scale, const int C,
                                                 const int inner, float* dx) {
  BN_LOOP(index, count) {
    const int i = index % inner;
    const int c = (index / inner) % C;
    const int pos = (index / (inner * C)) * inner + i;
    const float target = ((int)label[pos] == c) ? 1.f : 0.f;
    dx[index] = valid[pos] == 0.f ? 0.f : (prob[index] - target) * scale[0];
  }
}

// Correct when at most top_k classes (the true one included) score >= the true class.
extern "C" __global__ void accuracy_forward(const int count, const float* score,
                                            const float* label, const int C, const int inner,
                                            const int top_k, const int has_ignore,
                                            const int ignore_label, float* correct, float* valid,
                                            int* bad) {
  BN_LOOP(pos, count) {
    const int lab = (int)label[pos];
    correct[pos] = 0.f;
    valid[pos] = 0.f;
    if (has_ignore && lab == ignore_label) continue;
    if (lab < 0 || lab >= C) {
      bad[0] = 1;
      continue;
    }
    const float* s = score + (pos / inner) * C * inner + pos % inner;
    const float truth = s[lab * inner];
    int at_least = 0;
    for (int c = 0; c < C; ++c) at_least += s[c * inner] >= truth;
    correct[pos] = at_least <= top_k ? 1.f : 0.f;
    valid[pos] = 1.f;
  }
}
