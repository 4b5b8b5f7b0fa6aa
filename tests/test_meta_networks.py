"""Tests of `mq_keras.meta_networks` against independent NumPy references.

Each reference below is written from METAQUANT.md section 4 and the class
docstrings, in float64, from the layer's own weight values:

* FC-Grad: `m = (g @ W1) @ W2`.
* MultiFC: `m = g * f(w_tilde)`, `f` bias-free linear layers 1 -> H -> H -> 1
  with an optional activation between them.
* LSTMFC: one LSTM step, gate order (i, f, g, o),
  `z = x @ K + b_ih + h @ R + b_hh`, then `m = g * (h' @ w + b)`.
* GainMLP: per-kernel normalised inputs, a tanh MLP and
  `m = g * max_gain ** tanh(z)`.

Initialisation follows PyTorch: Linear U(+-1/sqrt(fan_in)), LSTM U(+-1/sqrt(H)).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mq_keras import meta_networks

NAMES = {
    "fc_grad": meta_networks.FCGrad,
    "multifc": meta_networks.MultiFC,
    "lstmfc": meta_networks.LSTMFC,
    "gain_mlp": meta_networks.GainMLP,
}


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def _built(cls, **kwargs):
    layer = cls(**kwargs)
    layer.build()
    return layer


def _col(values):
    return tf.constant(np.asarray(values, np.float32).reshape(-1, 1))


def _inputs(n=37, seed=0):
    """Random `(g, w_tilde)` columns: g ~ N(0, 1e-2), w_tilde in [0, 1]."""
    rng = np.random.default_rng(seed)
    g = 1e-2 * rng.standard_normal((n, 1))
    w = rng.uniform(0.0, 1.0, (n, 1))
    return g.astype(np.float32), w.astype(np.float32)


def _call(layer, g, w, state=(), segment_ids=None, num_segments=1):
    if segment_ids is not None:
        segment_ids = tf.constant(np.asarray(segment_ids))
    m, new_state = layer.call(
        tf.constant(g), tf.constant(w), state,
        segment_ids=segment_ids, num_segments=num_segments,
    )
    return np.asarray(m), tuple(np.asarray(s) for s in new_state)


def _randomise(layer, scale=1.0, seed=0):
    """Replaces every weight of `layer` by N(0, scale^2) draws."""
    rng = np.random.default_rng(seed)
    layer.set_weights(
        [scale * rng.standard_normal(w.shape).astype(np.float32)
         for w in layer.get_weights()]
    )


def _np(v):
    return np.asarray(v, np.float64)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------
# NumPy references.
# --------------------------------------------------------------------------


def ref_fc_grad(layer, g):
    return _np(g) @ _np(layer.w1) @ _np(layer.w2)


def ref_multifc(layer, g, w, activation=None):
    act = {None: lambda x: x, "relu": lambda x: np.maximum(x, 0.0)}[activation]
    x = _np(w)
    kernels = [_np(k) for k in layer.kernels]
    for i, k in enumerate(kernels):
        x = x @ k
        if i < len(kernels) - 1:
            x = act(x)
    return _np(g) * x


def ref_lstmfc(layer, g, w, h, c):
    hs = layer.hidden_size
    z = (_np(w) @ _np(layer.kernel) + _np(layer.bias_ih)
         + _np(h) @ _np(layer.recurrent_kernel) + _np(layer.bias_hh))
    zi, zf, zg, zo = (z[:, i * hs:(i + 1) * hs] for i in range(4))
    c_new = _sigmoid(zf) * _np(c) + _sigmoid(zi) * np.tanh(zg)
    h_new = _sigmoid(zo) * np.tanh(c_new)
    out = h_new @ _np(layer.fc_kernel) + _np(layer.fc_bias)
    return _np(g) * out, h_new, c_new


def _segment_mean(x, segment_ids, num_segments):
    if segment_ids is None:
        return np.mean(x, axis=0, keepdims=True)
    seg = np.asarray(segment_ids)
    means = np.zeros((num_segments,) + x.shape[1:])
    for s in range(num_segments):
        if np.any(seg == s):
            means[s] = np.mean(x[seg == s], axis=0)
    return means[seg]


def ref_gain_mlp(layer, g, w, segment_ids=None, num_segments=1):
    g, w = _np(g), _np(w)
    mean = lambda x: _segment_mean(x, segment_ids, num_segments)  # noqa: E731
    g_n = g / np.sqrt(mean(g**2))
    w_c = w - mean(w)
    w_n = w_c / np.sqrt(mean(w_c**2))
    x = np.concatenate([g_n, w_n], axis=-1)
    x = np.tanh(x @ _np(layer.w1) + _np(layer.b1))
    x = np.tanh(x @ _np(layer.w2) + _np(layer.b2))
    z = x @ _np(layer.w3) + _np(layer.b3)
    return g * layer.max_gain ** np.tanh(z)


# --------------------------------------------------------------------------
# Forward against the references.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_fc_grad_forward(seed):
    layer = _built(meta_networks.FCGrad, seed=seed)
    g, w = _inputs(seed=seed)
    m, state = _call(layer, g, w)
    assert m.shape == (37, 1) and state == ()
    np.testing.assert_allclose(m, ref_fc_grad(layer, g), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("randomise", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_multifc_forward(activation, randomise):
    layer = _built(meta_networks.MultiFC, seed=3, activation=activation)
    assert len(layer.kernels) == 3
    assert [tuple(k.shape) for k in layer.kernels] == [(1, 100), (100, 100), (100, 1)]
    if randomise:
        _randomise(layer, scale=0.3, seed=3)
    g, w = _inputs(seed=3)
    w = w * 2.0 - 1.0  # both signs, so relu matters
    m, state = _call(layer, g, w)
    assert m.shape == (37, 1) and state == ()
    expected = ref_multifc(layer, g, w, activation)
    np.testing.assert_allclose(m, expected, rtol=1e-5, atol=1e-9)
    # relu really changes the output (catches an ignored activation).
    other = ref_multifc(layer, g, w, "relu" if activation is None else None)
    assert np.max(np.abs(other - expected)) > 1e-2 * np.max(np.abs(expected))
    if randomise:  # f(w_tilde) < 0 somewhere: no activation on the output
        assert np.any(expected / g < -1e-3)


@pytest.mark.parametrize("zero_state", [True, False])
def test_lstmfc_forward(zero_state):
    hs = 16
    layer = _built(meta_networks.LSTMFC, hidden_size=hs, seed=5)
    _randomise(layer, scale=0.5, seed=5)  # gates far from the init's ~0.5
    g, w = _inputs(seed=5)
    rng = np.random.default_rng(6)
    if zero_state:
        h = c = np.zeros((37, hs), np.float32)
        state = ()
    else:
        h = rng.uniform(-1, 1, (37, hs)).astype(np.float32)
        c = rng.standard_normal((37, hs)).astype(np.float32)
        state = (tf.constant(h), tf.constant(c))
    m, (h_new, c_new) = _call(layer, g, w, state)
    m_ref, h_ref, c_ref = ref_lstmfc(layer, g, w, h, c)
    assert h_new.shape == (37, hs) and c_new.shape == (37, hs)
    np.testing.assert_allclose(h_new, h_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_new, c_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m, m_ref, rtol=1e-5, atol=1e-8)
    if zero_state:  # an explicit zero state equals the default one
        zeros = tuple(tf.zeros((37, hs)) for _ in range(2))
        m0, (h0, c0) = _call(layer, g, w, zeros)
        np.testing.assert_array_equal(m0, m)
        np.testing.assert_array_equal(h0, h_new)
        np.testing.assert_array_equal(c0, c_new)
        init = layer.initial_state(37)
        assert len(init) == 2 and all(np.all(np.asarray(s) == 0) for s in init)
        assert all(tuple(s.shape) == (37, hs) for s in init)


def test_lstmfc_gate_order_is_i_f_g_o():
    """Each gate block, driven alone, does what its position says."""
    hs = 4
    layer = _built(meta_networks.LSTMFC, hidden_size=hs, seed=0)
    zeros = [np.zeros(w.shape, np.float32) for w in layer.get_weights()]
    kernel, rec, b_ih, b_hh, fc_k, fc_b = zeros
    fc_k[:] = 1.0
    big = 20.0
    # i open, f open, g = tanh(1), o open; c_prev = 2.
    b_ih[:hs] = big         # i
    b_ih[hs:2 * hs] = big   # f
    b_hh[2 * hs:3 * hs] = 1.0  # g
    b_ih[3 * hs:] = big     # o
    layer.set_weights([kernel, rec, b_ih, b_hh, fc_k, fc_b])
    state = (tf.zeros((1, hs)), tf.fill((1, hs), 2.0))
    _, (h, c) = _call(layer, _col([1.0]), _col([0.0]), state)
    np.testing.assert_allclose(c, 2.0 + np.tanh(1.0), rtol=1e-5)
    # Close the forget gate only: c' = tanh(1).
    b_ih[hs:2 * hs] = -big
    layer.set_weights([kernel, rec, b_ih, b_hh, fc_k, fc_b])
    _, (h, c) = _call(layer, _col([1.0]), _col([0.0]), state)
    np.testing.assert_allclose(c, np.tanh(1.0), rtol=1e-5)
    # Close the output gate only: h' = 0, m = g * fc_bias = 0.
    b_ih[hs:2 * hs] = big
    b_ih[3 * hs:] = -big
    layer.set_weights([kernel, rec, b_ih, b_hh, fc_k, fc_b])
    m, (h, c) = _call(layer, _col([1.0]), _col([0.0]), state)
    np.testing.assert_allclose(h, 0.0, atol=1e-6)
    np.testing.assert_allclose(c, 2.0 + np.tanh(1.0), rtol=1e-5)


@pytest.mark.parametrize("segments", [None, 1, 3])
def test_gain_mlp_forward(segments):
    layer = _built(meta_networks.GainMLP, seed=2, hidden_size=8)
    _randomise(layer, scale=1.0, seed=2)
    g, w = _inputs(n=60, seed=2)
    seg = None
    if segments is not None:
        seg = np.random.default_rng(3).integers(0, segments, 60).astype(np.int32)
        seg[:segments] = np.arange(segments)  # no empty segment
    m, state = _call(layer, g, w, segment_ids=seg,
                     num_segments=segments or 1)
    assert state == ()
    expected = ref_gain_mlp(layer, g, w, seg, segments or 1)
    np.testing.assert_allclose(m, expected, rtol=1e-5, atol=1e-9)
    gain = m / g
    assert np.all(gain > 1 / layer.max_gain) and np.all(gain < layer.max_gain)
    assert np.std(gain) > 1e-2  # the randomised net is not a constant gain


# --------------------------------------------------------------------------
# Initialisation.
# --------------------------------------------------------------------------


def _check_uniform(values, bound, name):
    v = np.asarray(values).ravel()
    assert np.all(np.abs(v) <= bound), f"{name} outside U(-{bound}, {bound})"
    if v.size >= 100:
        assert np.max(np.abs(v)) > 0.5 * bound, f"{name} range not used"
        assert np.min(v) < -0.25 * bound and np.max(v) > 0.25 * bound, name
    if v.size >= 1000:  # the std of U(-b, b) is b / sqrt(3)
        np.testing.assert_allclose(np.std(v), bound / np.sqrt(3), rtol=0.05)
        assert abs(np.mean(v)) < 0.05 * bound


def test_fc_grad_init_ranges():
    layer = _built(meta_networks.FCGrad, seed=0)
    assert tuple(layer.w1.shape) == (1, 100) and tuple(layer.w2.shape) == (100, 1)
    _check_uniform(layer.w1, 1.0, "w1")
    _check_uniform(layer.w2, 0.1, "w2")


def test_multifc_init_ranges():
    layer = _built(meta_networks.MultiFC, seed=0)
    w0, w1, w2 = layer.get_weights()
    _check_uniform(w0, 1.0, "w0")
    _check_uniform(w1, 0.1, "w1")
    _check_uniform(w2, 0.1, "w2")
    assert np.max(np.abs(w1)) > 0.09


def test_lstmfc_init_ranges_and_shapes():
    layer = _built(meta_networks.LSTMFC, seed=0)
    names = ["kernel", "recurrent_kernel", "bias_ih", "bias_hh",
             "fc_kernel", "fc_bias"]
    shapes = [(1, 400), (100, 400), (400,), (400,), (100, 1), (1,)]
    weights = layer.get_weights()
    assert [w.shape for w in weights] == shapes
    assert len(layer.trainable_variables) == 6
    for name, w in zip(names, weights):
        _check_uniform(w, 0.1, name)
    # Independent draws, not one stream reused.
    assert not np.array_equal(weights[2], weights[3])
    assert not np.array_equal(weights[0][0], weights[1][0])


def test_gain_mlp_init():
    layer = _built(meta_networks.GainMLP, seed=0)
    np.testing.assert_array_equal(layer.w3.numpy(), 0.0)
    np.testing.assert_array_equal(layer.b3.numpy(), 0.0)
    assert np.max(np.abs(layer.w1.numpy())) > 0.1


@pytest.mark.parametrize("name", sorted(NAMES))
def test_same_seed_gives_identical_weights(name):
    a = _built(NAMES[name], seed=11, hidden_size=16)
    b = _built(NAMES[name], seed=11, hidden_size=16)
    c = _built(NAMES[name], seed=12, hidden_size=16)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert any(
        not np.array_equal(wa, wc) for wa, wc in zip(a.get_weights(), c.get_weights())
    )


# --------------------------------------------------------------------------
# Structural properties.
# --------------------------------------------------------------------------


def test_fc_grad_collapses_to_a_scalar():
    layer = _built(meta_networks.FCGrad, seed=4)
    k = float((_np(layer.w1) @ _np(layer.w2))[0, 0])
    g, w = _inputs(seed=4)
    m, _ = _call(layer, g, w)
    np.testing.assert_allclose(m, k * _np(g), rtol=1e-5, atol=1e-10)
    # w_tilde is ignored.
    m2, _ = _call(layer, g, w[::-1].copy() * 7.0)
    np.testing.assert_array_equal(m, m2)


def test_multifc_collapses_to_a_scalar():
    layer = _built(meta_networks.MultiFC, seed=4)
    k = float(np.linalg.multi_dot([_np(w) for w in layer.kernels])[0, 0])
    g, w = _inputs(seed=4)
    m, _ = _call(layer, g, w)
    np.testing.assert_allclose(m, k * _np(w) * _np(g), rtol=1e-5, atol=1e-10)


def test_gain_mlp_starts_near_the_ste():
    layer = _built(meta_networks.GainMLP, seed=0)
    g, w = _inputs(n=200, seed=0)
    m, _ = _call(layer, g, w)
    np.testing.assert_allclose(m, g, rtol=3e-7, atol=0)


def test_gain_mlp_starts_exactly_at_the_ste():
    layer = _built(meta_networks.GainMLP, seed=0)
    g, w = _inputs(n=200, seed=0)
    m, _ = _call(layer, g, w)
    np.testing.assert_array_equal(m, g)


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_gain_mlp_never_flips_the_sign(scale):
    layer = _built(meta_networks.GainMLP, seed=1)
    _randomise(layer, scale=scale, seed=1)
    g, w = _inputs(n=300, seed=1)
    m, _ = _call(layer, g, w)
    assert np.all(m * g >= 0)
    assert np.all(np.abs(m) <= layer.max_gain * np.abs(g) * (1 + 1e-6))
    gain = m / g
    assert gain.min() < 0.9 and gain.max() > 1.1  # randomisation mattered


def _random_gain_mlp(seed=0):
    layer = _built(meta_networks.GainMLP, seed=seed, hidden_size=16)
    _randomise(layer, scale=1.0, seed=seed)
    return layer


def test_gain_mlp_is_invariant_to_gradient_scale():
    layer = _random_gain_mlp()
    g, w = _inputs(n=64, seed=7)
    m, _ = _call(layer, g, w)
    m_big, _ = _call(layer, g * 1000.0, w)
    np.testing.assert_allclose(m_big, 1000.0 * m, rtol=1e-5)
    m_small, _ = _call(layer, g / 16.0, w)
    np.testing.assert_allclose(m_small, m / 16.0, rtol=1e-5)


def test_gain_mlp_is_invariant_to_small_gradient_scale():
    layer = _random_gain_mlp()
    g, w = _inputs(n=64, seed=7)  # rms(g) ~ 1e-2
    m, _ = _call(layer, g, w)
    m_small, _ = _call(layer, g * 1e-3, w)  # rms(g) ~ 1e-5
    np.testing.assert_allclose(m_small, 1e-3 * m, rtol=1e-4)


def test_gain_mlp_is_invariant_to_weight_scale_and_shift():
    layer = _random_gain_mlp()
    g, w = _inputs(n=64, seed=8)
    m, _ = _call(layer, g, w)
    m2, _ = _call(layer, g, w * 1000.0 - 250.0)
    np.testing.assert_allclose(m2, m, rtol=1e-5)


def test_gain_mlp_segments_are_normalised_independently():
    layer = _random_gain_mlp(seed=3)
    rng = np.random.default_rng(9)
    ga, wa = _inputs(n=40, seed=10)
    gb = 1e3 * rng.standard_normal((60, 1)).astype(np.float32)
    wb = (50.0 * rng.standard_normal((60, 1)) + 10.0).astype(np.float32)
    # Interleave the two kernels' rows.
    seg = np.array([0] * 40 + [1] * 60, np.int64)  # as MetaQuantModel passes
    order = rng.permutation(100)
    g = np.concatenate([ga, gb])[order]
    w = np.concatenate([wa, wb])[order]
    seg = seg[order]
    m, _ = _call(layer, g, w, segment_ids=seg, num_segments=2)
    m_a, _ = _call(layer, ga, wa)
    m_b, _ = _call(layer, gb, wb)
    m_sep = np.concatenate([m_a, m_b])[order]
    np.testing.assert_allclose(m, m_sep, rtol=1e-5)
    np.testing.assert_allclose(
        m, ref_gain_mlp(layer, g, w, seg, 2), rtol=1e-5, atol=1e-12
    )
    # Rescaling one kernel only rescales that kernel's output.
    g2 = np.where(seg[:, None] == 1, g * 1e-3, g).astype(np.float32)
    w2 = np.where(seg[:, None] == 0, w * 100.0 + 3.0, w).astype(np.float32)
    m2, _ = _call(layer, g2, w2, segment_ids=seg, num_segments=2)
    expected = np.where(seg[:, None] == 1, m * 1e-3, m)
    np.testing.assert_allclose(m2, expected, rtol=1e-5)
    # Without segment ids the statistics mix the kernels: different output.
    m_mixed, _ = _call(layer, g, w)
    assert np.max(np.abs(m_mixed - m) / np.abs(m)) > 1e-2


def test_gain_mlp_constant_weights_give_finite_output():
    layer = _random_gain_mlp()
    g, _ = _inputs(n=10, seed=1)
    m, _ = _call(layer, g, np.full((10, 1), 0.5, np.float32))
    assert np.all(np.isfinite(m)) and np.all(m * g >= 0)


# --------------------------------------------------------------------------
# g = 0 gives m = 0 exactly.
# --------------------------------------------------------------------------


def _zero_grad_cases():
    return [
        ("fc_grad", {}, False),
        ("multifc", {}, False),
        ("multifc", {"activation": "relu"}, False),
        ("lstmfc", {}, False),
        ("lstmfc", {}, True),
        ("gain_mlp", {}, False),
        ("gain_mlp", {}, True),
    ]


@pytest.mark.parametrize("name, kwargs, randomise", _zero_grad_cases())
def test_zero_gradient_gives_zero_output(name, kwargs, randomise):
    layer = _built(NAMES[name], seed=0, hidden_size=16, **kwargs)
    if randomise:
        _randomise(layer, scale=2.0, seed=4)
    n = 25
    _, w = _inputs(n=n, seed=2)
    state = ()
    if name == "lstmfc" and randomise:
        rng = np.random.default_rng(1)
        state = tuple(tf.constant(rng.standard_normal((n, 16)).astype(np.float32))
                      for _ in range(2))
    zeros = np.zeros((n, 1), np.float32)
    m, _ = _call(layer, zeros, w, state)
    np.testing.assert_array_equal(m, zeros)
    seg = np.arange(n) % 2
    m, _ = _call(layer, zeros, w, state, segment_ids=seg, num_segments=2)
    np.testing.assert_array_equal(m, zeros)
    # Rows with g = 0 stay zero when the others are not.
    g, _ = _inputs(n=n, seed=3)
    g[::3] = 0.0
    m, _ = _call(layer, g, w, state)
    np.testing.assert_array_equal(m[::3], 0.0)
    assert np.all(np.isfinite(m)) and np.count_nonzero(m) > 0


# --------------------------------------------------------------------------
# get / serialization.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NAMES))
def test_get_by_name(name):
    layer = meta_networks.get(name, hidden_size=8)
    assert type(layer) is NAMES[name] and layer.hidden_size == 8
    assert type(meta_networks.get(name.upper())) is NAMES[name]


def test_get_defaults():
    assert meta_networks.get("multifc").hidden_size == 100
    assert meta_networks.get("multifc").num_layers == 3
    assert meta_networks.get("gain_mlp").hidden_size == 32
    assert meta_networks.get("gain_mlp").max_gain == 4.0
    assert meta_networks.get("lstmfc", hidden_size=7).state_size == 7
    assert meta_networks.get("fc_grad").state_size == 0


def test_get_instance_passthrough():
    layer = meta_networks.MultiFC(hidden_size=4)
    assert meta_networks.get(layer) is layer


@pytest.mark.parametrize("identifier", ["lstm", "fcgrad", "ste", "", None, 3])
def test_get_unknown_raises_listing_allowed_names(identifier):
    with pytest.raises(ValueError) as info:
        meta_networks.get(identifier)
    for name in NAMES:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("fc_grad", {}),
        ("multifc", {}),
        ("multifc", {"activation": "relu", "num_layers": 4}),
        ("lstmfc", {}),
        ("gain_mlp", {"max_gain": 3.0}),
    ],
)
def test_serialization_round_trip(name, kwargs):
    # Serialized before build: restored unbuilt, then built by hand.
    blob = keras.saving.serialize_keras_object(
        NAMES[name](hidden_size=8, seed=21, name="meta", **kwargs)
    )
    restored = keras.saving.deserialize_keras_object(blob)
    assert type(restored) is NAMES[name] and not restored.built
    restored.build()
    via_get = meta_networks.get(blob)
    assert type(via_get) is NAMES[name] and via_get is not restored
    via_get.build()
    # Serialized after build: keras rebuilds it from its build_config.
    layer = _built(NAMES[name], hidden_size=8, seed=21, name="meta", **kwargs)
    rebuilt = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)
    )
    assert rebuilt.built
    for other in (restored, via_get, rebuilt):
        assert other.get_config() == layer.get_config()
        for a, b in zip(layer.get_weights(), other.get_weights()):
            np.testing.assert_array_equal(a, b)
    # Same seed in the config: same initial weights, same function.
    g, w = _inputs(n=9, seed=1)
    w = w * 2.0 - 1.0
    np.testing.assert_array_equal(_call(restored, g, w)[0], _call(layer, g, w)[0])


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (meta_networks.FCGrad, {"hidden_size": 0}),
        (meta_networks.FCGrad, {"hidden_size": 2.0}),
        (meta_networks.MultiFC, {"num_layers": 1}),
        (meta_networks.GainMLP, {"max_gain": 1.0}),
    ],
)
def test_invalid_options_raise(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)
