"""Tests of `mq_keras.quantizers` against independent NumPy references.

The references below are written from METAQUANT.md section 3 and the
quantizer docstrings, in float64, without calling the library:

* DoReFa: `t = tanh(W)`, `W_tilde = t / (2 max|t|) + 1/2`,
  `W_hat = 2 round((2^k - 1) W_tilde) / (2^k - 1) - 1`;
  STE backward `dL/dW = (1 - t^2) / max|t| * dL/dW_hat`.
* BWN: `W_hat = alpha sign(W)`, `alpha = mean|W|`; backward as the official
  code, `dL/dW = alpha * dL/dW_hat * 1[|W| <= 1]`.
* Ternary: `delta = 0.7 mean|W|`, `alpha = mean(|W| : |W| > delta)`,
  `W_hat = alpha sign(W) 1[|W| > delta]`; backward
  `dL/dW = alpha * dL/dW_hat * 1[|W| <= 1]` (BWN's convention).
* Uniform: `n = 2^(k-1) - 1`, `s = max|W| / n` (1 for an all-zero channel),
  `W_hat = s round(W / s)`, identity backward.

Rounding is round-half-to-even everywhere (`np.round`).
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from mq_keras import quantizers

# (kernel shape, channel_axes) of the layer types the wrapper quantizes.
KERNELS = {
    "dense": ((16, 8), (-1,)),
    "conv2d": ((3, 3, 4, 6), (-1,)),
    "conv2d_transpose": ((3, 3, 6, 4), (-2,)),
    "depthwise": ((3, 3, 4, 2), (-2, -1)),
}

# Quantizer constructors and their reference names / options.
QUANTIZERS = (
    [("dorefa", {"num_bits": k}) for k in range(1, 9)]
    + [("bwn", {"per_channel": pc}) for pc in (False, True)]
    + [("ternary", {"per_channel": pc}) for pc in (False, True)]
    + [
        ("uniform", {"num_bits": k, "per_channel": pc})
        for k in range(2, 9)
        for pc in (True, False)
    ]
)

_CLASSES = {
    "dorefa": quantizers.DoReFa,
    "bwn": quantizers.BWN,
    "ternary": quantizers.Ternary,
    "uniform": quantizers.Uniform,
}


def _qid(param):
    name, opts = param
    return name + "-" + "-".join(f"{k}={v}" for k, v in sorted(opts.items()))


def _make(name, opts):
    return _CLASSES[name](**opts)


# --------------------------------------------------------------------------
# NumPy references.
# --------------------------------------------------------------------------


def _np_reduce_axes(rank, channel_axes):
    keep = {a % rank for a in channel_axes}
    return tuple(a for a in range(rank) if a not in keep)


def _stat_axes(w, channel_axes, per_channel):
    return _np_reduce_axes(w.ndim, channel_axes) if per_channel else None


def ref_dorefa_tilde(w):
    t = np.tanh(w.astype(np.float64))
    m = np.max(np.abs(t))
    m = m if m > 0 else 1.0
    return t / (2.0 * m) + 0.5


def ref_dorefa_q(w_tilde, k):
    n = 2**k - 1
    return 2.0 * np.round(n * np.asarray(w_tilde, np.float64)) / n - 1.0


def ref_dorefa_calib(w):
    t = np.tanh(w.astype(np.float64))
    m = np.max(np.abs(t))
    m = m if m > 0 else 1.0
    return (1.0 - t**2) / m


def ref_bwn(w, channel_axes, per_channel):
    w = w.astype(np.float64)
    axes = _stat_axes(w, channel_axes, per_channel)
    alpha = np.mean(np.abs(w), axis=axes, keepdims=True)
    return alpha * np.where(w >= 0, 1.0, -1.0)


def ref_ternary(w, channel_axes, per_channel):
    w = w.astype(np.float64)
    axes = _stat_axes(w, channel_axes, per_channel)
    a = np.abs(w)
    delta = 0.7 * np.mean(a, axis=axes, keepdims=True)
    mask = a > delta
    count = np.sum(mask, axis=axes, keepdims=True)
    total = np.sum(a * mask, axis=axes, keepdims=True)
    alpha = total / np.maximum(count, 1)
    return alpha * np.sign(w) * mask


def ref_uniform_scale(w, k, channel_axes, per_channel):
    n = 2 ** (k - 1) - 1
    axes = _stat_axes(w, channel_axes, per_channel)
    m = np.max(np.abs(w.astype(np.float64)), axis=axes, keepdims=True)
    return np.where(m > 0, m / n, 1.0)


def ref_uniform(w, k, channel_axes, per_channel):
    s = ref_uniform_scale(w, k, channel_axes, per_channel)
    return s * np.round(w.astype(np.float64) / s)


def ref_forward(name, opts, w, channel_axes):
    """`Q(A(W))` of the named quantizer, in float64."""
    if name == "dorefa":
        return ref_dorefa_q(ref_dorefa_tilde(w), opts["num_bits"])
    if name == "bwn":
        return ref_bwn(w, channel_axes, opts["per_channel"])
    if name == "ternary":
        return ref_ternary(w, channel_axes, opts["per_channel"])
    return ref_uniform(w, opts["num_bits"], channel_axes, opts["per_channel"])


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def _kernel(shape, channel_axes, seed=0):
    """Random kernel whose output channels have very different scales."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    scale_shape = [1] * len(shape)
    for a in channel_axes:
        scale_shape[a] = shape[a]
    scales = np.exp(rng.uniform(-1.5, 1.5, size=scale_shape))
    return (w * scales * 0.5).astype(np.float32)


