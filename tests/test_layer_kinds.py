"""Kernels beyond Dense and convolutions: attention, embeddings, recurrent, Conv3D.

Each model kind trains with MetaQuant, round-trips `.keras`, and exports to a
TFLite file of builtin ops whose stored integer codes decode to exactly the
values of the Keras `Q(A(W))` kernels.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import mq_keras as mqk
from mq_keras import kernels, tflite_weights


def _text_classifier(vocab=40, length=10):
    """A transformer text classifier written the usual way."""
    inp = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocab, 16, name="tokens")(inp)
    att = keras.layers.MultiHeadAttention(2, 8, dropout=0.1, name="attention")(h, h)
    h = keras.layers.LayerNormalization()(h + att)
    ffn = keras.layers.Dense(16, name="ffn_out")(keras.layers.Dense(32, activation="relu",
                                                                    name="ffn_in")(h))
    h = keras.layers.LayerNormalization()(h + ffn)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inp, keras.layers.Dense(3, name="logits")(h))


def _keyword_spotter(steps=12, features=10):
    """An LSTM keyword-spotting model on MFCC-like frames."""
    inp = keras.Input((steps, features))
    h = keras.layers.Conv1D(16, 3, padding="same", activation="relu", name="frontend")(inp)
    h = keras.layers.LSTM(16, return_sequences=True, name="lstm")(h)
    h = keras.layers.LSTM(8, name="lstm_last")(h)
    return keras.Model(inp, keras.layers.Dense(4, name="logits")(h))


def _recurrent_mix(steps=8, features=6):
    inp = keras.Input((steps, features))
    h = keras.layers.Bidirectional(keras.layers.GRU(6, return_sequences=True), name="bigru")(inp)
    h = keras.layers.SimpleRNN(5, recurrent_dropout=0.1, dropout=0.1, name="rnn")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="logits")(h))


def _volumetric():
    inp = keras.Input((6, 6, 6, 2))
    h = keras.layers.Conv3D(4, 3, activation="relu", name="conv3d")(inp)
    h = keras.layers.GlobalAveragePooling3D()(h)
    return keras.Model(inp, keras.layers.Dense(3, name="logits")(h))


def _data(model, n=48, seed=0):
    rng = np.random.default_rng(seed)
    spec = model.inputs[0]
    shape = (n,) + tuple(spec.shape[1:])
    if "int" in spec.dtype:
        x = rng.integers(1, 40, size=shape).astype("int32")
    else:
        x = rng.normal(size=shape).astype("float32")
    classes = model.outputs[0].shape[-1]
    return x, rng.integers(0, classes, size=n)


MODELS = {
    "transformer": (_text_classifier, 8),  # embeddings, 4 projections, 2 ffn, logits
    "lstm_kws": (_keyword_spotter, 6),  # conv, 2 x (kernel, recurrent), logits
    "gru_rnn": (_recurrent_mix, 7),  # 2 directions x 2, rnn x 2, logits
    "conv3d": (_volumetric, 2),
}


def _compile(q):
    q.compile(optimizer=keras.optimizers.SGD(0.05), meta_optimizer=mqk.PaperAdam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return q


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_kind_trains_saves_and_exports_exact_codes(kind, tmp_path):
    build, n_kernels = MODELS[kind]
    model = build()
    x, y = _data(model)
    q = _compile(mqk.quantize_model(model, num_bits=2, verbose=False))
    assert sum(len(w.slots) for w in q.wrappers) == n_kernels
    assert mqk.summary(q, print_fn=None)["quantized_fraction"] == 1.0
    before = [s.variable.numpy().copy() for w in q.wrappers for s in w.slots]
    q.fit(x, y, batch_size=16, epochs=1, verbose=0)
    after = [s.variable.numpy() for w in q.wrappers for s in w.slots]
    assert all(not np.array_equal(a, b) for a, b in zip(after, before))  # every kernel trains
    assert all(np.isfinite(a).all() for a in after)

    path = tmp_path / f"{kind}.keras"
    q.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), q.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)

    blob = mqk.convert_to_tflite(q)
    report = mqk.verify_tflite(q, blob, x.astype("float32"))
    assert report["flex_ops"] == []
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    # Every Keras Q(W) is stored as codes whose decoded values are exactly
    # its values (TFLite may transpose or reshape it: compare sorted values).
    decoded = [np.sort((codes * np.expand_dims(scales, tuple(
        i for i in range(codes.ndim) if i != axis))).ravel())
        for codes, scales, axis in tflite_weights.filter_values(blob).values()]
    for w in q.wrappers:
        for key, kernel in w.quantized_kernels().items():
            want = np.sort(kernel.ravel())
            assert any(d.shape == want.shape and np.allclose(d, want, rtol=1e-6, atol=1e-7)
                       for d in decoded), f"{w.name}/{key} not stored as exact codes"


@pytest.mark.parametrize("equation,shape,axes", [
    ("ab,bc->ac", (6, 4), (-1,)),
    ("abc,cde->abde", (8, 2, 4), (-2, -1)),  # query/key/value projections
    ("abcd,cde->abe", (2, 4, 8), (-1,)),  # attention output
    ("...b,bc->...c", (6, 4), (-1,)),
])
def test_einsum_channel_axes_and_per_channel_scales(equation, shape, axes):
    assert kernels.einsum_output_axes(equation) == axes
    w = np.random.default_rng(0).normal(size=shape).astype("float32")
    bwn = mqk.quantizers.get("bwn", per_channel=True)
    got = np.asarray(bwn.quantize(bwn.pre_quantize(w, axes), axes))
    reduce = tuple(i for i in range(w.ndim) if i - w.ndim not in axes)
    alpha = np.abs(w).mean(axis=reduce, keepdims=True)  # one scale per output channel
    np.testing.assert_allclose(got, alpha * np.where(w >= 0, 1.0, -1.0), rtol=1e-6)


def test_recurrent_kernel_gradient_is_dl_dw_hat():
    """The meta network sees dL/dW_hat of the recurrent kernel, through every step."""
    model = _keyword_spotter()
    x, y = _data(model, n=16)
    q = _compile(mqk.quantize_model(model, meta_network="fc_grad", verbose=False))
    stripped = mqk.strip_model(q)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    cell = stripped.get_layer("lstm").cell
    with tf.GradientTape() as tape:
        loss = loss_fn(y, stripped(x, training=True))
    expected = tape.gradient(loss, cell.recurrent_kernel.value).numpy()
    q.train_on_batch(x, y)  # first step: records dL/dW_hat at W
    wrapper = next(w for w in q.wrappers if w.layer.name == "lstm")
    slot = next(s for s in wrapper.slots if s.key.endswith("recurrent_kernel"))
    np.testing.assert_allclose(slot.prev_grad.numpy(), expected, rtol=1e-4, atol=1e-7)
    assert np.abs(expected).max() > 0


def test_wrapped_dropout_draws_new_masks_each_step():
    """State a wrapped layer writes (dropout seeds, BN statistics) is kept."""
    inp = keras.Input((5,))
    block = keras.Sequential([keras.layers.Dense(64), keras.layers.Dropout(0.5),
                              keras.layers.BatchNormalization()], name="block")
    wrapper = mqk.MetaQuantWrapper(block)
    out = wrapper(inp)
    keras.Model(inp, out)
    x = np.ones((4, 5), "float32")
    first = wrapper(x, training=True).numpy()
    second = wrapper(x, training=True).numpy()
    assert not np.allclose(first, second)  # the seed advanced
    bn = block.layers[-1]
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)  # statistics written
