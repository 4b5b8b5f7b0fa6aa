"""Any Functional graph: operation nodes, shared layers, keras.applications.

Operations applied to KerasTensors (`x + y`, `x * 2.0`, `keras.ops.mean`) are
graph nodes that are not layers; a layer called twice is one layer with one
kernel. Both must survive `quantize_model`, training, `.keras` round trips,
`strip_model` and TFLite export.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import mq_keras as mqk


def _ops_model():
    """A small transformer-style block written the usual way."""
    inp = keras.Input((8, 12))
    h = keras.layers.Dense(16, name="embed")(inp)
    att = keras.layers.Dense(16, name="mix")(h)
    h = keras.layers.LayerNormalization()(h + att)  # Add is an operation
    h = h * 2.0 - 1.0
    h = keras.ops.mean(keras.ops.relu(h), axis=1)
    out = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inp, out)


def _data(n=32, shape=(8, 12), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + shape).astype("float32")
    return x, rng.integers(0, classes, size=n)


def _compile(q):
    q.compile(optimizer=keras.optimizers.SGD(0.05),
              meta_optimizer=mqk.PaperAdam(1e-3) if q.meta_network else None,
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return q


def test_operation_nodes_are_cloned_not_wrapped(tmp_path):
    model = _ops_model()
    assert any(not isinstance(op, keras.layers.Layer) for op in model.operations)
    x, y = _data()
    q = _compile(mqk.quantize_model(model, verbose=False))
    assert len(q.wrappers) == 3
    # The caller's model is untouched and still computes what it did.
    np.testing.assert_allclose(model(x), _ops_model_like(model)(x), rtol=1e-6)
    q.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "ops.keras"
    q.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), q.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    stripped = mqk.strip_model(q)
    np.testing.assert_allclose(stripped(x), q(x, training=False), rtol=1e-5, atol=1e-5)
    blob = mqk.convert_to_tflite(q)
    report = mqk.verify_tflite(q, blob, x, y)
    assert report["top1_agreement"] == 1.0
    assert report["max_abs_diff"] < 1e-4


def _ops_model_like(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _shared_model():
    inp_a = keras.Input((6,))
    inp_b = keras.Input((6,))
    shared = keras.layers.Dense(5, name="shared")
    h = keras.layers.Concatenate()([shared(inp_a), shared(inp_b)])
    return keras.Model([inp_a, inp_b], keras.layers.Dense(2, name="head")(h))


def test_shared_layer_has_one_kernel_and_its_whole_gradient():
    model = _shared_model()
    q = _compile(mqk.quantize_model(model, meta_network="fc_grad", verbose=False))
    names = [w.layer.name for w in q.wrappers]
    assert sorted(names) == ["head", "shared"]  # one wrapper for two calls
    rng = np.random.default_rng(1)
    xa, xb = (rng.normal(size=(16, 6)).astype("float32") for _ in range(2))
    y = rng.integers(0, 2, size=16)
    stripped = mqk.strip_model(q)
    # dL/dW_hat of the shared kernel sums both calls: take it from the float
    # model that holds W_hat as its kernel.
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    kernel = stripped.get_layer("shared").kernel
    with tf.GradientTape() as tape:
        loss = loss_fn(y, stripped([xa, xb]))
    expected = tape.gradient(loss, kernel.value).numpy()
    single = _single_call_grad(stripped, xa, xb, y)
    assert not np.allclose(expected, single, atol=1e-6)  # both calls matter
    q.train_on_batch([xa, xb], y)  # first step: records dL/dW_hat at W
    shared = next(w for w in q.wrappers if w.layer.name == "shared")
    np.testing.assert_allclose(shared.slots[0].prev_grad.numpy(), expected,
                               rtol=1e-5, atol=1e-7)


def _single_call_grad(stripped, xa, xb, y):
    """dL/dW through the first call only (second call's kernel held fixed)."""
    layer = stripped.get_layer("shared")
    w = layer.kernel.value
    with tf.GradientTape() as tape:
        tape.watch(w)
        ha = tf.matmul(xa, w) + layer.bias
        hb = tf.matmul(xb, tf.stop_gradient(w)) + layer.bias
        logits = stripped.get_layer("head")(tf.concat([ha, hb], axis=-1))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    return tape.gradient(loss, w).numpy()


def test_mobilenet_v3_small_wraps_trains_and_exports():
    """keras.applications with operation nodes (hard-swish is `x * relu6(x+3)/6`)."""
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=4, include_top=True,
        dropout_rate=0.0, classifier_activation=None)
    q = _compile(mqk.quantize_model(model, estimator="ste", verbose=False))
    report = mqk.summary(q, print_fn=lambda *_: None)
    assert report["quantized_fraction"] >= 0.95
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(8, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 4, size=8)
    q.fit(x, y, batch_size=4, epochs=1, verbose=0)
    blob = mqk.convert_to_tflite(q)
    rep = mqk.verify_tflite(q, blob, x)
    assert rep["top1_agreement"] == 1.0
