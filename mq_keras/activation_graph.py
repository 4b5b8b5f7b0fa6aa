"""Where `ActivationQuantizer`s go: on the tensors TFLite's integer kernels quantize.

The converter folds BatchNormalization into the convolution or Dense before
it, and fuses a ReLU/ReLU6 into the op before it (convolution, Dense, ADD),
so those intermediate tensors never exist as int8 and get no quantizer. A
kernel layer's own activation that TFLite cannot fuse (sigmoid, swish,
tanh, ...) is split off into an `Activation` layer, so that the tensor
between the two is quantized (squeeze-and-excitation's sigmoid convolution,
for one). Ops
that keep the scale of their input (reshape, flatten, max-pooling,
padding, dropout at inference) pass their input's quantization on, so their
output gets none either. Every other tensor gets one: the model's inputs,
the outputs of fused blocks (after their activation), residual adds,
concatenations, average pooling, and the model's outputs. A tensor read by
several ops is quantized once.

Concatenations: TFLite's int8 CONCATENATION has one scale for its inputs
and output. The converter gives an input tensor that only the
concatenation reads the concatenation's scale, so such a tensor gets no
quantizer of its own (rounding it first to a range of its own would be a
second rounding the file does not do). An input that other ops read too
keeps its own int8 tensor, and a range of its own would cost a requantize
op whose fixed-point rounding (XNNPACK: an 8-bit multiplier) Keras cannot
reproduce; it is quantized by the concatenation's own quantizer instead,
which only the concatenation's output trains (`track_range=False`), so
both have one range, as TFMOT's concatenation scheme does.
"""

import keras

from mq_keras.activation_quantizers import ActivationQuantizer


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


# Ops whose int8 TFLite kernels have a fixed output scale and zero point:
# the real range of their int8 output (LOGISTIC and SOFTMAX: scale 1/256,
# zero point -128; TANH: scale 1/128, zero point 0).
_FIXED_RANGES = {"sigmoid": (0.0, 255.0 / 256.0), "softmax": (0.0, 255.0 / 256.0),
                 "tanh": (-1.0, 127.0 / 128.0)}


def _fixed_range(op):
    """The fixed int8 output range of `op` (see `_FIXED_RANGES`), or None."""
    if isinstance(op, keras.layers.Softmax):
        return _FIXED_RANGES["softmax"]
    if isinstance(op, keras.layers.Activation):
        return _FIXED_RANGES.get(getattr(op.activation, "__name__", ""))
    return _FIXED_RANGES.get(type(op).__name__.lower())  # keras.ops nodes


def _is_add(op):
    return isinstance(op, keras.layers.Add) or type(op).__name__ == "Add"


def _is_concatenation(op):
    return isinstance(op, keras.layers.Concatenate) or type(op).__name__ == "Concatenate"


def _output_key(tensor):
    """Which output of which operation a tensor is, in any clone that reuses the layers."""
    history = tensor._keras_history
    return id(history.operation), history.tensor_index


def _concatenation_readers(model):
    """`(only, first)`: tensors (`_output_key`) read only by concatenations, and
    for each tensor some concatenation reads, the first such concatenation."""
    readers = {}
    for op in model.operations:
        for node in op._inbound_nodes:
            for tensor in node.input_tensors:
                readers.setdefault(_output_key(tensor), []).append(op)
    for tensor in keras.tree.flatten(model.outputs):
        readers.setdefault(_output_key(tensor), []).append(None)
    only = {key for key, ops in readers.items() if all(_is_concatenation(op) for op in ops)}
    first = {key: next(op for op in ops if _is_concatenation(op))
             for key, ops in readers.items() if any(_is_concatenation(op) for op in ops)}
    return only, first


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


