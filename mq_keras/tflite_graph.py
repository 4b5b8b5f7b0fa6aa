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
"""

import keras

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
