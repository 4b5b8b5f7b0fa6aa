"""Quantized activations: the fake-quant layer, where it goes, full-integer export."""

import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import mq_keras as mqk
from mq_keras import int8_graph
from tiny_models import tiny_cnn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))


def _fake_quant(x, lo, hi, bits):
    """NumPy reference of TF's FakeQuantWithMinMaxVars (zero nudged onto a level)."""
    q_max = 2**bits - 1
    scale = (hi - lo) / q_max
    zero = np.clip(np.floor(-lo / scale + 0.5), 0, q_max)  # TF rounds half up
    lo_n, hi_n = -zero * scale, (q_max - zero) * scale
    clipped = np.clip(x, lo_n, hi_n)
    return np.floor((clipped - lo_n) / scale + 0.5) * scale + lo_n, (x >= lo_n) & (x <= hi_n), lo_n, hi_n


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("mode", ["ema", "pact"])
def test_forward_and_backward_against_numpy(bits, mode):
    layer = mqk.ActivationQuantizer(num_bits=bits, range_mode=mode, init_range=(-1.5, 2.5))
    x = np.random.default_rng(1).uniform(-4, 4, size=(1, 97)).astype("float32")  # no ties
    layer.build(x.shape)
    layer.lo.assign(-1.3)
    layer.hi.assign(2.1)
    dy = np.random.default_rng(0).normal(size=x.shape).astype("float32")
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        y = layer(xt, training=False)
    want, inside, lo_n, hi_n = _fake_quant(x, -1.3, 2.1, bits)
    np.testing.assert_allclose(y.numpy(), want, atol=1e-5)
    gx = tape.gradient(y, xt, output_gradients=dy).numpy()
    np.testing.assert_allclose(gx, dy * inside, atol=1e-6)  # straight through inside
    if mode == "pact":  # the clipping levels' gradient
        g_lo, g_hi = tape.gradient(y, [layer.lo, layer.hi], output_gradients=dy)
        np.testing.assert_allclose(float(g_hi), dy[x > hi_n].sum(), rtol=1e-5)
        np.testing.assert_allclose(float(g_lo), dy[x < lo_n].sum(), rtol=1e-5)
    else:
        assert not layer.trainable_weights


def _lsq_reference(x, s, q_neg, q_pos, dy):
    """NumPy LSQ (Esser et al. 2020): forward, dL/dx, dL/ds with g = 1/sqrt(N Q_P)."""
    v = x / s
    y = s * np.clip(np.floor(v + 0.5), -q_neg, q_pos)
    inside = (v > -q_neg) & (v < q_pos)
    d = np.where(inside, np.floor(v + 0.5) - v, np.where(v <= -q_neg, -q_neg, q_pos))
    g = 1.0 / np.sqrt(x[0].size * q_pos)
    return y, dy * inside, g * np.sum(dy * d)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_lsq_against_numpy(bits, signed):
    rng = np.random.default_rng(bits)
    x = rng.uniform(-0.5 if signed else 0.0, 3.0, size=(4, 5, 7)).astype("float32")
    dy = rng.normal(size=x.shape).astype("float32")
    layer = mqk.ActivationQuantizer(num_bits=bits, range_mode="lsq")
    xt = tf.constant(x)
    layer(xt, training=True)  # the first batch: sign and LSQ's start
    q_neg = 2.0 ** (bits - 1) if signed else 0.0
    q_pos = 2.0**bits - 1 - q_neg
    assert float(layer.negative) == float(signed)
    np.testing.assert_allclose(float(layer.step), 2 * np.abs(x).mean() / np.sqrt(q_pos), rtol=1e-5)
    s = np.float32(3.0 / (q_pos + 0.5))  # some values clip at each end
    layer.step.assign(s)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True)
    gx, gs = tape.gradient(y, [xt, layer.step], output_gradients=dy)
    want_y, want_gx, want_gs = _lsq_reference(x, s, q_neg, q_pos, dy)
    np.testing.assert_allclose(y.numpy(), want_y, atol=1e-5 * s)
    np.testing.assert_allclose(gx.numpy(), want_gx, atol=1e-7)
    np.testing.assert_allclose(float(gs), want_gs, rtol=1e-4, atol=1e-6)
    # Inference runs the op the converter reads, on the same grid.
    np.testing.assert_allclose(layer(xt, training=False).numpy(), want_y, atol=1e-5 * s)
    lo, hi = (float(v) for v in layer.quantization_range())
    np.testing.assert_allclose([lo, hi], [-q_neg * s, q_pos * s], rtol=1e-6)
    assert [w.name for w in layer.trainable_weights] == ["step"]


def test_lsq_keeps_its_start_and_trains_the_step():
    layer = mqk.ActivationQuantizer(num_bits=4, range_mode="lsq")
    layer(np.full((2, 3), 2.0, "float32"), training=True)
    start = float(layer.step)
    layer(np.full((2, 3), 50.0, "float32"), training=True)  # later batches do not reset it
    assert float(layer.step) == start
    # Values far beyond the range pull the step up under gradient descent.
    x = tf.constant(np.full((2, 3), 100.0, "float32"))
    optimizer = keras.optimizers.SGD(0.1)
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_sum(layer(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, [layer.step]), [layer.step]))
    assert float(layer.step) > start