def _per_channel_columns(x, channel_axes):
    """`x` reshaped to (elements per channel, channels)."""
    keep = sorted(a % x.ndim for a in channel_axes)
    red = _np_reduce_axes(x.ndim, channel_axes)
    x = np.transpose(x, red + tuple(keep))
    n_ch = int(np.prod([x.shape[-1 - i] for i in range(len(keep))]))
    return x.reshape(-1, n_ch)


def _quantize_np(q, w, channel_axes):
    return np.asarray(q(tf.constant(w), channel_axes))


def _grad(fn, x, upstream):
    """`d sum(upstream * fn(x)) / dx` via `tf.GradientTape`."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        loss = tf.reduce_sum(tf.constant(upstream) * y)
    return np.asarray(tape.gradient(loss, x))


# --------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("qparam", QUANTIZERS, ids=_qid)
def test_forward_matches_numpy(qparam, kernel):
    name, opts = qparam
    shape, axes = KERNELS[kernel]
    w = _kernel(shape, axes, seed=len(shape) + len(axes))
    q = _make(name, opts)
    got = _quantize_np(q, w, axes)
    assert got.shape == w.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_forward(name, opts, w, axes),
                               rtol=1e-6, atol=1e-6)
    # At most num_levels distinct values in every output channel.
    cols = _per_channel_columns(got, axes)
    counts = [len(np.unique(cols[:, j])) for j in range(cols.shape[1])]
    assert max(counts) <= q.num_levels
    if name in ("dorefa", "uniform") and not opts.get("per_channel", False):
        assert len(np.unique(got)) <= q.num_levels


@pytest.mark.parametrize("k", range(1, 9))
def test_dorefa_levels_are_the_k_bit_grid(k):
    shape, axes = KERNELS["conv2d"]
    w = _kernel(shape, axes, seed=k) * 3.0
    got = _quantize_np(quantizers.DoReFa(num_bits=k), w, axes)
    n = 2**k - 1
    levels = 2.0 * np.arange(n + 1) / n - 1.0
    dist = np.min(np.abs(got[..., None] - levels), axis=-1)
    assert np.max(dist) <= 1e-6
    # The weight of largest magnitude maps to an extreme level, -1 or +1.
    i = np.argmax(np.abs(w))
    assert got.flat[i] == np.sign(w.flat[i])
    if k == 1:
        np.testing.assert_array_equal(got, np.where(w > 0, 1.0, -1.0))


def test_dorefa_pre_quantize_matches_numpy():
    shape, axes = KERNELS["dense"]
    w = _kernel(shape, axes, seed=3)
    got = np.asarray(quantizers.DoReFa(num_bits=2).pre_quantize(tf.constant(w)))
    np.testing.assert_allclose(got, ref_dorefa_tilde(w), rtol=1e-6, atol=1e-7)
    assert got.min() >= 0.0 and got.max() <= 1.0
    i = np.argmax(np.abs(w))
    assert got.flat[i] == (1.0 if w.flat[i] > 0 else 0.0)


def test_dorefa_k1_maps_zero_to_minus_one():
    w = np.array([[0.0, 0.3], [-0.2, 0.0], [0.0, 0.1]], np.float32)
    got = _quantize_np(quantizers.DoReFa(num_bits=1), w, (-1,))
    np.testing.assert_array_equal(got, [[-1, 1], [-1, -1], [-1, 1]])


@pytest.mark.parametrize("k", range(2, 9))
def test_dorefa_rounds_half_to_even(k):
    n = 2**k - 1
    j = np.arange(n, dtype=np.float64)
    x = ((j + 0.5) / n).astype(np.float32)
    # Keep the inputs whose float32 product n * x is exactly j + 0.5.
    exact = np.float32(n) * x == (j + 0.5).astype(np.float32)
    assert exact.sum() >= 2
    x, j = x[exact], j[exact]
    got = np.asarray(quantizers.DoReFa(num_bits=k).quantize(tf.constant(x)))
    expected = 2.0 * (2.0 * np.floor((j + 1) / 2)) / n - 1.0  # nearest even
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # The float32 product lands on the half exactly; numpy rounds it to even.
    codes = np.round(np.float32(n) * x)
    np.testing.assert_array_equal(codes, 2.0 * np.floor((j + 1) / 2))
    np.testing.assert_allclose(got, 2.0 * codes / n - 1.0, rtol=0, atol=1e-6)
    # Half-up rounding would give a different level for every even j.
    half_up = 2.0 * np.floor(j + 1) / n - 1.0
    assert np.any(np.abs(got - half_up) > 1e-3)


@pytest.mark.parametrize("k", range(2, 9))
@pytest.mark.parametrize("per_channel", [True, False])
def test_uniform_rounds_half_to_even(k, per_channel):
    n = 2 ** (k - 1) - 1
    halves = np.arange(n) + 0.5  # 0.5, 1.5, ..., n - 0.5
    col = np.concatenate([halves, -halves, [n]])  # max |W| = n: s = 1
    # Two channels, steps 1 and 0.25 (exact powers of two).
    w = np.stack([col, 0.25 * col], axis=-1).astype(np.float32)
    if not per_channel:
        w[:, 1] = w[:, 0]  # one tensor-wide step s = 1
    got = _quantize_np(
        quantizers.Uniform(num_bits=k, per_channel=per_channel), w, (-1,)
    )
    steps = np.array([1.0, 0.25 if per_channel else 1.0])
    codes = got / steps
    expected = np.round(w / steps)  # numpy rounds half to even
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(got, ref_uniform(w, k, (-1,), per_channel))
    assert codes[0, 0] == 0.0  # 0.5 -> 0
    if n >= 2:
        assert codes[1, 0] == 2.0 and codes[n + 1, 0] == -2.0  # 1.5 -> 2
    if n >= 3:
        assert codes[2, 0] == 2.0  # 2.5 -> 2
    assert np.all(np.abs(codes) <= n)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_uniform_codes_are_integers_within_range(k):
    shape, axes = KERNELS["depthwise"]
    w = _kernel(shape, axes, seed=k)
    q = quantizers.Uniform(num_bits=k)
    got = _quantize_np(q, w, axes)
    s = np.asarray(q.scale(tf.constant(w), axes))
    np.testing.assert_allclose(s, ref_uniform_scale(w, k, axes, True), rtol=1e-6)
    codes = got / s
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    n = 2 ** (k - 1) - 1
    assert np.max(np.abs(np.round(codes))) == n


@pytest.mark.parametrize("per_channel", [False, True])
def test_bwn_sign_of_zero_is_plus_one(per_channel):
    # Deliberate deviation from the reference's sign(0) = 0: two levels only.
    w = np.array([[0.0, 0.5], [2.0, -0.25], [-1.0, 0.0]], np.float32)
    got = _quantize_np(quantizers.BWN(per_channel=per_channel), w, (-1,))
    alpha = np.mean(np.abs(w), axis=0) if per_channel else np.mean(np.abs(w))
    assert np.all(got[0, 0] == (alpha[0] if per_channel else alpha))
    # Zeros still count in alpha = mean|W|.
    expected = np.where(w >= 0, 1.0, -1.0) * alpha
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_ternary_alpha_and_threshold():
    # mean|W| = 1.0, delta = 0.7: 0.68 and 0.6 drop, 0.72 and up keep.
    w = np.array([0.68, -0.72, -0.6, 1.4, -1.5, 0.0, 2.1], np.float32)[:, None]
    got = _quantize_np(quantizers.Ternary(), w, (-1,))
    alpha = (0.72 + 1.4 + 1.5 + 2.1) / 4.0
    np.testing.assert_allclose(
        got[:, 0], [0, -alpha, 0, alpha, -alpha, 0, alpha], rtol=1e-6
    )
    assert len(np.unique(got)) == 3


@pytest.mark.parametrize("qparam", QUANTIZERS, ids=_qid)
def test_all_zero_kernel_gives_finite_values(qparam):
    name, opts = qparam
    q = _make(name, opts)
    shape, axes = KERNELS["conv2d"]
    w = np.zeros(shape, np.float32)
    got = _quantize_np(q, w, axes)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref_forward(name, opts, w, axes), atol=1e-7)
    calib = np.asarray(q.calibration(tf.constant(w), axes))
    assert np.all(np.isfinite(calib))
    g = _grad(lambda x: q(x, axes), w, np.ones(shape, np.float32))
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("qparam", [p for p in QUANTIZERS if p[1].get("per_channel")],
                         ids=_qid)
def test_per_channel_zero_channel_stays_zero(qparam):
    name, opts = qparam
    shape, axes = KERNELS["dense"]
    w = _kernel(shape, axes, seed=5)
    w[:, 2] = 0.0
    got = _quantize_np(_make(name, opts), w, axes)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[:, 2], 0.0)
    np.testing.assert_allclose(got, ref_forward(name, opts, w, axes),
                               rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Backward (STE).
# --------------------------------------------------------------------------


def _upstream(shape, seed=7):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("kernel", ["dense", "depthwise"])
def test_dorefa_quantize_grad_is_twice_upstream(k, kernel):
    shape, axes = KERNELS[kernel]
    q = quantizers.DoReFa(num_bits=k)
    w_tilde = ref_dorefa_tilde(_kernel(shape, axes)).astype(np.float32)
    up = _upstream(shape)
    got = _grad(lambda x: q.quantize(x, axes), w_tilde, up)
    np.testing.assert_allclose(got, 2.0 * up, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("kernel", ["conv2d", "conv2d_transpose"])
def test_dorefa_full_chain_grad(k, kernel):
    shape, axes = KERNELS[kernel]
    q = quantizers.DoReFa(num_bits=k)
    w = _kernel(shape, axes, seed=11)
    up = _upstream(shape)
    got = _grad(lambda x: q(x, axes), w, up)
    t = np.tanh(w.astype(np.float64))
    expected = (1.0 - t**2) / np.max(np.abs(t)) * up
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def ref_bwn_alpha(w, channel_axes, per_channel):
    axes = _stat_axes(w, channel_axes, per_channel)
    return np.mean(np.abs(w.astype(np.float64)), axis=axes, keepdims=True)


def ref_ternary_alpha(w, channel_axes, per_channel):
    w = w.astype(np.float64)
    axes = _stat_axes(w, channel_axes, per_channel)
    a = np.abs(w)
    mask = a > 0.7 * np.mean(a, axis=axes, keepdims=True)
    count = np.sum(mask, axis=axes, keepdims=True)
    return np.sum(a * mask, axis=axes, keepdims=True) / np.maximum(count, 1)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("name", ["bwn", "ternary"])
@pytest.mark.parametrize("kernel", ["conv2d", "depthwise", "conv2d_transpose"])
def test_scaled_sign_grad_carries_alpha_and_gate(name, per_channel, kernel):
    """The official code's `alpha * Function_BWN(W)`: dL/dW = alpha g 1[|W|<=1]."""
    shape, axes = KERNELS[kernel]
    cls = quantizers.BWN if name == "bwn" else quantizers.Ternary
    q = cls(per_channel=per_channel)
    w = _kernel(shape, axes, seed=2) * 2.0
    w.flat[:4] = [1.0, -1.0, 1.0000001, -1.0000001]  # gate boundary
    up = _upstream(shape)
    ref_alpha = ref_bwn_alpha if name == "bwn" else ref_ternary_alpha
    alpha = ref_alpha(w, axes, per_channel)
    expected = alpha * up * (np.abs(w) <= 1.0)
    for fn in (lambda x: q.quantize(x, axes), lambda x: q(x, axes)):
        got = _grad(fn, w, up)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    assert 0.1 < np.mean(np.abs(w) <= 1.0) < 0.9  # both branches exercised
    assert got.flat[0] != 0.0 and got.flat[2] == 0.0
    if per_channel:  # channels have different alphas, so different slopes
        assert np.unique(np.round(alpha, 6)).size > 1


