"""Keras-level rewrites a plain model needs before the TFLite converter.

Recurrent layers: Keras runs `LSTM`, `GRU` and `SimpleRNN` as a
`tf.while_loop` over a TensorList whose element shape depends on the batch
size; TFLite's builtin ops cannot lower that ("'tf.TensorListReserve' op
requires element_shape to be static"; TF 2.21 fuses none of Keras 3's
recurrent layers). With a static number of time steps the loop is unrolled
instead: the layer computes the same function with one FULLY_CONNECTED per
step and kernel, all builtin, and the kernels stay constants that
`tflite_weights` stores as exact codes. The cost is a graph that grows with
the sequence length (the weights are shared, so the file does not).

Per-channel affine layers: a standalone BatchNormalization (after an add or
a concatenation, where no kernel layer absorbs it), a Rescaling with an
offset and a Normalization (keras.applications' input preprocessing) are
written by the converter as a MUL and an ADD (or SUB), and the tensor
between them has no trained range, so a full-integer file cannot hold
them. In inference each is `y = x * a + b` per channel, exactly a 1x1
depthwise convolution with kernel `a` and bias `b`: one int8
DEPTHWISE_CONV_2D whose per-channel filter scale `|a| / 127` holds `a`
exactly (code +-127), between the ranges the activation quantizers around
the layer trained.
"""

import keras
import numpy as np

from mq_keras.activation_graph import is_standalone_batch_norm
from mq_keras.cloning import clone_graph, copy_layer
from mq_keras.kernels import sublayers

_UNROLLED = (keras.layers.RNN,)


def _time_steps(layer):
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError):  # unused or shared across shapes
        return None
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    return shape[1] if len(shape) >= 3 else None


def _unroll(config):
    config = dict(config)
    config["unroll"] = True
    return config


def _unrollable(layer):
    if isinstance(layer, keras.layers.Bidirectional):
        inner = layer.forward_layer
        return isinstance(inner, _UNROLLED) and not inner.unroll and _time_steps(layer)
    return isinstance(layer, _UNROLLED) and not layer.unroll and _time_steps(layer)


def _unrolled_copy(layer):
    config = layer.get_config()
    if isinstance(layer, keras.layers.Bidirectional):
        for key in ("layer", "backward_layer"):
            if config.get(key):
                config[key] = dict(config[key], config=_unroll(config[key]["config"]))
    else:
        config = _unroll(config)
    return type(layer).from_config(config)


def unroll_recurrent(model):
    """`model` with every recurrent layer of static length unrolled (else itself).

    Args:
        model: a built Functional/Sequential model without wrappers.

    Returns:
        A clone with the same weights and outputs whose recurrent layers the
        TFLite converter can lower to builtin ops, or `model` when it has none.
    """
    if not any(_unrollable(l) for l in sublayers(model)):
        return model

    def make_layer(layer):
        return _unrolled_copy(layer) if _unrollable(layer) else copy_layer(layer)

    clone, pairs = clone_graph(model, make_layer)
    for old, new in pairs:
        new.set_weights(old.get_weights())
    return clone


_DEPTHWISE = {3: keras.layers.DepthwiseConv1D, 4: keras.layers.DepthwiseConv2D}


def _per_channel(value, channels):
    """`value` (a scalar or one value per channel) as `channels` floats, else None."""
    v = np.asarray(value, np.float64)
    if v.size == 1:
        return np.full(channels, float(v.reshape(())))
    if v.size == channels and v.shape[-1] == channels:
        return v.reshape(channels)
    return None


def _affine(layer):
    """`(a, b)` when `layer` computes `x * a + b` per channel (last axis) in
    inference and the converter would write it as two float-range ops; else None."""
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError):  # called on several tensors, or never
        return None
    if len(shape) not in _DEPTHWISE:
        return None
    c = int(shape[-1])
    if is_standalone_batch_norm(layer):
        gamma = np.asarray(layer.gamma, np.float64) if layer.scale else np.ones(c)
        beta = np.asarray(layer.beta, np.float64) if layer.center else np.zeros(c)
        a = gamma / np.sqrt(np.asarray(layer.moving_variance, np.float64) + layer.epsilon)
        return a, beta - np.asarray(layer.moving_mean, np.float64) * a
    if isinstance(layer, keras.layers.Rescaling) and np.any(np.asarray(layer.offset) != 0):
        a, b = _per_channel(layer.scale, c), _per_channel(layer.offset, c)
        return None if a is None or b is None else (a, b)
    if isinstance(layer, keras.layers.Normalization) and tuple(
            ax % len(shape) for ax in layer.axis) == (len(shape) - 1,):
        mean = _per_channel(layer.mean, c)
        std = _per_channel(np.maximum(np.sqrt(np.asarray(layer.variance, np.float64)),
                                      keras.backend.epsilon()), c)
        if mean is None or std is None:
            return None
        return (std, mean) if layer.invert else (1.0 / std, -mean / std)
    return None


def _as_depthwise(layer, a, b):
    """A 1x1 depthwise convolution computing `x * a + b`, named like `layer`."""
    shape = layer.input.shape
    conv = _DEPTHWISE[len(shape)](kernel_size=1, use_bias=True, name=layer.name,
                                  dtype=layer.dtype_policy)
    conv.build(shape)
    kernel = conv.kernel
    conv.set_weights([a.reshape(kernel.shape).astype(kernel.dtype), b.astype(kernel.dtype)])
    return conv


def affine_layers_as_depthwise(model):
    """`model` with each per-channel affine layer (`_affine`) as a 1x1 depthwise conv.

    Args:
        model: a built Functional/Sequential model without wrappers.

    Returns:
        A clone computing the same inference function (to float rounding)
        with no standalone BatchNormalization, offset Rescaling or
        Normalization on a 1-D/2-D feature map left, or `model` when it has
        none.
    """
    if not any(_affine(l) is not None for l in model.layers):
        return model
    swapped = set()

    def make_layer(layer):
        affine = _affine(layer)
        if affine is None:
            return copy_layer(layer)
        swapped.add(id(layer))
        return _as_depthwise(layer, *affine)

    clone, pairs = clone_graph(model, make_layer)
    for old, new in pairs:
        if id(old) not in swapped:
            new.set_weights(old.get_weights())
    return clone
