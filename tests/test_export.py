"""Tests of mq_keras.export: strip_model and convert_to_tflite."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import mq_keras
from mq_keras.layers import MetaQuantWrapper
from mq_keras.models import iter_layers


def _float_model():
    inputs = keras.Input((10, 10, 1))
    x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, name="dense")(x)
    return keras.Model(inputs, outputs, name="small")


def _data(n=32):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (n, 10, 10, 1)).astype("float32")
    y = rng.integers(0, 10, n)
    return x, y


@pytest.fixture(scope="module")
def trained():
    """A small conv+BN+dense MetaQuantModel after a few training steps."""
    keras.utils.set_random_seed(7)
    qmodel = mq_keras.quantize_model(_float_model(), verbose=False)
    qmodel.compile(
        optimizer=keras.optimizers.SGD(0.05),
        meta_optimizer=mq_keras.PaperAdam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data()
    qmodel.fit(x, y, batch_size=8, epochs=2, verbose=0)
    return qmodel


def _interpret(flatbuffer, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def test_strip_model_predictions_match(trained):
    x, _ = _data()
    stripped = mq_keras.strip_model(trained)
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), trained.predict(x, verbose=0),
        atol=1e-5,
    )


def test_strip_model_has_no_training_state(trained):
    stripped = mq_keras.strip_model(trained)
    assert not isinstance(stripped, mq_keras.MetaQuantModel)
    assert not any(isinstance(l, MetaQuantWrapper) for l in iter_layers(stripped))
    float_model = _float_model()
    assert [w.shape for w in stripped.weights] == [
        w.shape for w in float_model.weights
    ]
    # BN statistics and biases are copied, not re-initialized.
    np.testing.assert_array_equal(
        stripped.get_layer("bn").moving_mean.numpy(),
        trained.quantized_model.get_layer("bn").moving_mean.numpy(),
    )
    np.testing.assert_array_equal(
        stripped.get_layer("dense").bias.numpy(),
        trained.quantized_model.get_layer("quant_dense").layer.bias.numpy(),
    )


def test_stripped_kernels_on_dorefa_1bit_grid(trained):
    stripped = mq_keras.strip_model(trained)
    for name in ("conv", "dense"):
        kernel = stripped.get_layer(name).kernel.numpy()
        assert set(np.unique(kernel)) <= {-1.0, 1.0}
        latent = trained.quantized_model.get_layer(f"quant_{name}").layer.kernel
        # W = 0 maps to -1; random latent kernels are never exactly 0.
        np.testing.assert_array_equal(kernel, np.where(latent.numpy() > 0, 1.0, -1.0))


def test_stripped_kernels_on_uniform_grid():
    qmodel = mq_keras.quantize_model(
        _float_model(), kernel_quantizer="uniform", num_bits=4, verbose=False
    )
    stripped = mq_keras.strip_model(qmodel)
    kernel = stripped.get_layer("dense").kernel.numpy()
    step = np.abs(kernel).max(axis=0, keepdims=True) / 7.0
    codes = kernel / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert np.abs(np.round(codes)).max() <= 7


def test_strip_sequential_and_nested():
    inner = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, name="d1"), keras.layers.ReLU()],
        name="inner",
    )
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3, name="d2")(inner(inputs))
    model = keras.Model(inputs, outputs)
    qmodel = mq_keras.quantize_model(model, verbose=False)
    stripped = mq_keras.strip_model(qmodel)
    x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32")
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), qmodel.predict(x, verbose=0), atol=1e-5
    )
    assert not any(isinstance(l, MetaQuantWrapper) for l in iter_layers(stripped))

    sequential = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    stripped = mq_keras.strip_model(mq_keras.quantize_model(sequential, verbose=False))
    assert isinstance(stripped, keras.Sequential)


def test_strip_model_errors():
    with pytest.raises(ValueError, match="no MetaQuantWrapper"):
        mq_keras.strip_model(_float_model())
    unbuilt = keras.Sequential(
        [MetaQuantWrapper(keras.layers.Dense(3))]
    )
    with pytest.raises(ValueError, match="not built"):
        mq_keras.strip_model(unbuilt)
    with pytest.raises(ValueError, match="MetaQuantModel or a keras.Model"):
        mq_keras.strip_model("model")


def test_tflite_logits_match_keras(trained):
    x, _ = _data(16)
    expected = trained.predict(x, verbose=0)
    float_logits = _interpret(mq_keras.convert_to_tflite(trained, mode="float"), x)
    np.testing.assert_allclose(float_logits, expected, atol=1e-4)
    # Weights mode keeps float arithmetic: only the storage of the kernels
    # changes (exact codes + DEQUANTIZE), so it agrees as closely.
    weights_logits = _interpret(mq_keras.convert_to_tflite(trained), x)
    np.testing.assert_allclose(weights_logits, expected, atol=1e-4)


def test_tflite_stripped_model_converts_too(trained):
    x, _ = _data(4)
    stripped = mq_keras.strip_model(trained)
    logits = _interpret(mq_keras.convert_to_tflite(stripped, mode="float"), x)
    np.testing.assert_allclose(logits, trained.predict(x, verbose=0), atol=1e-4)


def test_tflite_weights_mode_is_smaller(trained):
    weights = mq_keras.convert_to_tflite(trained, mode="weights")
    floats = mq_keras.convert_to_tflite(trained, mode="float")
    assert isinstance(weights, bytes) and isinstance(floats, bytes)
    assert len(weights) < 0.6 * len(floats)


def test_tflite_mode_errors(trained):
    x, _ = _data(4)
    with pytest.raises(ValueError, match="allowed modes are"):
        mq_keras.convert_to_tflite(trained, mode="int4")
    with pytest.raises(ValueError, match="representative_dataset"):
        mq_keras.convert_to_tflite(trained, mode="int8")
    with pytest.raises(ValueError, match="only used by mode='int8'"):
        mq_keras.convert_to_tflite(trained, mode="weights", representative_dataset=x)
    with pytest.raises(ValueError, match="weight_dtype"):
        mq_keras.convert_to_tflite(trained, weight_dtype="int2")
    with pytest.raises(ValueError, match="non-empty batch"):
        mq_keras.convert_to_tflite(trained, mode="int8", representative_dataset=[])
    with pytest.raises(TypeError):
        mq_keras.convert_to_tflite(trained, "float")  # mode is keyword-only
