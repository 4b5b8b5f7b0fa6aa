"""quantize_model and MetaQuantWrapper: cloning, layer coverage, errors."""

import numpy as np
import keras
import pytest
import tensorflow as tf

import mq_keras as mqk
from mq_keras.layers import MetaQuantWrapper
from mq_keras.quantizers import Quantizer

from tiny_models import tiny_cnn


class _Identity(Quantizer):
    """Test-only quantizer: W_hat = W_tilde = W."""

    name = "identity"
    allowed_bits = (32,)

    def pre_quantize(self, w, channel_axes=(-1,)):
        return w

    def quantize(self, w_tilde, channel_axes=(-1,)):
        return w_tilde


LAYERS = [
    (lambda: keras.layers.Dense(5), (7,)),
    (lambda: keras.layers.Conv1D(4, 3, padding="same"), (9, 3)),
    (lambda: keras.layers.Conv2D(4, 3, strides=2), (9, 9, 3)),
    (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (8, 8, 3)),
    (lambda: keras.layers.SeparableConv2D(4, 3, depth_multiplier=2), (8, 8, 3)),
    (lambda: keras.layers.Conv2DTranspose(4, 3, strides=2), (5, 5, 3)),
]


@pytest.mark.parametrize("make,shape", LAYERS)
def test_identity_quantizer_equals_bare_layer(make, shape):
    bare = make()
    x = np.random.default_rng(0).normal(size=(2,) + shape).astype("float32")
    y_bare = bare(x)
    wrapped = MetaQuantWrapper(bare.__class__.from_config(bare.get_config()),
                               kernel_quantizer=_Identity(num_bits=32))
    wrapped.build((None,) + shape)
    wrapped.layer.set_weights(bare.get_weights())
    with tf.GradientTape(persistent=True) as tape:
        y_bare = bare(x)
        y_wrap = wrapped(x)
        l_bare = tf.reduce_sum(y_bare**2)
        l_wrap = tf.reduce_sum(y_wrap**2)
    np.testing.assert_allclose(y_wrap, y_bare, rtol=1e-6, atol=1e-6)
    for gb, gw in zip(tape.gradient(l_bare, bare.trainable_variables),
                      tape.gradient(l_wrap, wrapped.layer.trainable_variables)):
        np.testing.assert_allclose(gw, gb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,shape", LAYERS)
def test_wrapped_layer_uses_quantized_kernels(make, shape):
    layer = make()
    w = MetaQuantWrapper(layer, kernel_quantizer="dorefa", num_bits=1)
    x = np.random.default_rng(1).normal(size=(2,) + shape).astype("float32")
    y = w(x)
    reference = layer.__class__.from_config(layer.get_config())
    reference.build((None,) + shape)
    q = w.quantized_kernels()
    reference.set_weights([q.get(v.name, v.numpy()) for v in layer.weights])
    for v in q.values():
        assert set(np.unique(v)) <= {-1.0, 1.0}
    np.testing.assert_allclose(y, reference(x), rtol=1e-5, atol=1e-5)


def test_input_model_untouched_and_weights_copied():
    model = tiny_cnn()
    x = np.random.default_rng(2).normal(size=(4, 8, 8, 1)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    q = mqk.quantize_model(model, verbose=False)
    q.compile(optimizer=keras.optimizers.SGD(0.1), meta_optimizer=mqk.PaperAdam(),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, np.array([0, 1, 2, 0]), epochs=2, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not any(isinstance(l, MetaQuantWrapper) for l in model.layers)
    # Copied weights: the wrapped kernels started from the float ones.
    fresh = mqk.quantize_model(model, verbose=False)
    conv = fresh.wrappers[0]
    np.testing.assert_array_equal(conv.layer.get_weights()[0], model.get_layer("c1").get_weights()[0])
    np.testing.assert_array_equal(
        fresh.quantized_model.get_layer("bn").get_weights()[2],
        model.get_layer("bn").get_weights()[2])


def test_all_supported_layers_are_wrapped_first_and_last_included(capsys):
    q = mqk.quantize_model(tiny_cnn())
    assert [w.layer.name for w in q.wrappers] == ["c1", "fc"]
    out = capsys.readouterr().out
    assert "left float" in out and "bn" in out


def test_nested_sequential_and_functional():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="inner_fc"),
                              keras.layers.ReLU()], name="inner")
    inp = keras.Input((4,))
    h = keras.layers.Dense(6, name="outer_fc")(inp)
    out = keras.layers.Dense(2, name="head")(inner(h))
    model = keras.Model(inp, out)
    q = mqk.quantize_model(model, verbose=False)
    assert sorted(w.layer.name for w in q.wrappers) == ["head", "inner_fc", "outer_fc"]
    x = np.random.default_rng(3).normal(size=(5, 4)).astype("float32")
    assert q.predict(x, verbose=0).shape == (5, 2)


