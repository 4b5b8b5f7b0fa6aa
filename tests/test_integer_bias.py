"""Full-integer files compute the integers the Keras model computes (int32 bias grid)."""

import warnings

import keras
import numpy as np
import tensorflow as tf

import mq_keras as mqk
from mq_keras import integer_bias, tflite_weights
from tiny_models import residual_cnn


def _trained(seed=0):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 12, 12, 3)).astype("float32")
    y = rng.integers(0, 5, 256)
    q = mqk.quantize_model(residual_cnn(), num_bits=4, activation_quantizer="ema",
                           verbose=False)
    q.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
              meta_optimizer=mqk.PaperAdam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, batch_size=32, epochs=2, verbose=0)
    return q, rng.normal(size=(64, 12, 12, 3)).astype("float32")


def _values(model):
    return [np.array(v) for v in model.weights]


def _off_by_one_step(q, blob, x):
    """Activations (all quantized tensors) where Keras and the file differ, and their count."""
    fqs = [l for l in q.quantized_model.layers if isinstance(l, mqk.ActivationQuantizer)]
    keras_out = keras.Model(q.quantized_model.inputs, [l.output for l in fqs]).predict(
        x, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interp = tf.lite.Interpreter(model_content=blob, experimental_preserve_all_tensors=True)
    index = interp.get_input_details()[0]["index"]
    interp.resize_tensor_input(index, x.shape)
    interp.allocate_tensors()
    interp.set_tensor(index, x)
    interp.invoke()
    details = [d for d in interp.get_tensor_details() if d["dtype"] == np.int8]
    counts = []
    for layer, want in zip(fqs, keras_out):
        step = (float(layer.hi) - float(layer.lo)) / 255
        d = next(d for d in details if tuple(d["shape"]) == want.shape
                 and abs(d["quantization"][0] - step) <= 1e-4 * step)
        scale, zero = d["quantization"]
        got = (interp.get_tensor(d["index"]).astype(np.float64) - zero) * scale
        counts.append(int(np.sum(np.abs(got - want) > 0.5 * scale)))
    return counts


def test_bias_scales_are_input_times_filter_scale():
    q, _ = _trained()
    blob = mqk.convert_to_tflite(q, mode="int8", align_biases=False)
    interp = mqk.export.make_interpreter(blob)
    ops = [o for o in interp._get_ops_details() if o["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    tensors = {d["index"]: d for d in interp.get_tensor_details()}
    found = tflite_weights.filter_biases(blob)
    assert len(found) == len(ops) == 4
    for op, entry in zip(ops, found):
        s_in = tensors[op["inputs"][0]]["quantization"][0]
        s_w = tensors[op["inputs"][1]]["quantization_parameters"]["scales"]
        np.testing.assert_allclose(entry["scales"], s_in * s_w, rtol=1e-6)
        assert entry["output_scale"] == tensors[op["outputs"][0]]["quantization"][0]


def test_aligned_model_and_file_compute_the_same_integers():
    q, x = _trained()
    before = _values(q)
    blob = mqk.convert_to_tflite(q, mode="int8", align_biases=False)
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(q)))  # untouched
    unaligned = _off_by_one_step(q, blob, x)
    assert unaligned[1] > 0  # the first fused block already rounds differently

    aligned_blob = mqk.convert_to_tflite(q, mode="int8")
    assert aligned_blob == blob  # the file does not move; the model does
    moved = [np.abs(a - b).max() for a, b in zip(before, _values(q))]
    assert 0 < max(moved) < 1e-3
    # Every folded bias now sits on the file's grid: a second pass moves
    # nothing, and each first move was at most half an int32 step.
    again = integer_bias.align_biases(q.quantized_model, blob)
    assert again["aligned"] == 4 and again["unmatched"] == []
    assert again["max_shift_steps"] < 1e-4
    aligned = _off_by_one_step(q, blob, x)
    assert aligned[1] == 0
    assert sum(aligned) * 10 <= sum(unaligned), (aligned, unaligned)
    report = mqk.verify_tflite(q, blob, x)
    assert report["top1_agreement"] == 1.0


def test_shift_is_at_most_half_an_int32_step():
    q, _ = _trained(seed=1)
    blob = mqk.convert_to_tflite(q, mode="int8", align_biases=False)
    bns = [l for l in q.quantized_model.layers if isinstance(l, keras.layers.BatchNormalization)]
    betas = [np.array(bn.beta, np.float64) for bn in bns]
    report = integer_bias.align_biases(q.quantized_model, blob)
    assert report["aligned"] == 4 and 0 < report["max_shift_steps"] < 0.05
    grids = tflite_weights.filter_biases(blob)
    for bn, beta, grid in zip(bns, betas, grids[:2]):  # the two BN convs come first
        shift = np.abs(np.array(bn.beta, np.float64) - beta)
        assert np.all(shift <= 0.5 * grid["scales"] * (1 + 1e-3) + 1e-7)
