"""Where `ActivationQuantizer`s go: on the tensors TFLite's integer kernels quantize.

The converter folds BatchNormalization into the convolution or Dense before
it, and fuses a ReLU/ReLU6 into the op before it (convolution, Dense, ADD),
so those intermediate tensors never exist as int8 and get no quantizer. Ops
that keep the scale of their input (reshape, flatten, max-pooling,
padding, dropout at inference) pass their input's quantization on, so their
output gets none either. Every other tensor gets one: the model's inputs,
the outputs of fused blocks (after their activation), residual adds,
concatenations, average pooling, and the model's outputs. A tensor read by
several ops is quantized once.
"""

import keras


_FOLDS_INTO = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
               keras.layers.Conv3D, keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
               keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
               keras.layers.EinsumDense)
_SAME_SCALE = (keras.layers.Reshape, keras.layers.Flatten, keras.layers.MaxPooling1D,
               keras.layers.MaxPooling2D, keras.layers.MaxPooling3D, keras.layers.Dropout,
               keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D,
               keras.layers.Cropping1D, keras.layers.Cropping2D, keras.layers.Permute,
               keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D,
               keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D)
_FUSED_ACTIVATIONS = ("relu", "relu6")


def _kind(op):
    """The op itself, or the layer a `MetaQuantWrapper` wraps."""
    inner = getattr(op, "layer", None)
    return inner if isinstance(inner, keras.layers.Layer) else op


def _is_fused_activation(op):
    if isinstance(op, keras.layers.ReLU):
        return op.negative_slope == 0 and op.threshold == 0 and op.max_value in (None, 6)
    if isinstance(op, keras.layers.Activation):
        return getattr(op.activation, "__name__", "") in _FUSED_ACTIVATIONS
    return False


def _is_add(op):
    return isinstance(op, keras.layers.Add) or type(op).__name__ == "Add"


def _needs_quantizer(producer, consumer):
    """Whether the tensor `producer` -> `consumer` is int8 in the converted file."""
    p, c = _kind(producer), _kind(consumer)
    if isinstance(p, _SAME_SCALE):
        return False
    if isinstance(c, keras.layers.BatchNormalization) and isinstance(p, _FOLDS_INTO):
        return False
    if _is_fused_activation(c) and (isinstance(p, _FOLDS_INTO + (keras.layers.BatchNormalization,))
                                    or _is_add(p)):
        return False
    return True


def producer_of(tensor):
    """The operation that made a symbolic tensor (None for a model input)."""
    # Keras' own record of which operation made a symbolic tensor.
    history = getattr(tensor, "_keras_history", None)
    return history.operation if history is not None else None


def insert_activation_quantizers(model, make_quantizer):
    """Returns a copy of a Functional `model` with activation quantizers inserted.

    Args:
        model: a built Functional model (its layers are reused, not copied:
            call this on a fresh clone).
        make_quantizer: `name -> ActivationQuantizer`.

    Returns:
        The new model, sharing `model`'s layers and weights.
    """
    _check_no_hidden_tensors(model)
    cache = {}

    def quantized(tensor, consumer):
        producer = producer_of(tensor)
        if producer is None or not _needs_quantizer(producer, consumer):
            return tensor
        if id(tensor) not in cache:
            cache[id(tensor)] = make_quantizer(f"act_quant_{len(cache)}")(tensor)
        return cache[id(tensor)]

    def call(layer, *args, **kwargs):
        args = keras.tree.map_structure(
            lambda t: quantized(t, layer) if isinstance(t, keras.KerasTensor) else t, args)
        return layer(*args, **kwargs)

    cloned = keras.models.clone_model(model, clone_function=lambda layer: layer,
                                      call_function=call)
    outputs = [quantized(t, None) if _needs_output_quantizer(t) else t
               for t in keras.tree.flatten(cloned.outputs)]
    outputs = keras.tree.pack_sequence_as(cloned.outputs, outputs)
    return keras.Model(cloned.inputs, outputs, name=model.name)


# Layers that TFLite runs as two ops, with a tensor between them that no
# quantizer outside the layer can reach.
_TWO_OPS = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)


def _check_no_hidden_tensors(model):
    hidden = [_kind(op).name for op in model.layers if isinstance(_kind(op), _TWO_OPS)]
    if hidden:
        raise ValueError(
            f"Layers {hidden} are separable convolutions: TFLite runs each as a "
            "depthwise and a pointwise convolution, and the tensor between "
            "them would have no trained range, so the int8 file could not be "
            "all-integer. Build the model with DepthwiseConv2D followed by "
            "Conv2D(filters, 1) (the same function) to quantize activations, or "
            "leave activation_quantizer=None.")


def _needs_output_quantizer(tensor):
    producer = producer_of(tensor)
    return producer is not None and not isinstance(_kind(producer), _SAME_SCALE)