def test_filters_by_name_and_callable():
    q = mqk.quantize_model(tiny_cnn(), filters=["fc"], verbose=False)
    assert [w.layer.name for w in q.wrappers] == ["fc"]
    q = mqk.quantize_model(tiny_cnn(), filters=lambda l: l.name != "fc", verbose=False)
    assert [w.layer.name for w in q.wrappers] == ["c1"]
    with pytest.raises(ValueError, match="not in model"):
        mqk.quantize_model(tiny_cnn(), filters=["nope"])
    with pytest.raises(ValueError, match="No layer"):
        mqk.quantize_model(tiny_cnn(), filters=lambda l: False)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.fc = keras.layers.Dense(2)

    def call(self, x):
        return self.fc(x)


@pytest.mark.parametrize("kwargs,match", [
    ({"kernel_quantizer": "nope"}, "Unknown kernel_quantizer"),
    ({"num_bits": 9}, "num_bits"),
    ({"kernel_quantizer": "bwn", "num_bits": 2}, "num_bits"),
    ({"meta_network": "nope"}, "Unknown meta_network"),
    ({"estimator": "nope"}, "Unknown estimator"),
    ({"semantics": "nope"}, "Unknown semantics"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mqk.quantize_model(tiny_cnn(), **kwargs)


def test_bad_models():
    sub = _Subclassed()
    sub(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="subclassed"):
        mqk.quantize_model(sub)
    with pytest.raises(ValueError, match="not built"):
        mqk.quantize_model(keras.Sequential([keras.layers.Dense(2)]))
    q = mqk.quantize_model(tiny_cnn(), verbose=False)
    with pytest.raises(ValueError, match="already a MetaQuantModel"):
        mqk.quantize_model(q)
    with pytest.raises(ValueError, match="already contains MetaQuantWrapper"):
        mqk.quantize_model(q.quantized_model)
    no_kernel = keras.Sequential([keras.Input((3,)), keras.layers.ReLU()])
    with pytest.raises(ValueError, match="No layer"):
        mqk.quantize_model(no_kernel)
    with pytest.raises(ValueError, match="cannot quantize"):
        MetaQuantWrapper(keras.layers.BatchNormalization())


def test_ste_alias_and_quantizer_options():
    q = mqk.quantize_model(tiny_cnn(), meta_network="ste", kernel_quantizer="bwn",
                           quantizer_options={"per_channel": True}, verbose=False)
    assert q.estimator == "ste" and q.meta_network is None
    assert q.wrappers[0].kernel_quantizer.per_channel


def test_multifc_with_signed_w_tilde_warns():
    with pytest.warns(UserWarning, match="reverses"):
        mqk.quantize_model(tiny_cnn(), kernel_quantizer="bwn", meta_network="multifc",
                           verbose=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mqk.quantize_model(tiny_cnn(), kernel_quantizer="dorefa", meta_network="multifc",
                           verbose=False)
        mqk.quantize_model(tiny_cnn(), kernel_quantizer="bwn", meta_network="gain_mlp",
                           verbose=False)


def test_ste_wrappers_keep_no_metaquant_state():
    """The STE needs no dL/dW_hat, W_tilde or r: 3 floats per weight saved."""
    model = tiny_cnn()
    ste = mqk.quantize_model(model, estimator="ste", verbose=False)
    meta = mqk.quantize_model(model, verbose=False)
    assert all(not w.record_state and not w.non_trainable_weights
               for w in mqk.models.wrappers_of(ste.quantized_model))
    n_state = sum(int(np.prod(v.shape)) for w in mqk.models.wrappers_of(meta.quantized_model)
                  for v in w.non_trainable_weights)
    n_kernels = sum(int(np.prod(s.variable.shape)) for _, s in meta._slots)
    n_biases = sum(int(np.prod(w.bias_variable.shape)) for w in meta.wrappers
                   if w.bias_variable is not None)
    assert n_state == 3 * n_kernels + n_biases
    with pytest.raises(ValueError, match="record_state=False.*estimator='metaquant'"):
        mqk.MetaQuantModel(ste.quantized_model, "multifc")