def test_bwn_first_update_matches_reference_scale():
    """One SGD step of an STE-trained BWN kernel moves by lr * alpha * g.

    The scale the issue measured: without alpha the update was 1/alpha
    times the official code's in every element.
    """
    w = _kernel((3, 3, 2, 4), (-1,), seed=5) * 0.1
    assert np.all(np.abs(w) <= 1.0)  # every element passes the gate
    up = _upstream(w.shape, seed=6)
    q = quantizers.BWN()
    g = _grad(lambda x: q(x, (-1,)), w, up)
    alpha = np.mean(np.abs(w.astype(np.float64)))
    np.testing.assert_allclose(g / up, alpha, rtol=1e-6)


@pytest.mark.parametrize(
    "q",
    [
        quantizers.Uniform(num_bits=2),
        quantizers.Uniform(num_bits=4, per_channel=False),
        quantizers.Uniform(num_bits=8),
    ],
    ids=repr,
)
@pytest.mark.parametrize("kernel", ["dense", "depthwise"])
def test_identity_ste_grad(q, kernel):
    shape, axes = KERNELS[kernel]
    w = _kernel(shape, axes, seed=4) * 4.0  # well outside [-1, 1] too
    up = _upstream(shape)
    for fn in (lambda x: q.quantize(x, axes), lambda x: q(x, axes)):
        np.testing.assert_array_equal(_grad(fn, w, up), up)


