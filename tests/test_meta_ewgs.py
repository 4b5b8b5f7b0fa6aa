"""Tests of `MetaEWGS` (meta_network="meta_ewgs") and `Quantizer.residual`.

The NumPy reference is written from the class docstring, in float64::

    delta_l = tanh(a_l);  gamma_l = tanh(b_l)
    f = 1 + delta_l * sign(g) * r + gamma_l * (2|r| - 1/2)
    m = g * f * ||g||_l / ||g * f||_l
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import mq_keras as mqk
from mq_keras import meta_networks, quantizers
from mq_keras.meta_apply import MetaApplication
from tiny_models import tiny_cnn


def _inputs(n=60, num_kernels=3, seed=0, scale=1e-2):
    rng = np.random.default_rng(seed)
    g = (scale * rng.standard_normal((n, 1))).astype("float32")
    r = rng.uniform(-0.5, 0.5, (n, 1)).astype("float32")
    seg = (np.arange(n) % num_kernels).astype("int32")
    return g, r, seg


def _net(num_kernels=3, delta_logit=None, gamma_logit=None, **kwargs):
    net = meta_networks.MetaEWGS(num_kernels=num_kernels, **kwargs)
    net.build()
    if delta_logit is not None:
        net.delta_logit.assign(np.asarray(delta_logit, "float32"))
    if gamma_logit is not None:
        net.gamma_logit.assign(np.asarray(gamma_logit, "float32"))
    return net


def _call(net, g, r, seg, num_kernels=3):
    m, state = net.call(tf.constant(g), tf.constant(r), (),
                        segment_ids=tf.constant(seg), num_segments=num_kernels)
    assert state == ()
    return m.numpy()


def ref_meta_ewgs(g, r, seg, a, b):
    g, r = g.astype("float64"), r.astype("float64")
    delta, gamma = np.tanh(np.asarray(a, "float64")), np.tanh(np.asarray(b, "float64"))
    f = 1 + delta[seg][:, None] * np.sign(g) * r + gamma[seg][:, None] * (2 * np.abs(r) - 0.5)
    m = g * f
    for k in np.unique(seg):
        rows = seg == k
        m[rows] *= np.linalg.norm(g[rows]) / np.linalg.norm(g[rows] * f[rows])
    return m


def _per_kernel_norms(x, seg):
    return np.array([np.linalg.norm(x[seg == k]) for k in np.unique(seg)])


LOGITS = [([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),
          ([0.7, -1.2, 0.1], [-0.4, 0.9, 2.0]),
          ([5.0, -5.0, 3.0], [-5.0, 5.0, -3.0])]  # near the bounds |delta|, |gamma| -> 1


@pytest.mark.parametrize("a, b", LOGITS)
def test_forward_matches_numpy(a, b):
    g, r, seg = _inputs()
    m = _call(_net(delta_logit=a, gamma_logit=b), g, r, seg)
    np.testing.assert_allclose(m, ref_meta_ewgs(g, r, seg, a, b), rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("a, b", LOGITS)
@pytest.mark.parametrize("scale", [1e-8, 1e-2, 1e3])
def test_norm_is_preserved_per_kernel_and_sign_never_flips(a, b, scale):
    g, r, seg = _inputs(scale=scale, seed=3)
    m = _call(_net(delta_logit=a, gamma_logit=b), g, r, seg)
    # No learning-rate multiplier in disguise: ||m||_l == ||g||_l per kernel.
    np.testing.assert_allclose(_per_kernel_norms(m, seg), _per_kernel_norms(g, seg),
                               rtol=1e-5)
    assert np.all(m * g >= 0) and np.all((m == 0) == (g == 0))


def test_invariant_to_gradient_scale_and_starts_at_the_ste():
    g, r, seg = _inputs(seed=4)
    net = _net(delta_logit=[0.5, -0.3, 1.0], gamma_logit=[0.2, 0.4, -0.8])
    m = _call(net, g, r, seg)
    for c in (1e-6, 3.0, 1e4):
        np.testing.assert_allclose(_call(net, c * g, r, seg), c * m, rtol=1e-5)
    np.testing.assert_allclose(_call(_net(), g, r, seg), g, rtol=1e-6)


def test_zero_kernel_gives_zero_and_without_segments_is_one_kernel():
    g, r, seg = _inputs(seed=5)
    g[seg == 1] = 0.0
    m = _call(_net(delta_logit=[1.0, 1.0, 1.0]), g, r, seg)
    assert np.all(np.isfinite(m)) and np.all(m[seg == 1] == 0.0)
    net = _net(num_kernels=1, delta_logit=[0.6], gamma_logit=[-0.3])
    whole, _ = net.call(tf.constant(g), tf.constant(r))
    zeros = np.zeros(len(g), "int32")
    np.testing.assert_allclose(whole.numpy(), ref_meta_ewgs(g, r, zeros, [0.6], [-0.3]),
                               rtol=2e-5, atol=1e-12)


def test_chunked_application_matches_whole():
    g, r, seg = _inputs(n=100, seed=6)
    net = _net(delta_logit=[0.3, -0.2, 0.5], gamma_logit=[0.1, 0.6, -0.4])
    cot = tf.constant(np.random.default_rng(0).standard_normal((100, 1)).astype("float32"))
    apps = [MetaApplication(net, tf.constant(g), tf.constant(r), chunk_size=c,
                            segment_ids=tf.constant(seg), num_segments=3)
            for c in (None, 7)]
    np.testing.assert_allclose(apps[1].m.numpy(), apps[0].m.numpy(), rtol=1e-5, atol=1e-10)
    for x, y in zip(apps[0].vjp(cot), apps[1].vjp(cot)):
        np.testing.assert_allclose(y.numpy(), x.numpy(), rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_dorefa_residual_matches_numpy(bits):
    w_tilde = np.random.default_rng(bits).uniform(0, 1, (3, 3, 2, 4)).astype("float32")
    n = 2**bits - 1
    r = quantizers.DoReFa(num_bits=bits).residual(tf.constant(w_tilde)).numpy()
    np.testing.assert_allclose(r, n * w_tilde - np.round(n * w_tilde), atol=1e-6)
    assert np.all(np.abs(r) <= 0.5)


def test_uniform_bwn_residuals_and_ternary_has_none():
    w = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    s = np.abs(w).max(axis=0, keepdims=True) / 7.0  # 4 bits per channel: n = 7
    r = quantizers.Uniform(num_bits=4).residual(tf.constant(w), (-1,)).numpy()
    np.testing.assert_allclose(r, w / s - np.round(w / s), atol=1e-5)
    u = w / np.abs(w).max()
    r = quantizers.BWN().residual(tf.constant(w)).numpy()
    np.testing.assert_allclose(r, (u - np.where(u >= 0, 1, -1)) / 2, atol=1e-6)
    assert np.all(np.abs(r) <= 0.5)
    assert not quantizers.Ternary().defines_residual
    with pytest.raises(ValueError, match="no discretizer residual"):
        quantizers.Ternary().residual(tf.constant(w))


def _data(n=32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8, 1)).astype("float32"), np.arange(n) % 3


def _trained(semantics="code", num_bits=2, epochs=3):
    x, y = _data()
    q = mqk.quantize_model(tiny_cnn(), meta_network="meta_ewgs", num_bits=num_bits,
                           semantics=semantics, verbose=False)
    q.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
              meta_optimizer=mqk.PaperAdam(1e-2),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = q.fit(x, y, batch_size=8, epochs=epochs, verbose=0)
    return q, hist, x


@pytest.mark.parametrize("semantics", ["code", "paper"])
def test_parameters_move_under_training(semantics):
    q, hist, _ = _trained(semantics)
    net = q.meta_network
    assert isinstance(net, mqk.MetaEWGS) and net.num_kernels == 2
    params = net.learned_parameters()
    # The look-ahead meta-gradient reaches delta and gamma of both kernels.
    assert np.all(np.abs(params["delta"]) > 1e-3) and np.all(np.abs(params["gamma"]) > 1e-3)
    assert int(q.skipped_steps.numpy()) == 0
    assert np.all(np.isfinite(hist.history["meta_grad_ratio"]))


def test_trained_model_output_keeps_each_kernels_gradient_norm():
    q, _, _ = _trained()
    slots = [s for _, s in q._slots]
    g = np.concatenate([s.prev_grad.numpy().reshape(-1, 1) for s in slots])
    r = np.concatenate([s.quantizer.residual(s.prev_w_tilde).numpy().reshape(-1, 1)
                        for s in slots])
    seg = q._kernels.segment_ids
    m = _call(q.meta_network, g, r, seg, num_kernels=2)
    np.testing.assert_allclose(_per_kernel_norms(m, seg), _per_kernel_norms(g, seg), rtol=1e-5)
    p = q.meta_network.learned_parameters()
    np.testing.assert_allclose(m, ref_meta_ewgs(g, r, seg, np.arctanh(p["delta"]),
                                                np.arctanh(p["gamma"])), rtol=1e-4, atol=1e-12)


def test_keras_round_trip_and_tflite_export(tmp_path):
    q, _, x = _trained()
    q.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.meta_network.get_config() == q.meta_network.get_config()
    assert loaded.meta_network.learned_parameters() == q.meta_network.learned_parameters()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), q.predict(x, verbose=0), atol=1e-6)
    assert mqk.verify_tflite(q, mqk.convert_to_tflite(q), x)["top1_agreement"] == 1.0


def test_by_name_and_errors():
    assert type(meta_networks.get("meta_ewgs")) is mqk.MetaEWGS
    assert meta_networks.get("META_EWGS", learn_shape=False).learn_shape is False
    with pytest.raises(ValueError, match="no discretizer residual|ternary|Ternary"):
        mqk.quantize_model(tiny_cnn(), kernel_quantizer="ternary", meta_network="meta_ewgs",
                           verbose=False)
    with pytest.raises(ValueError, match="num_kernels=5"):
        mqk.quantize_model(tiny_cnn(), meta_network=mqk.MetaEWGS(num_kernels=5), verbose=False)
    with pytest.raises(ValueError, match="num_kernels before build"):
        mqk.MetaEWGS().build()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_kernels"):
            mqk.MetaEWGS(num_kernels=bad)


def test_fixed_shape_trains_delta_only():
    net = _net(num_kernels=2, learn_shape=False)
    assert [v.name for v in net.trainable_variables] == ["delta_logit"]


def ref_ewgs_renormalised(g, r, seg, delta):
    """EWGS' factor `1 + delta * sign(g) * r`, renormalised per kernel."""
    return ref_meta_ewgs(g, r, seg, np.arctanh(np.asarray(delta, "float64")), np.zeros(3))


