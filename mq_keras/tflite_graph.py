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

Standalone BatchNormalization (after an add or a concatenation, where no
kernel layer absorbs it): the converter writes it as a MUL and an ADD, and
the tensor between them has no trained range, so a full-integer file
cannot hold it. In inference it is the per-channel affine map
`y = x * a + b` with `a = gamma / sqrt(var + eps)`, `b = beta - mean * a`,
which is exactly a 1x1 depthwise convolution with kernel `a` and bias `b`:
one int8 DEPTHWISE_CONV_2D whose per-channel filter scale `|a| / 127` holds
`a` exactly (code +-127), with the input and output ranges the activation
quantizers around the BatchNormalization trained.
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


def _as_depthwise(bn):
    """A 1x1 depthwise convolution computing `bn` in inference mode."""
    shape = bn.input.shape
    layer = _DEPTHWISE[len(shape)](kernel_size=1, use_bias=True, name=bn.name,
                                   dtype=bn.dtype_policy)
    layer.build(shape)
    channels = int(shape[-1])
    gamma = np.asarray(bn.gamma, np.float64) if bn.scale else np.ones(channels)
    beta = np.asarray(bn.beta, np.float64) if bn.center else np.zeros(channels)
    a = gamma / np.sqrt(np.asarray(bn.moving_variance, np.float64) + bn.epsilon)
    b = beta - np.asarray(bn.moving_mean, np.float64) * a
    kernel = layer.kernel
    layer.set_weights([a.reshape(kernel.shape).astype(kernel.dtype), b.astype(kernel.dtype)])
    return layer


def batch_norms_as_depthwise(model):
    """`model` with each standalone 1-D/2-D BatchNormalization as a 1x1 depthwise conv.

    Args:
        model: a built Functional/Sequential model without wrappers.

    Returns:
        A clone computing the same inference function (to float rounding)
        in which no BatchNormalization is left that the converter would
        write as MUL + ADD, or `model` when it has none.
    """
    def rewritten(layer):
        return is_standalone_batch_norm(layer) and len(layer.input.shape) in _DEPTHWISE

    if not any(rewritten(l) for l in model.layers):
        return model
    swapped = {}

    def make_layer(layer):
        if rewritten(layer):
            swapped[id(layer)] = True
            return _as_depthwise(layer)
        return copy_layer(layer)

    clone, pairs = clone_graph(model, make_layer)
    for old, new in pairs:
        if id(old) not in swapped:
            new.set_weights(old.get_weights())
    return clone