# --------------------------------------------------------------------------
# Calibration.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("kernel", ["dense", "conv2d"])
def test_dorefa_calibration_times_ghat_is_ste_grad(k, kernel):
    shape, axes = KERNELS[kernel]
    q = quantizers.DoReFa(num_bits=k)
    w = tf.constant(_kernel(shape, axes, seed=k))
    c = tf.constant(_upstream(shape, seed=k + 100))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(w)
        w_hat = q(w, axes)
        loss = tf.reduce_sum(c * w_hat + 0.5 * c * tf.square(w_hat))
    g_w = np.asarray(tape.gradient(loss, w))
    g_hat = np.asarray(tape.gradient(loss, w_hat))
    del tape
    calib = np.asarray(q.calibration(w, axes))
    # 1 - tanh^2 cancels: float32 tanh costs up to ~1e-6 absolute here.
    np.testing.assert_allclose(calib, ref_dorefa_calib(w.numpy()),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(calib * g_hat, g_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_hat, c.numpy() * (1.0 + w_hat.numpy()),
                               rtol=1e-6, atol=1e-7)


def test_calibration_is_a_constant():
    w = tf.constant(_kernel((8, 4), (-1,)))
    with tf.GradientTape() as tape:
        tape.watch(w)
        total = tf.reduce_sum(quantizers.DoReFa(num_bits=2).calibration(w))
    assert tape.gradient(total, w) is None


@pytest.mark.parametrize(
    "q",
    [
        quantizers.BWN(),
        quantizers.BWN(per_channel=True),
        quantizers.Ternary(),
        quantizers.Ternary(per_channel=True),
        quantizers.Uniform(num_bits=3),
        quantizers.Uniform(num_bits=8, per_channel=False),
    ],
    ids=repr,
)
def test_calibration_is_one_for_linear_quantizers(q):
    shape, axes = KERNELS["conv2d"]
    w = tf.constant(_kernel(shape, axes))
    calib = np.asarray(q.calibration(w, axes))
    np.testing.assert_array_equal(np.broadcast_to(calib, shape), 1.0)
    np.testing.assert_array_equal(np.asarray(q.pre_quantize(w, axes)), w.numpy())


# --------------------------------------------------------------------------
# get / serialization.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls, bits",
    [
        ("dorefa", quantizers.DoReFa, 1),
        ("DoReFa", quantizers.DoReFa, 1),
        ("bwn", quantizers.BWN, 1),
        ("ternary", quantizers.Ternary, 2),
        ("uniform", quantizers.Uniform, 8),
    ],
)
def test_get_by_name_default_bits(name, cls, bits):
    q = quantizers.get(name)
    assert type(q) is cls and q.num_bits == bits


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("dorefa", {"num_bits": 4}, quantizers.DoReFa(num_bits=4)),
        ("bwn", {"per_channel": True}, quantizers.BWN(per_channel=True)),
        ("ternary", {"per_channel": True}, quantizers.Ternary(per_channel=True)),
        ("uniform", {"num_bits": 3, "per_channel": False},
         quantizers.Uniform(num_bits=3, per_channel=False)),
    ],
)
def test_get_with_options(name, kwargs, expected):
    q = quantizers.get(name, **kwargs)
    assert q == expected and q.get_config() == expected.get_config()


