"""Keras inference that rounds like the full-integer file (`mq_keras.file_rounding`)."""

import keras
import numpy as np
import tensorflow as tf

import mq_keras as mqk
from tiny_models import residual_cnn


def _numpy_file_round(x, r):
    """XNNPACK's fp32 requantization of the recovered int32 accumulator."""
    acc = np.round(x.astype(np.float64) / r["acc_scale"])
    v = acc.astype(np.float32) * r["scale"]  # a float32 product
    o = np.clip(np.rint(v) + r["zero_point"], r["code_min"], r["code_max"])
    return ((o - r["zero_point"]) * np.float32(r["step"])).astype(np.float32)


def test_file_round_against_numpy_and_only_at_inference():
    rng = np.random.default_rng(0)
    acc_scale = np.array([1e-3, 2e-3, 5e-4], np.float64)
    r = dict(acc_scale=acc_scale, scale=np.float32(acc_scale / 0.05).astype(np.float32),
             zero_point=-20, code_min=-20, code_max=127, step=0.05)
    # Block outputs a little off the accumulator grid, as float round-off leaves them.
    acc = rng.integers(-3000, 9000, size=(8, 5, 3))
    x = (acc * acc_scale * (1 + rng.normal(scale=1e-7, size=acc.shape))).astype(np.float32)
    layer = mqk.ActivationQuantizer(num_bits=8, range_mode="pact", init_range=(-1.0, 6.0))
    plain = layer(x, training=False).numpy()
    layer.set_file_rounding(r)
    np.testing.assert_array_equal(layer(x, training=False).numpy(), _numpy_file_round(x, r))
    assert layer(x, training=False).numpy().min() >= 0.0  # the fused ReLU's clamp
    np.testing.assert_array_equal(layer(x, training=True).numpy(),
                                  tf.quantization.fake_quant_with_min_max_vars(
                                      x, layer.lo, layer.hi).numpy())  # training: fake-quant
    layer.set_file_rounding(None)
    np.testing.assert_array_equal(layer(x, training=False).numpy(), plain)


def test_residual_net_rounds_every_block_as_its_file():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 12, 12, 3)).astype("float32")
    q = mqk.quantize_model(residual_cnn(), num_bits=4, activation_quantizer="ema",
                           verbose=False)
    q.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
              meta_optimizer=mqk.PaperAdam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, rng.integers(0, 5, 256), batch_size=32, epochs=2, verbose=0)
    blob = mqk.convert_to_tflite(q, mode="int8")
    xt = rng.normal(size=(256, 12, 12, 3)).astype("float32")
    before = q.predict(xt, verbose=0)
    with mqk.file_rounding(q, blob) as info:
        # The four kernel layers, each with the quantizer after its block
        # (the one before the add has no ReLU; the strided one fuses its
        # own), and the add.
        assert len(info["layers"]) == 5 and info["unmatched"] == []
        rounded = q.predict(xt, verbose=0)
    np.testing.assert_array_equal(q.predict(xt, verbose=0), before)  # restored on exit
    # Every output the file's, bit for bit (global average pooling included).
    np.testing.assert_array_equal(rounded, mqk.export.run_tflite(blob, xt))
    report = mqk.verify_tflite(q, blob, xt)
    assert report["file_rounding_layers"] == 5 and report["file_rounding_identical"] == 1.0


def test_models_without_trained_ranges_report_no_file_rounding():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    q = mqk.quantize_model(model, verbose=False)
    data = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")
    blob = mqk.convert_to_tflite(q, mode="int8", representative_dataset=data)
    assert "file_rounding_layers" not in mqk.verify_tflite(q, blob, data)
