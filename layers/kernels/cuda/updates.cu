// The solvers' per-parameter step, one kernel per rule: normalize (iter_size),
// regularize (L2: decay * w, L1: decay * sign(w)), the rule, and Net.update
// (w -= step) in one pass over the parameter, in the same float operations and
// order as solver/updates.py. The step stays in g (Caffe leaves it in the diff).

__device__ __forceinline__ float regularized(float g, float w, float norm, float decay, int l1) {
  g *= norm;
  if (decay != 0.f) {
    const float sign = (w > 0.f) - (w < 0.f);
    g += decay * (l1 ? sign : w);
  }
  return g;
}

extern "C" __global__ void sgd_step(const int count, float* w, float* g, float* v,
                                    const float norm, const float decay, const int l1,
                                    const float rate, const float momentum) {
  BN_LOOP(i, count) {
    const float gi = regularized(g[i], w[i], norm, decay, l1);
    const float vi = v[i] * momentum + rate * gi;
    v[i] = vi;
    g[i] = vi;
    w[i] -= vi;
  }
}

extern "C" __global__ void nesterov_step(const int count, float* w, float* g, float* v,
                                         const float norm, const float decay, const int l1,
                                         const float rate, const float momentum) {
  BN_LOOP(i, count) {
    const float gi = regularized(g[i], w[i], norm, decay, l1);
    const float previous = v[i];
    const float vi = previous * momentum + gi * rate;
    v[i] = vi;
    const float step = vi * (1.f + momentum) - previous * momentum;
    g[i] = step;
    w[i] -= step;
  }
}

extern "C" __global__ void adagrad_step(const int count, float* w, float* g, float* h,
                                        const float norm, const float decay, const int l1,
                                        const float rate, const float delta) {
  BN_LOOP(i, count) {
    const float gi = regularized(g[i], w[i], norm, decay, l1);
    const float hi = h[i] + gi * gi;
    h[i] = hi;
    const float step = gi / (sqrtf(hi) + delta) * rate;
    g[i] = step;
    w[i] -= step;
  }
}

extern "C" __global__ void rmsprop_step(const int count, float* w, float* g, float* h,
                                        const float norm, const float decay, const int l1,
                                        const float rate, const float delta,
                                        const float rms_decay) {
  BN_LOOP(i, count) {
    const float gi = regularized(g[i], w[i], norm, decay, l1);
    const float hi = h[i] * rms_decay + (gi * gi) * (1.f - rms_decay);
    h[i] = hi;
    const float step = gi / (sqrtf(hi) + delta) * rate;
    g[i] = step;
    w[i] -= step;
  }
}

extern "C" __global__ void adadelta_step(const int count, float* w, float* g, float* g2,
                                         float* u2, const float norm, const float decay,
                                         const int l1, const float rate, const float delta,
                                         const float momentum) {
  BN_LOOP(i, count) {
    float gi = regularized(g[i], w[i], norm, decay, l1);
    const float one_minus = 1.f - momentum;
    const float g2i = g2[i] * momentum + (gi * gi) * one_minus;
    g2[i] = g2i;
    gi *= sqrtf((u2[i] + delta) / (g2i + delta));
    u2[i] = u2[i] * momentum + (gi * gi) * one_minus;
    const float step = gi * rate;
    g[i] = step;
    w[i] -= step;
  }
}

// step_size = rate * sqrt(1 - beta2^t) / (1 - beta1^t), computed by the caller
extern "C" __global__ void adam_step(const int count, float* w, float* g, float* m, float* v,
                                     const float norm, const float decay, const int l1,
                                     const float step_size, const float eps, const float beta1,
                                     const float beta2) {
  BN_LOOP(i, count) {
    const float gi = regularized(g[i], w[i], norm, decay, l1);
    const float mi = m[i] * beta1 + gi * (1.f - beta1);
    const float vi = v[i] * beta2 + (gi * gi) * (1.f - beta2);
    m[i] = mi;
    v[i] = vi;
    const float step = (mi * step_size) / (sqrtf(vi) + eps);
    g[i] = step;
    w[i] -= step;
  }
}