@pytest.mark.parametrize("qparam", QUANTIZERS[::3], ids=_qid)
def test_get_instance_passthrough_and_dict_round_trip(qparam):
    q = _make(*qparam)
    assert quantizers.get(q) is q
    blob = keras.saving.serialize_keras_object(q)
    assert isinstance(blob, dict)
    restored = keras.saving.deserialize_keras_object(blob)
    assert type(restored) is type(q) and restored == q
    assert restored.get_config() == q.get_config()
    via_get = quantizers.get(blob)
    assert via_get == q and via_get is not q
    assert quantizers.serialize(q) == blob


def _allowed(values):
    return re.escape(str(list(values)))


@pytest.mark.parametrize(
    "name, bits, allowed",
    [
        ("dorefa", 0, range(1, 9)),
        ("dorefa", 9, range(1, 9)),
        ("dorefa", 1.5, range(1, 9)),
        ("dorefa", True, range(1, 9)),
        ("dorefa", "2", range(1, 9)),
        ("bwn", 2, [1]),
        ("ternary", 3, [2]),
        ("ternary", 1, [2]),
        ("uniform", 1, range(2, 9)),
        ("uniform", 9, range(2, 9)),
        ("uniform", 4.0, range(2, 9)),
    ],
)
def test_invalid_bits_raise_value_error_naming_allowed_values(name, bits, allowed):
    with pytest.raises(ValueError, match=_allowed(allowed)):
        quantizers.get(name, num_bits=bits)
    with pytest.raises(ValueError, match=_allowed(allowed)):
        _CLASSES[name](num_bits=bits)


