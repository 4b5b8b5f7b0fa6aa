"""Hand-designed backward rules of the quantizers: STE, EWGS, ApproxSign.

Every quantizer's forward is a rounding `x_q = round(x)` in its own
discretizer domain (DoReFa: `x = W_tilde` on [0, 1] with levels `j / n`;
Uniform: `x = W / s` in steps; 1-bit: `u` on [-1, 1] with `x_q = sign(u)`).
The backward rule says what replaces `d x_q / d x`:

- "ste" (default): 1 (Bengio et al. 2013), the gates each quantizer states.
- "ewgs": element-wise gradient scaling (Lee, Kim & Ham, CVPR 2021):
  `g_x = g_q * (1 + delta * sign(g_q) * (x - x_q))`, with `g_q = dL/dx_q`.
  The factor exceeds 1 where `sign(g_q) = sign(x - x_q)`: the descent step
  first moves `x` back through its own level, so it is farther from the
  threshold it must cross to change `x_q`, and gets a larger gradient; a
  weight already on the near side of that threshold gets a smaller one (the
  paper's reasoning). `delta` is fixed, or
  set per layer from the loss' Hessian with `hessian_deltas` (the paper's
  rule: `delta = max(0, (Tr(H_q) / N) / (3 * std(g_q)))` on the quantized
  values, Hutchinson's trace estimate).
- "approx_sign": for 1-bit quantizers, Bi-Real Net's piecewise-polynomial
  surrogate of sign (Liu et al., ECCV 2018): `d sign(u)/du ~ 2 - 2|u|` for
  |u| <= 1, else 0, on the quantizer's normalized input `u`.

Positive factors (STE, ApproxSign inside its support, EWGS with
`delta * |x - x_q| < 1`) never flip the gradient's sign.
"""

import numbers

from keras import ops

GRADIENTS = ("ste", "ewgs", "approx_sign")


def check(quantizer_name, gradient, delta, *, allowed):
    """Validates a quantizer's `gradient` and `delta` options; returns them.

    Raises:
        ValueError: an unknown or (for this quantizer) unsupported gradient,
            or a delta that is not a finite number >= 0, or a delta given
            with a gradient that has none.
    """
    if gradient not in GRADIENTS:
        raise ValueError(
            f"{quantizer_name}: unknown gradient {gradient!r}; allowed values "
            f"are {GRADIENTS}."
        )
    if gradient not in allowed:
        raise ValueError(
            f"{quantizer_name}: gradient={gradient!r} is not defined for this "
            f"quantizer (its options: {allowed}); 'approx_sign' is a 1-bit "
            "surrogate of sign."
        )
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not (
            0.0 <= float(delta) < float("inf")):
        raise ValueError(
            f"{quantizer_name}: delta must be a finite number >= 0, got {delta!r}."
        )
    if gradient != "ewgs" and delta:
        raise ValueError(
            f"{quantizer_name}: delta={delta!r} only applies to gradient='ewgs'; "
            "drop delta or set gradient='ewgs'."
        )
    return gradient, float(delta)


def ewgs_factor(dy, residual, delta):
    """`1 + delta * sign(dy) * residual`: EWGS as a factor on the STE gradient.

    `dy` has the sign of `g_q` (the two differ by a positive factor), and
    `residual = x - x_q` in the discretizer's domain.
    """
    return 1.0 + delta * ops.sign(dy) * ops.cast(residual, dy.dtype)


def approx_sign_factor(u):
    """`(2 - 2|u|) * 1[|u| <= 1]`: ApproxSign's derivative on the normalized input."""
    a = ops.abs(u)
    return ops.where(a <= 1.0, 2.0 - 2.0 * a, ops.zeros_like(a))
