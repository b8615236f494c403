"""The window sums behind local response normalization (across channels or within a channel)."""


def window_sum(xp, a, size, axes, out=None):
    """Sum of a over a centred window of odd `size` along each axis in `axes` (zero outside)."""
    half = (size - 1) // 2
    for axis in axes:
        n = a.shape[axis]
        pad_shape = list(a.shape)
        pad_shape[axis] = n + size - 1
        padded = xp.zeros(pad_shape, dtype=a.dtype)
        idx = [slice(None)] * a.ndim
        idx[axis] = slice(half, half + n)
        padded[tuple(idx)] = a
        acc = xp.zeros_like(a)
        for o in range(size):
            idx[axis] = slice(o, o + n)
            acc += padded[tuple(idx)]
        a = acc
    if out is not None:
        out[...] = a
        return out
    return a
