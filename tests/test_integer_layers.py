"""Full-integer export beyond conv-BN-ReLU: split activations, standalone BN, refusals.

keras.applications families use squeeze-and-excitation convolutions with a
sigmoid inside (EfficientNet), BatchNormalization after an add or a
concatenation (ResNetV2, DenseNet) and layers no integer kernel can run
(attention, LayerNormalization, recurrent layers, Conv3D). The first two
must export all-integer and agree with Keras; the last must be refused
before training, not after it.
"""

import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import mq_keras as mqk
from mq_keras import integer_bias
from mq_keras.export import run_tflite, tflite_ops
from mq_keras.tflite_graph import affine_layers_as_depthwise

L = keras.layers


def _se_block():
    """Conv-BN-swish with a squeeze-and-excitation gate (Conv2D(activation='sigmoid'))."""
    inputs = keras.Input((8, 8, 3))
    x = L.Activation("swish")(L.BatchNormalization()(L.Conv2D(8, 3, name="stem")(inputs)))
    s = L.GlobalAveragePooling2D(keepdims=True)(x)
    s = L.Conv2D(4, 1, activation="relu")(s)
    s = L.Conv2D(8, 1, activation="sigmoid", name="gate")(s)
    x = L.GlobalAveragePooling2D()(L.Multiply()([x, s]))
    return keras.Model(inputs, L.Dense(3)(x))


def _pre_activation():
    """BN after an add, after a concatenation and on the model input (ResNetV2, DenseNet)."""
    inputs = keras.Input((8, 8, 3))
    x = L.BatchNormalization(name="bn_input")(inputs)
    a = L.Conv2D(6, 3, padding="same")(x)
    b = L.Conv2D(6, 1)(x)
    x = L.ReLU()(L.BatchNormalization(name="bn_add")(L.Add()([a, b])))
    x = L.Concatenate()([x, L.Conv2D(4, 3, padding="same")(x)])
    x = L.ReLU()(L.BatchNormalization(name="bn_concat")(x))
    x = L.Conv2D(8, 3, strides=2)(x)
    x = L.BatchNormalization(name="bn_folded")(x)
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    return keras.Model(inputs, L.Dense(3)(x))


def _train(model, seed=0):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(96, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, 96)
    q = mqk.quantize_model(model, kernel_quantizer="uniform", num_bits=4,
                           meta_network="gain_mlp", activation_quantizer="ema", verbose=False)
    q.compile(optimizer=keras.optimizers.Adam(1e-3), meta_optimizer=mqk.PaperAdam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, batch_size=16, epochs=2, verbose=0)
    return q, rng.normal(size=(64, 8, 8, 3)).astype("float32")


def _logit_steps(q, blob, x):
    out = [l for l in q.quantized_model.layers if isinstance(l, mqk.ActivationQuantizer)][-1]
    step = (float(out.hi) - float(out.lo)) / 255
    return np.abs(run_tflite(blob, x) - q.predict(x, verbose=0)).max() / step


def test_unfusable_kernel_activation_is_split_off_and_quantized():
    model = _se_block()
    q, x = _train(model)
    inner = q.quantized_model
    gate = inner.get_layer("quant_gate").layer
    assert gate.activation.__name__ == "linear"
    split = inner.get_layer("gate_activation")
    assert split.activation.__name__ == "sigmoid"
    assert isinstance(split.input._keras_history.operation, mqk.ActivationQuantizer)
    # The float model is untouched; ReLU (fused by TFLite) stays inside its layer.
    assert model.get_layer("gate").activation.__name__ == "sigmoid"
    assert not any(l.name.endswith("_activation") and l.activation.__name__ == "relu"
                   for l in inner.layers if isinstance(l, L.Activation))
    blob = mqk.convert_to_tflite(q, mode="int8")  # refused if any op stayed float
    assert "LOGISTIC" in tflite_ops(blob)
    assert mqk.verify_tflite(q, blob, x)["top1_agreement"] == 1.0
    assert _logit_steps(q, blob, x) <= 1.0 + 1e-3