def is_standalone_batch_norm(layer):
    """A last-axis BatchNormalization that no kernel layer before it absorbs.

    The converter folds a BatchNormalization into the convolution or Dense
    that makes its input; one after an add, a concatenation or the model
    input (ResNetV2's and DenseNet's pre-activation blocks) becomes a MUL and
    an ADD with an unquantized tensor between them. Layers called more than
    once are not considered.
    """
    if not isinstance(layer, keras.layers.BatchNormalization):
        return False
    try:
        tensor = layer.input
    except (AttributeError, ValueError):  # called on several tensors, or never
        return False
    rank = len(tensor.shape)
    return layer.axis % rank == rank - 1 and not isinstance(
        _kind(producer_of(tensor)), _FOLDS_INTO)


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
    cache, of_concatenation, splits = {}, {}, {}
    concatenated_only, concatenated_by = _concatenation_readers(model)

    def concatenation_quantizer(op):
        if id(op) not in of_concatenation:
            of_concatenation[id(op)] = make_quantizer(f"act_quant_{len(cache)}")
        return of_concatenation[id(op)]

    def quantized(tensor, consumer):
        producer = producer_of(tensor)
        if producer is None or not _needs_quantizer(producer, consumer):
            return tensor
        key = _output_key(tensor)
        if _is_concatenation(consumer) and key in concatenated_only:
            return tensor  # the concatenation's quantizer sets its scale
        if id(tensor) not in cache:
            if _is_concatenation(producer):
                cache[id(tensor)] = concatenation_quantizer(producer)(tensor)
            elif key in concatenated_by:  # share the concatenation's range
                cache[id(tensor)] = concatenation_quantizer(concatenated_by[key])(
                    tensor, track_range=False)
            else:
                cache[id(tensor)] = fitted_quantizer(producer)(tensor)
        return cache[id(tensor)]

    def fitted_quantizer(producer):
        name = f"act_quant_{len(cache)}"
        made = make_quantizer(name)
        fixed = _fixed_range(producer)
        if fixed is None or made.num_bits != 8:
            return made
        # The int8 kernel's own output grid: no requantize op after it.
        return ActivationQuantizer(num_bits=8, range_mode="fixed", init_range=fixed, name=name)

    def call(layer, *args, **kwargs):
        args = keras.tree.map_structure(
            lambda t: quantized(t, layer) if isinstance(t, keras.KerasTensor) else t, args)
        if id(layer) not in splits:  # a shared layer is split once
            splits[id(layer)] = _split_activation(layer)
        split = splits[id(layer)]
        out = layer(*args, **kwargs)
        return out if split is None else split(quantized(out, split))

    cloned = keras.models.clone_model(model, clone_function=lambda layer: layer,
                                      call_function=call)
    outputs = [quantized(t, None) if _needs_output_quantizer(t) else t
               for t in keras.tree.flatten(cloned.outputs)]
    outputs = keras.tree.pack_sequence_as(cloned.outputs, outputs)
    return keras.Model(cloned.inputs, outputs, name=model.name)


def _split_activation(layer):
    """An `Activation` layer taking over `layer`'s unfusable activation, or None.

    Sets the (freshly cloned) kernel layer's own activation to linear.
    """
    inner = _kind(layer)
    activation = getattr(inner, "activation", None)
    if not isinstance(inner, _FOLDS_INTO) or activation is None:
        return None
    name = getattr(activation, "__name__", "")
    if name == "linear" or name in _FUSED_ACTIVATIONS:
        return None
    inner.activation = keras.activations.get("linear")
    return keras.layers.Activation(activation, name=f"{inner.name}_activation")


# Layers that TFLite runs as two ops, with a tensor between them that no
# quantizer outside the layer can reach.
_TWO_OPS = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
# Layers with tensors inside them that TFLite's integer kernels would need
# ranges for (attention scores, normalisation statistics, recurrent gates),
# or with no integer kernel at all (CONV_3D is float only).
_NOT_INTEGER = tuple(getattr(keras.layers, name) for name in (
    "MultiHeadAttention", "GroupQueryAttention", "Attention", "AdditiveAttention",
    "LayerNormalization", "GroupNormalization", "UnitNormalization", "RMSNormalization", "RNN",
    "Bidirectional", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D", "Conv3D",
    "Conv3DTranspose") if hasattr(keras.layers, name))


def _check_no_hidden_tensors(model):
    """Refuses, before training, what the full-integer export would refuse after."""
    hidden = [_kind(op).name for op in model.layers if isinstance(_kind(op), _TWO_OPS)]
    if hidden:
        raise ValueError(
            f"Layers {hidden} are separable convolutions: TFLite runs each as a "
            "depthwise and a pointwise convolution, and the tensor between "
            "them would have no trained range, so the int8 file could not be "
            "all-integer. Build the model with DepthwiseConv2D followed by "
            "Conv2D(filters, 1) (the same function) to quantize activations, or "
            "leave activation_quantizer=None.")
    other = [f"{_kind(op).name} ({type(_kind(op)).__name__})" for op in model.layers
             if isinstance(_kind(op), _NOT_INTEGER)]
    if other:
        raise ValueError(
            f"Layers {other} cannot run all-integer in TFLite: they hold tensors "
            "(attention scores, normalisation statistics, recurrent gates) that "
            "no activation quantizer between layers can give a range, or have no "
            "int8 kernel (Conv3D), so the full-integer file that "
            "activation_quantizer= trains for could not be written. Leave "
            "activation_quantizer=None and export with mode='weights' (quantized "
            "weights, float activations), or mode='int8' with a "
            "representative_dataset (those layers' ops stay float).")


def _needs_output_quantizer(tensor):
    producer = producer_of(tensor)
    return producer is not None and not isinstance(_kind(producer), _SAME_SCALE)