@pytest.mark.parametrize("identifier", ["sign", "dorefa1", "", "xnor"])
def test_unknown_name_raises_value_error_naming_allowed_names(identifier):
    with pytest.raises(
        ValueError, match=_allowed(["bwn", "dorefa", "ternary", "uniform"])
    ):
        quantizers.get(identifier)


@pytest.mark.parametrize("identifier", [None, 3, 1.0])
def test_get_rejects_non_identifiers(identifier):
    with pytest.raises(ValueError, match="string, a dict or a Quantizer"):
        quantizers.get(identifier)


def test_get_rejects_unknown_option():
    with pytest.raises(ValueError, match="Bad option"):
        quantizers.get("dorefa", per_channel=True)


@pytest.mark.parametrize(
    "q, levels, bits",
    [
        (quantizers.DoReFa(num_bits=1), 2, 1),
        (quantizers.DoReFa(num_bits=4), 16, 4),
        (quantizers.BWN(), 2, 1),
        (quantizers.Ternary(), 3, 2),
        (quantizers.Uniform(num_bits=2), 3, 2),
        (quantizers.Uniform(num_bits=8), 255, 8),
    ],
    ids=repr,
)
def test_num_levels_and_bits(q, levels, bits):
    assert q.num_levels == levels and q.bits_per_weight == bits


def test_num_scales():
    shape, axes = KERNELS["depthwise"]
    assert quantizers.DoReFa(num_bits=2).num_scales(shape, axes) == 0
    assert quantizers.BWN().num_scales(shape, axes) == 1
    assert quantizers.BWN(per_channel=True).num_scales(shape, axes) == 8
    assert quantizers.Uniform(num_bits=4).num_scales(shape, axes) == 8
    assert quantizers.Ternary(per_channel=True).num_scales((3, 3, 6, 4), (-2,)) == 6