def test_standalone_batch_norm_is_exported_as_depthwise_and_agrees(tmp_path):
    q, x = _train(_pre_activation())
    q.save(tmp_path / "q.keras")  # shared concatenation quantizer, split activations
    loaded = keras.saving.load_model(tmp_path / "q.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), q.predict(x, verbose=0), atol=1e-6)
    blob = mqk.convert_to_tflite(q, mode="int8")
    assert "DEPTHWISE_CONV_2D" in tflite_ops(blob) and "MUL" not in tflite_ops(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ops = [o["op_name"] for o in tf.lite.Interpreter(model_content=blob)._get_ops_details()]
    assert ops.count("DEPTHWISE_CONV_2D") == 3  # the input, add and concatenation BNs
    # The float input's QUANTIZE only: no requantize before the concatenation.
    assert ops.count("QUANTIZE") == 1
    assert mqk.verify_tflite(q, blob, x)["top1_agreement"] == 1.0
    assert _logit_steps(q, blob, x) <= 1.0 + 1e-3
    # convert_to_tflite moved the standalone BNs onto the file's bias grid too:
    # a second pass finds every one of them there.
    again = integer_bias.align_biases(q.quantized_model, blob)
    assert again["unmatched"] == [] and again["max_shift_steps"] < 1e-4


def test_affine_layers_as_depthwise_computes_the_same_function():
    model = _pre_activation()
    rng = np.random.default_rng(1)
    for bn in (l for l in model.layers if isinstance(l, L.BatchNormalization)):
        c = bn.gamma.shape[0]
        bn.set_weights([rng.uniform(0.5, 2, c), rng.normal(size=c), rng.normal(size=c),
                        rng.uniform(0.2, 3, c)])
    rewritten = affine_layers_as_depthwise(model)
    kinds = {l.name: type(l).__name__ for l in rewritten.layers}
    assert kinds["bn_input"] == kinds["bn_add"] == kinds["bn_concat"] == "DepthwiseConv2D"
    assert kinds["bn_folded"] == "BatchNormalization"  # the converter folds it into the conv
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(rewritten.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-5)
    plain = keras.Sequential([keras.Input((4,)), L.Dense(2)])
    assert affine_layers_as_depthwise(plain) is plain


def _preprocessing(invert=False):
    """keras.applications' input preprocessing: offset Rescaling, Normalization."""
    inputs = keras.Input((8, 8, 3))
    x = L.Rescaling([1 / 127.5, 1 / 100.0, 1 / 80.0], offset=-1.0, name="rescale")(inputs)
    x = L.Rescaling(0.5, name="scale_only")(x)  # one MUL: int8 as it is
    x = L.Normalization(axis=-1, mean=[0.1, -0.2, 0.3], variance=[0.5, 2.0, 1.5],
                        invert=invert, name="norm")(x)
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3)(x)))
    return keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x)))


@pytest.mark.parametrize("invert", [False, True])
def test_preprocessing_layers_as_depthwise_compute_the_same_function(invert):
    model = _preprocessing(invert)
    rewritten = affine_layers_as_depthwise(model)
    kinds = {l.name: type(l).__name__ for l in rewritten.layers}
    assert kinds["rescale"] == kinds["norm"] == "DepthwiseConv2D"
    assert kinds["scale_only"] == "Rescaling"
    x = np.random.default_rng(2).uniform(0, 255, size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(rewritten.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-4)


def test_preprocessing_layers_export_all_integer():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(64, 8, 8, 3)).astype("float32")
    q = mqk.quantize_model(_preprocessing(), kernel_quantizer="uniform", num_bits=4,
                           meta_network="gain_mlp", activation_quantizer="ema", verbose=False)
    q.compile(optimizer=keras.optimizers.Adam(1e-3), meta_optimizer=mqk.PaperAdam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, rng.integers(0, 3, 64), batch_size=16, epochs=1, verbose=0)
    blob = mqk.convert_to_tflite(q, mode="int8")  # refused if a SUB/ADD stayed float
    assert mqk.verify_tflite(q, blob, x)["top1_agreement"] == 1.0


def _attention():
    inputs = keras.Input((6, 8))
    x = L.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    return keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))


def _layer_norm():
    inputs = keras.Input((8, 8, 3))
    x = L.LayerNormalization(name="ln")(L.Conv2D(4, 3)(inputs))
    return keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))


def _rms_norm():  # a transformer's normalization (Keras 3.9+)
    inputs = keras.Input((6, 8))
    x = L.RMSNormalization(name="rms")(L.Dense(8)(inputs))
    return keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))


def _lstm():
    inputs = keras.Input((5, 4))
    return keras.Model(inputs, L.Dense(3)(L.LSTM(6, name="lstm")(inputs)))


def _conv3d():
    inputs = keras.Input((4, 4, 4, 1))
    return keras.Model(inputs, L.Dense(3)(L.Flatten()(L.Conv3D(2, 3, name="c3")(inputs))))


@pytest.mark.parametrize("make, name", [(_attention, "mha (MultiHeadAttention)"),
                                        (_layer_norm, "ln (LayerNormalization)"),
                                        (_rms_norm, "rms (RMSNormalization)"),
                                        (_lstm, "lstm (LSTM)"), (_conv3d, "c3 (Conv3D)")])
def test_layers_without_integer_kernels_are_refused_before_training(make, name):
    with pytest.raises(ValueError, match=rf"\['{re.escape(name)}'\] cannot run all-integer"
                                         r".*activation_quantizer=None.*mode='weights'"):
        mqk.quantize_model(make(), activation_quantizer="ema", verbose=False)
    mqk.quantize_model(make(), verbose=False)  # float activations: fine



