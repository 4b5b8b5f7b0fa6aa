"""Hand-designed backward rules (EWGS, ApproxSign) against NumPy references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import mq_keras as mqk
from mq_keras import quantizers
from tiny_models import tiny_cnn


def _grad(q, w, dy, axes=(-1,)):
    w = tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch(w)
        out = q(w, axes)
    return tape.gradient(out, w, output_gradients=tf.constant(dy)).numpy()


def _data(shape=(3, 3, 4, 6), scale=0.5, seed=0):
    rng = np.random.default_rng(seed)
    return (scale * rng.normal(size=shape)).astype("float32"), \
        rng.normal(size=shape).astype("float32")


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("delta", [0.0, 0.3, 2.0])
def test_dorefa_ewgs_matches_numpy(bits, delta):
    w, dy = _data()
    got = _grad(mqk.DoReFa(num_bits=bits, gradient="ewgs", delta=delta), w, dy)
    n = 2**bits - 1
    t = np.tanh(w)
    m = np.abs(t).max()
    x = t / (2 * m) + 0.5
    residual = x - np.round(n * x) / n
    g_x = 2 * dy * (1 + delta * np.sign(dy) * residual)
    np.testing.assert_allclose(got, g_x * (1 - t**2) / (2 * m), rtol=1e-5, atol=1e-7)
    if delta == 0.0:  # EWGS at delta 0 is the STE
        np.testing.assert_allclose(got, _grad(mqk.DoReFa(num_bits=bits), w, dy), rtol=1e-6)


def test_dorefa_approx_sign_matches_numpy():
    w, dy = _data()
    got = _grad(mqk.DoReFa(num_bits=1, gradient="approx_sign"), w, dy)
    t = np.tanh(w)
    m = np.abs(t).max()
    u = t / m  # 2 * W_tilde - 1, in [-1, 1]
    g_x = 2 * dy * (2 - 2 * np.abs(u))
    np.testing.assert_allclose(got, g_x * (1 - t**2) / (2 * m), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("per_channel", [False, True])
def test_bwn_approx_sign_matches_numpy(per_channel):
    w, dy = _data(scale=0.05)
    got = _grad(mqk.BWN(per_channel=per_channel, gradient="approx_sign"), w, dy)
    axes = (0, 1, 2) if per_channel else None
    alpha = np.abs(w).mean(axis=axes, keepdims=per_channel)
    top = np.abs(w).max(axis=axes, keepdims=per_channel)
    np.testing.assert_allclose(got, alpha * dy * (2 - 2 * np.abs(w / top)), rtol=1e-5,
                               atol=1e-9)


@pytest.mark.parametrize("delta", [0.0, 0.5])
def test_uniform_ewgs_matches_numpy(delta):
    w, dy = _data()
    got = _grad(mqk.Uniform(num_bits=3, gradient="ewgs", delta=delta), w, dy)
    s = np.abs(w).max(axis=(0, 1, 2), keepdims=True) / 3.0
    x = w / s
    np.testing.assert_allclose(got, dy * (1 + delta * np.sign(dy) * (x - np.round(x))),
                               rtol=1e-5, atol=1e-7)


def test_forward_is_unchanged_by_the_backward_rule():
    w, _ = _data()
    for base, other in ((mqk.DoReFa(num_bits=2), mqk.DoReFa(num_bits=2, gradient="ewgs",
                                                            delta=1.0)),
                        (mqk.BWN(), mqk.BWN(gradient="approx_sign"))):
        np.testing.assert_array_equal(base(w).numpy(), other(w).numpy())


@pytest.mark.parametrize("make,match", [
    (lambda: mqk.DoReFa(num_bits=2, gradient="approx_sign"), "not defined"),
    (lambda: mqk.Ternary(gradient="ewgs"), "not defined"),
    (lambda: mqk.DoReFa(gradient="sigmoid"), "unknown gradient"),
    (lambda: mqk.DoReFa(delta=0.1), "only applies to gradient='ewgs'"),
    (lambda: mqk.DoReFa(gradient="ewgs", delta=-1.0), "finite number >= 0"),
    (lambda: mqk.DoReFa(gradient="ewgs", delta=float("nan")), "finite number >= 0"),
])
def test_bad_rules(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_estimator_names_train_serialize_and_export(tmp_path):
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype("float32")
    y = np.arange(32) % 3
    q = mqk.quantize_model(tiny_cnn(), estimator="ewgs", num_bits=2,
                           quantizer_options={"delta": 0.2}, verbose=False)
    rule = q.wrappers[0].kernel_quantizer
    assert (rule.gradient, rule.delta, q.estimator) == ("ewgs", 0.2, "ste")
    assert quantizers.get(quantizers.serialize(rule)) == rule
    assert quantizers.get(quantizers.serialize(mqk.DoReFa())).get_config() == {"num_bits": 1}
    q.compile(optimizer=keras.optimizers.SGD(0.05),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, batch_size=8, epochs=1, verbose=0)
    q.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.wrappers[0].kernel_quantizer == rule
    np.testing.assert_allclose(loaded.predict(x, verbose=0), q.predict(x, verbose=0), atol=1e-6)
    assert mqk.verify_tflite(q, mqk.convert_to_tflite(q), x)["top1_agreement"] == 1.0
    q = mqk.quantize_model(tiny_cnn(), estimator="approx_sign", kernel_quantizer=mqk.BWN(),
                           verbose=False)
    assert q.wrappers[0].kernel_quantizer.gradient == "approx_sign"
    with pytest.raises(ValueError, match="not defined"):
        mqk.quantize_model(tiny_cnn(), estimator="approx_sign", num_bits=2)


def test_hessian_delta_matches_the_exact_hessian():
    """Hutchinson's trace and the paper's rule against the exact Hessian of a tiny model."""
    from mq_keras import ewgs

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(3, use_bias=False, name="fc")(inp))
    q = mqk.quantize_model(model, estimator="ewgs", num_bits=2, verbose=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, size=16)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    (delta,) = ewgs.hessian_deltas(q, x, y, loss=loss, samples=3000).values()
    # Exact: the float model holding W_hat, its full 12 x 12 Hessian.
    k = tf.Variable(mqk.strip_model(q).get_layer("fc").kernel.numpy())
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = loss(y, tf.matmul(x, k))
        g = inner.gradient(value, k)
    h = outer.jacobian(g, k).numpy().reshape(12, 12)
    a = 2.0  # DoReFa: W_hat = 2 * x_q - 1
    expected = (a * a * np.trace(h) / 12) / (3 * np.std(a * g.numpy()))
    assert expected > 0
    np.testing.assert_allclose(delta, expected, rtol=0.05)
    with pytest.raises(ValueError, match="no EWGS domain"):
        ewgs.hessian_deltas(mqk.quantize_model(model, kernel_quantizer="bwn", verbose=False,
                                               meta_network="gain_mlp"), x, y, loss=loss)
