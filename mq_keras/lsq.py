"""LSQ: a learned quantization step with its own gradient.

Esser et al., 2020, "Learned Step Size Quantization" (ICLR). With `v = x / s`
and the integer grid `[-Q_N, Q_P]` (`Q_N = 0`, `Q_P = 2^k - 1` for unsigned
data; `Q_N = 2^(k-1)`, `Q_P = 2^(k-1) - 1` for signed):

Forward:
    y = s * clip(round(v), -Q_N, Q_P)
(computed by TF's `fake_quant_with_min_max_vars` on `[-Q_N s, Q_P s]`, whose
levels are exactly these: zero is the level `Q_N`, so nothing is nudged, and
it rounds half up, `round(v) = floor(v + 1/2)`; the TFLite converter reads
the range from that op).

Backward (straight through for `x`, the paper's step gradient for `s`):
    dL/dx = dL/dy * 1[-Q_N < v < Q_P]
    dL/ds = g * sum(dL/dy * d),  d = round(v) - v   if -Q_N < v < Q_P
                                     -Q_N           if v <= -Q_N
                                      Q_P           if v >= Q_P
with the gradient scale `g = 1 / sqrt(N * Q_P)`, `N` the number of values
per example (the paper's "number of features"), which keeps the step's
update in proportion to the size of the step whatever the layer's width.
"""

import tensorflow as tf


def unsigned_grid(num_bits):
    """`(Q_N, Q_P)` for data >= 0."""
    return 0.0, float(2**num_bits - 1)


def signed_grid(num_bits):
    """`(Q_N, Q_P)` for data of both signs."""
    return float(2 ** (num_bits - 1)), float(2 ** (num_bits - 1) - 1)


def lsq_fake_quant(x, step, q_neg, q_pos, *, num_bits):
    """LSQ's quantizer: forward and gradients in the module docstring.

    Args:
        x: float32 tensor with a leading batch axis.
        step: the step `s` (float32 scalar tensor, > 0).
        q_neg, q_pos: `Q_N`, `Q_P` (float32 scalars, `Q_N + Q_P = 2^k - 1`).
        num_bits: `k`, the bits of the fake-quant op.

    Returns:
        `y`, with `dL/dx` and `dL/ds` as above (none for `Q_N`, `Q_P`).
    """
    q_neg = tf.stop_gradient(q_neg)
    q_pos = tf.stop_gradient(q_pos)

    @tf.custom_gradient
    def quantize(x, s):
        y = tf.quantization.fake_quant_with_min_max_vars(
            x, -q_neg * s, q_pos * s, num_bits=num_bits, narrow_range=False)

        def grad(dy):
            v = x / s
            inside = tf.logical_and(v > -q_neg, v < q_pos)
            d = tf.where(inside, tf.floor(v + 0.5) - v,
                         tf.where(v <= -q_neg, -q_neg, q_pos))
            per_example = tf.cast(tf.size(x) // tf.shape(x)[0], tf.float32)
            scale = tf.math.rsqrt(per_example * q_pos)
            ds = scale * tf.reduce_sum(dy * d)
            return dy * tf.cast(inside, dy.dtype), ds

        return y, grad

    return quantize(x, step)
