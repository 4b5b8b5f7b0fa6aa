"""MetaQuantModel: Keras API behaviour, serialization, resumable state."""

import numpy as np
import keras
import pytest

import mq_keras as mqk

from tiny_models import tiny_cnn

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 8, 8, 1)).astype("float32"),
            rng.integers(0, 3, size=n))


def _compiled(meta="multifc", **kwargs):
    q = mqk.quantize_model(tiny_cnn(), meta_network=meta, verbose=False, **kwargs)
    q.compile(optimizer=keras.optimizers.Adam(1e-2),
              meta_optimizer=mqk.PaperAdam(1e-3) if q.estimator == "metaquant" else None,
              loss=LOSS, metrics=["accuracy"])
    return q


# MultiFC, LSTMFC and the STE: also (with every optimizer slot and counter)
# in test_resume.py.
@pytest.mark.parametrize("meta", ["fc_grad", "gain_mlp"])
def test_save_load_round_trip_and_resume(tmp_path, meta):
    x, y = _data()
    q = _compiled(meta)
    q.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    q.save(path)
    r = keras.models.load_model(path)  # no custom_objects
    assert isinstance(r, mqk.MetaQuantModel)
    np.testing.assert_array_equal(r.predict(x, verbose=0), q.predict(x, verbose=0))
    for a, b in zip(q.variables, r.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    if meta != "ste":
        assert type(r.meta_network) is type(q.meta_network)
        for a, b in zip(q.meta_optimizer.variables, r.meta_optimizer.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Continuing from the file gives the same weights as not stopping.
    q.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    r.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(q.trainable_variables, r.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_logs_have_meta_loss_and_ratio_and_evaluate_does_not():
    x, y = _data()
    q = _compiled("multifc")
    hist = q.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert {"loss", "accuracy", "meta_loss", "meta_grad_ratio"} <= set(hist.history)
    assert hist.history["meta_grad_ratio"][-1] > 0
    logs = q.evaluate(x, y, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "accuracy"}


def test_compile_requires_meta_optimizer():
    q = mqk.quantize_model(tiny_cnn(), verbose=False)
    with pytest.raises(ValueError, match="meta_optimizer"):
        q.compile(optimizer="sgd", loss=LOSS)
    ste = mqk.quantize_model(tiny_cnn(), estimator="ste", verbose=False)
    ste.compile(optimizer="sgd", loss=LOSS)  # STE needs no meta optimizer


def test_base_optimizer_does_not_touch_meta_network():
    q = _compiled("multifc")
    ids = {id(v) for v in q.meta_network.trainable_variables}
    assert ids.isdisjoint({id(v) for v in q.base_variables})
    # Base optimizer slots exist only for base variables.
    n_slots = len(q.optimizer.variables) - 2  # iterations + learning rate
    assert n_slots == 2 * len(q.base_variables)


def test_predict_uses_quantized_kernels_and_bn_inference():
    x, y = _data()
    q = _compiled("multifc")
    q.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model = q.quantized_model
    conv, fc = q.wrappers
    bn = model.get_layer("bn")
    qc, qf = conv.quantized_kernels()["kernel"], fc.quantized_kernels()["kernel"]
    h = keras.ops.conv(x, qc) + conv.layer.bias.numpy()
    g, b, mu, var = (w.numpy() for w in bn.weights)
    h = (np.asarray(h) - mu) / np.sqrt(var + bn.epsilon) * g + b
    h = np.maximum(h, 0).reshape(len(x), -1)
    expected = h @ qf + fc.layer.bias.numpy()
    np.testing.assert_allclose(q.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-4)


def test_learning_rate_schedule_is_used_in_look_ahead():
    """The look-ahead and r use the optimizer's current scheduled rate."""
    x, y = _data(8)
    sched = keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)
    q = mqk.quantize_model(tiny_cnn(), meta_network="fc_grad", verbose=False)
    q.compile(optimizer=keras.optimizers.SGD(sched), meta_optimizer=keras.optimizers.SGD(0.0),
              loss=LOSS)
    slot = q.wrappers[1].slots[0]
    for _ in range(3):
        w0 = slot.variable.numpy().copy()
        lr = float(q.optimizer.learning_rate.numpy())
        q.train_on_batch(x, y)
    # After step 3 (the optimizer's 2nd real step, lr = 0.1 * 0.5), r = (W0 - W1) / lr.
    np.testing.assert_allclose(slot.prev_update.numpy(),
                               (w0 - slot.variable.numpy()) / lr, rtol=1e-4, atol=1e-6)
    assert lr == pytest.approx(0.05)


def test_run_eagerly_matches_graph():
    x, y = _data(16)
    results = []
    for eager in (False, True):
        keras.utils.set_random_seed(5)
        q = mqk.quantize_model(tiny_cnn(), meta_network="lstmfc", verbose=False)
        q.compile(optimizer=keras.optimizers.SGD(0.05), meta_optimizer=mqk.PaperAdam(),
                  loss=LOSS, run_eagerly=eager)
        q.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
        results.append([v.numpy() for v in q.trainable_variables])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_lstm_state_carried_or_reset():
    x, y = _data(16)
    carried = _compiled("lstmfc")
    reset = _compiled("lstmfc", reset_meta_state=True)
    for q in (carried, reset):
        q.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.abs(carried.meta_state[0].numpy()).max() > 0
    assert np.abs(reset.meta_state[0].numpy()).max() == 0


def test_summary_counts_bits_and_compression():
    q = _compiled("multifc")
    lines = []
    report = mqk.summary(q, print_fn=lines.append)
    conv_k, fc_k = 3 * 3 * 1 * 4, 6 * 6 * 4 * 3
    assert report["quantized_params"] == conv_k + fc_k
    by_name = {r["name"]: r for r in report["layers"]}
    # 1-bit DoReFa: bits packed, no scale; bias float32.
    assert by_name["quant_c1"]["bytes"] == -(-conv_k // 8) + 4 * 4
    assert by_name["quant_fc"]["bytes"] == -(-fc_k // 8) + 4 * 3
    assert by_name["bn"]["bytes"] == 4 * 16
    assert report["float32_bytes"] == 4 * report["params"]
    assert report["compression"] == pytest.approx(report["float32_bytes"] / report["bytes"])
    assert any("smaller" in line for line in lines)


def test_training_does_not_write_nan_on_finite_data():
    x, y = _data()
    for meta in ("fc_grad", "multifc", "lstmfc", "gain_mlp"):
        q = _compiled(meta)
        q.fit(x, y, batch_size=8, epochs=2, verbose=0)
        for v in q.variables:
            if v.dtype.startswith("float"):
                assert np.isfinite(v.numpy()).all(), (meta, v.path)


@pytest.mark.parametrize("semantics", ["code", "paper"])
def test_frozen_quantized_layer_is_left_alone(semantics):
    x, y = _data(16)
    q = mqk.quantize_model(tiny_cnn(), semantics=semantics, verbose=False)
    q.wrappers[0].trainable = False
    q.compile(optimizer=keras.optimizers.SGD(0.1), meta_optimizer=mqk.PaperAdam(),
              loss=LOSS)
    frozen = q.wrappers[0].slots[0].variable.numpy().copy()
    moving = q.wrappers[1].slots[0].variable.numpy().copy()
    q.fit(x, y, batch_size=4, epochs=1, verbose=0)
    np.testing.assert_array_equal(q.wrappers[0].slots[0].variable.numpy(), frozen)
    assert not np.allclose(q.wrappers[1].slots[0].variable.numpy(), moving)


@pytest.mark.parametrize("semantics", ["code", "paper"])
def test_kernel_regularizer_reaches_the_kernel_update(semantics):
    """With m = 0 the only kernel gradient left is the regularizer's own."""
    inp = keras.Input((4,))
    out = keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(0.1),
                             name="fc")(inp)
    q = mqk.quantize_model(keras.Model(inp, out), meta_network="fc_grad",
                           semantics=semantics, verbose=False)
    q.meta_network.w2.assign(np.zeros_like(q.meta_network.w2.numpy()))
    q.compile(optimizer=keras.optimizers.SGD(0.5), meta_optimizer=keras.optimizers.SGD(0.0),
              loss=LOSS)
    x, y = np.ones((2, 4), "float32"), np.array([0, 1])
    q.train_on_batch(x, y)  # first step: records only
    w0 = q.wrappers[0].slots[0].variable.numpy().copy()
    q.train_on_batch(x, y)
    np.testing.assert_allclose(q.wrappers[0].slots[0].variable.numpy(),
                               w0 - 0.5 * (2 * 0.1 * w0), rtol=1e-5, atol=1e-7)


def test_issue_example_with_tf_data(tmp_path):
    """The README/issue example: Sequential (nested), tf.data, validation, save/load."""
    import tensorflow as tf

    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)]),
    ])
    x, y = _data(64)
    train_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    test_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    qmodel = mqk.quantize_model(model, kernel_quantizer="dorefa", num_bits=1,
                                meta_network="multifc", verbose=False)
    qmodel.compile(optimizer=keras.optimizers.SGD(1e-3),
                   meta_optimizer=keras.optimizers.Adam(1e-3),
                   loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    hist = qmodel.fit(train_ds, validation_data=test_ds, epochs=2, verbose=0)
    assert {"val_loss", "val_accuracy", "meta_loss"} <= set(hist.history)
    qmodel.evaluate(test_ds, verbose=0)
    pred = qmodel.predict(x, verbose=0)
    report = mqk.summary(qmodel, print_fn=None)
    assert report["compression"] > 1
    qmodel.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), pred)


def test_ste_step_equals_plain_keras_fit_of_the_same_wrappers():
    """estimator='ste' is Keras' own step (guarded): same weights as model.fit."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=64)
    base = tiny_cnn()
    ours = mqk.quantize_model(base, estimator="ste", verbose=False)
    plain = mqk.quantize_model(base, estimator="ste", verbose=False).quantized_model
    ours.compile(optimizer=keras.optimizers.SGD(0.05), loss=LOSS)
    plain.compile(optimizer=keras.optimizers.SGD(0.05), loss=LOSS)
    ours.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    for a, b in zip(ours.quantized_model.trainable_variables, plain.trainable_variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(plain.trainable_variables[0]),
                           np.asarray(base.trainable_variables[0]))