def test_ema_ranges():
    layer = mqk.ActivationQuantizer(num_bits=8, ema_decay=0.9)
    a = np.array([[0.5, 2.0, 1.0]], "float32")  # min > 0: the range keeps 0
    b = np.array([[-1.0, 4.0, 0.0]], "float32")
    layer(a, training=True)
    assert (float(layer.lo), float(layer.hi)) == (0.0, 2.0)  # the first batch sets it
    layer(b, training=True)
    np.testing.assert_allclose([float(layer.lo), float(layer.hi)],
                               [0.9 * 0.0 + 0.1 * -1.0, 0.9 * 2.0 + 0.1 * 4.0], rtol=1e-6)
    layer(b, training=False)  # inference leaves the range alone
    np.testing.assert_allclose(float(layer.hi), 2.2, rtol=1e-6)


def test_quantizers_sit_where_tflite_quantizes():
    q = mqk.quantize_model(tiny_cnn(), activation_quantizer="ema", verbose=False)
    graph = q.quantized_model
    fed_by = [type(layer._inbound_nodes[0].parent_nodes[0].operation).__name__
              for layer in graph.layers if isinstance(layer, mqk.ActivationQuantizer)]
    # Input, the fused conv+BN+ReLU block's end, the logits; not the conv or
    # BN inside the block, nor Flatten (same scale as its input).
    assert fed_by == ["InputLayer", "ReLU", "MetaQuantWrapper"]
    assert all(isinstance(l, mqk.ActivationQuantizer) for l in graph.layers[1:2])


@pytest.mark.usefixtures("mnist_available")
@pytest.mark.parametrize("kind", ["ema", "lsq"])
def test_mnist_full_integer_file_computes_what_training_saw(tmp_path, kind):
    import zoo

    keras.utils.set_random_seed(0)
    x, y = zoo.mnist_arrays("train", 4096)
    xt, yt = zoo.mnist_arrays("test", 2000)
    q = mqk.quantize_model(zoo.small_cnn(), num_bits=2, activation_quantizer=kind,
                           verbose=False)
    q.compile(optimizer=keras.optimizers.SGD(0.05), meta_optimizer=mqk.PaperAdam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"])
    q.fit(x, y, batch_size=64, epochs=1, verbose=0)
    accuracy = q.evaluate(xt, yt, verbose=0, return_dict=True)["accuracy"]
    assert accuracy > 0.8
    blob = mqk.convert_to_tflite(q, mode="int8")  # no representative dataset
    assert int8_graph.float_ops(blob) == []
    report = mqk.verify_tflite(q, blob, xt, yt)
    assert report["top1_agreement"] >= 0.999
    # Rounding its three blocks as the file's kernels do, Keras computes
    # the file's very outputs (max-pooling and flatten keep the scale).
    assert report["file_rounding_layers"] == 3
    assert report["file_rounding_identical"] == 1.0
    # Every trained range is in the file: scale (hi - lo) / 255.
    scales = {round(float(d["quantization"][0]), 9)
              for d in mqk.export.make_interpreter(blob).get_tensor_details()
              if d["dtype"] == np.int8}
    for layer in q.quantized_model.layers:
        if isinstance(layer, mqk.ActivationQuantizer):
            lo, hi = (float(v) for v in layer.quantization_range())
            want = (hi - lo) / 255
            assert any(abs(s - want) <= 1e-6 * want for s in scales), layer.name
    # Integer input and output for delegates that need them.
    blob8 = mqk.convert_to_tflite(q, mode="int8", io_dtype="int8")
    details = mqk.export.make_interpreter(blob8).get_input_details()[0]
    assert details["dtype"] == np.int8
    q.save(tmp_path / "q.keras")
    loaded = keras.saving.load_model(tmp_path / "q.keras")
    np.testing.assert_array_equal(loaded.predict(xt[:64], verbose=0), q.predict(xt[:64], verbose=0))


def test_bad_activation_options():
    with pytest.raises(ValueError, match=r"activation_bits must be an int in \[2, 3"):
        mqk.quantize_model(tiny_cnn(), activation_quantizer="ema", activation_bits=9)
    with pytest.raises(ValueError, match="Unknown activation_quantizer 'lsqq'.*'lsq'"):
        mqk.quantize_model(tiny_cnn(), activation_quantizer="lsqq")
    with pytest.raises(ValueError, match="needs activation_quantizer="):
        mqk.quantize_model(tiny_cnn(), activation_bits=8)
    plain = mqk.quantize_model(tiny_cnn(), verbose=False)
    with pytest.raises(ValueError, match="io_dtype='int8' needs mode='int8' on a model trained"):
        mqk.convert_to_tflite(plain, mode="int8", io_dtype="int8",
                              representative_dataset=np.zeros((4, 8, 8, 1), "float32"))
    trained = mqk.quantize_model(tiny_cnn(), activation_quantizer="ema", verbose=False)
    with pytest.raises(ValueError, match="Drop representative_dataset"):
        mqk.convert_to_tflite(trained, mode="int8",
                              representative_dataset=np.zeros((4, 8, 8, 1), "float32"))
    inputs = keras.Input((8, 8, 3))
    separable = keras.Model(inputs, keras.layers.SeparableConv2D(4, 3, name="sep")(inputs))
    with pytest.raises(ValueError, match=r"Layers \['sep'\] are separable.*DepthwiseConv2D"):
        mqk.quantize_model(separable, activation_quantizer="ema", verbose=False)
    with pytest.raises(ValueError, match="Unknown io_dtype"):
        mqk.convert_to_tflite(trained, mode="int8", io_dtype="int16")