@pytest.mark.parametrize("delta_range", ["signed", "nonnegative"])
def test_delta_init_starts_at_ewgs(delta_range):
    g, r, seg = _inputs(seed=7)
    net = _net(delta_init=0.2, delta_range=delta_range)
    np.testing.assert_allclose(net.learned_parameters()["delta"], [0.2] * 3, rtol=1e-6)
    np.testing.assert_allclose(_call(net, g, r, seg), ref_ewgs_renormalised(g, r, seg, [0.2] * 3),
                               rtol=2e-5, atol=1e-9)


def test_nonnegative_delta_is_a_sigmoid_and_never_reverses_ewgs():
    g, r, seg = _inputs(seed=8)
    a = np.array([-30.0, 0.0, 2.5], "float32")
    net = _net(delta_init=0.5, delta_range="nonnegative", delta_logit=a)
    delta = 1.0 / (1.0 + np.exp(-a.astype("float64")))
    np.testing.assert_allclose(net.learned_parameters()["delta"], delta, rtol=1e-6)
    np.testing.assert_allclose(_call(net, g, r, seg), ref_ewgs_renormalised(g, r, seg, delta),
                               rtol=2e-5, atol=1e-9)
    assert min(net.learned_parameters()["delta"]) >= 0.0


def test_prior_trains_and_round_trips(tmp_path):
    q = mqk.quantize_model(tiny_cnn(), meta_network="meta_ewgs", verbose=False,
                           meta_network_options={"delta_init": 0.2,
                                                 "delta_range": "nonnegative"})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 32)
    q.compile(optimizer=keras.optimizers.SGD(0.05), meta_optimizer=mqk.PaperAdam(1e-1),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, batch_size=8, epochs=2, verbose=0)
    delta = np.asarray(q.meta_network.learned_parameters()["delta"])
    assert np.all(delta > 0) and np.any(np.abs(delta - 0.2) > 1e-4)
    q.save(tmp_path / "p.keras")
    loaded = keras.saving.load_model(tmp_path / "p.keras").meta_network
    assert (loaded.delta_init, loaded.delta_range) == (0.2, "nonnegative")
    assert loaded.learned_parameters() == q.meta_network.learned_parameters()


@pytest.mark.parametrize("options, match", [
    ({"delta_range": "positive"}, "delta_range must be one of"),
    ({"delta_init": 1.0}, r"delta_init must be a number in \(-1, 1\)"),
    ({"delta_init": 0.0, "delta_range": "nonnegative"}, r"in \(0, 1\)"),
    ({"delta_init": "0.2"}, "delta_init must be a number"),
    ({"delta_init": True}, "delta_init must be a number"),
])
def test_bad_delta_options(options, match):
    with pytest.raises(ValueError, match=match):
        mqk.MetaEWGS(**options)