def test_concatenation_inputs_share_its_range():
    inputs = keras.Input((6, 6, 2))
    x = L.ReLU(name="x")(L.Conv2D(4, 3, padding="same", name="a")(inputs))
    only = L.Conv2D(3, 1, name="only")(x)  # read by the concatenation alone
    cat = L.Concatenate(name="cat")([x, only])  # x is also read by "only"
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(cat)))
    inner = mqk.quantize_model(model, activation_quantizer="ema", verbose=False).quantized_model
    cat = inner.get_layer("cat")
    # The layers are the float clone's, so the quantized graph's call is the last.
    first, second = (t._keras_history.operation for t in cat._inbound_nodes[-1].input_tensors)
    assert isinstance(first, mqk.ActivationQuantizer)
    assert second.name == "quant_only"  # no range of its own: the file gives it cat's scale
    reads = {id(q): [(t._keras_history.operation.name, n.arguments.kwargs.get("track_range", True))
                     for n in q._inbound_nodes for t in n.input_tensors]
             for q in inner.layers if isinstance(q, mqk.ActivationQuantizer)}
    # One quantizer, one range: x read-only (not tracked), the concatenation tracked.
    assert reads[id(first)] == [("x", False), ("cat", True)]
    assert sum(("cat", True) in r for r in reads.values()) == 1


def _ops(blob):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [o["op_name"] for o in tf.lite.Interpreter(model_content=blob)._get_ops_details()]


@pytest.mark.parametrize("activation_bits", [8, 4])
def test_fixed_scale_ops_get_their_int8_grid(activation_bits):
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, activation="tanh", name="c")(inputs)
    s = L.Conv2D(6, 1, activation="sigmoid", name="gate")(L.GlobalAveragePooling2D(
        keepdims=True)(x))
    x = L.GlobalAveragePooling2D()(L.Multiply()([x, s]))
    model = keras.Model(inputs, L.Softmax(name="probs")(L.Dense(4)(x)))
    q = mqk.quantize_model(model, kernel_quantizer="uniform", num_bits=4,
                           meta_network="gain_mlp", activation_quantizer="ema",
                           activation_bits=activation_bits, verbose=False)
    inner = q.quantized_model
    after = {}
    for layer in inner.layers:
        if isinstance(layer, mqk.ActivationQuantizer):
            after[layer._inbound_nodes[-1].input_tensors[0]._keras_history.operation.name] = layer
    fixed = {k: (float(v.lo), float(v.hi)) for k, v in after.items() if v.range_mode == "fixed"}
    if activation_bits == 4:  # the int8 kernels' grids are 8-bit ones
        assert fixed == {}
        return
    assert fixed == {"c_activation": (-1.0, 127 / 128), "gate_activation": (0.0, 255 / 256),
                     "probs": (0.0, 255 / 256)}
    assert not any(v.trainable_weights for v in after.values())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    q.compile(optimizer=keras.optimizers.Adam(1e-3), meta_optimizer=mqk.PaperAdam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy())
    q.fit(x, rng.integers(0, 4, 64), batch_size=16, epochs=1, verbose=0)
    assert {k: (float(after[k].lo), float(after[k].hi)) for k in fixed} == fixed  # never moved
    blob = mqk.convert_to_tflite(q, mode="int8")
    ops = _ops(blob)
    assert {"TANH", "LOGISTIC", "SOFTMAX"} <= set(ops)
    assert ops.count("QUANTIZE") == 1  # the float input's: no requantize after them
    report = mqk.verify_tflite(q, blob, x)
    # With the ranges the trained EMA gave these three instead: 98.2-99.2%
    # agreement, probabilities 0.53-0.55 steps apart (3 seeds, 512 inputs).
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] <= 1 / 256 + 1e-6


def test_shared_layer_keeps_its_activation_on_every_call():
    inputs = keras.Input((4,))
    shared = L.Dense(4, activation="tanh", name="shared")
    outputs = L.Dense(2)(L.Add()([shared(inputs), shared(L.Dense(4)(inputs))]))
    model = keras.Model(inputs, outputs)
    q = mqk.quantize_model(model, activation_quantizer="ema", verbose=False)
    activations = [l for l in q.quantized_model.layers if isinstance(l, L.Activation)]
    assert [a.name for a in activations] == ["shared_activation"]
    assert len(activations[0]._inbound_nodes) == 2  # both calls go through it
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    stripped = mqk.strip_model(q)
    assert [type(l).__name__ for l in stripped.layers].count("Activation") == 1
    np.testing.assert_allclose(stripped.predict(x, verbose=0), q.predict(x, verbose=0),
                               atol=1e-6)
