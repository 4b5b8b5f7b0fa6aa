"""Keep a model's folded biases on the int32 grid of its full-integer file.

A full-integer TFLite op computes, per output channel `c`,

    out_q = round(M_c * (acc + k_c)) + z_out,   acc = sum (q_in - z_in) * code_w,

with an int32 bias `k_c = round(b'_c / (s_in * s_w,c))`, where `b'_c` is the
bias after the converter folds BatchNormalization in
(`b' = beta + (b - mean) * gamma / sqrt(var + eps)`, or the layer's own bias
without a BatchNormalization). The fake-quantized Keras model computes the
same expression with the real `b'_c`, so the two differ by
`delta_c = b'_c - k_c * s_in * s_w,c`, at most half an int32 step: a
constant shift of up to about 0.001-0.01 output steps per channel. That is
small, but it moves values across rounding boundaries on some 0.03-0.3% of a
layer's activations, and in a deep network every such one-step difference
propagates and multiplies (ResNet20 w4a8, 30 steps from the paper's float
weights: 44% of the logits differed by up to 3 steps, and 0.5-0.75% of top-1
predictions).

`align_biases` removes the shift at its source: it moves each folded bias of
the Keras model onto the file's grid (`beta -= delta`, or `bias -= delta`
without a BatchNormalization), after which Keras and the file compute the
same integers up to float32 rounding. The move is at most half an int32
step per channel, below 1% of an output quantization step, so accuracy is
unchanged; the file itself is unchanged (its `k_c` already is the grid
point the model moves to).
"""

import keras
import numpy as np

from mq_keras import tflite_weights
from mq_keras.activation_graph import is_standalone_batch_norm, producer_of
from mq_keras.layers import MetaQuantWrapper

_KERNEL_LAYERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
                  keras.layers.Conv3D, keras.layers.DepthwiseConv1D,
                  keras.layers.DepthwiseConv2D, keras.layers.Conv2DTranspose)
# A folded bias matches a file's int32 bias when every channel agrees within
# this fraction of the op's output step: the int32 rounding is below 1% of a
# step, and a wrong pairing (another layer's bias) is off by many steps.
_MATCH_STEPS = 0.05


def _kernel_layer(layer):
    inner = layer.layer if isinstance(layer, MetaQuantWrapper) else layer
    return inner if isinstance(inner, _KERNEL_LAYERS) else None


def _single_input(layer):
    try:
        return layer.input
    except (AttributeError, ValueError):  # called on several tensors, or never
        return None


class _Folded:
    """One kernel layer, the BatchNormalization folded into it, and `b'`.

    `end` is the model layer whose output is the filter op's (before a fused
    activation): the BatchNormalization, or else the kernel layer.
    """

    def __init__(self, layer, inner, bn):
        # `inner` None: a standalone BatchNormalization, exported as a 1x1
        # depthwise convolution (`tflite_graph.affine_layers_as_depthwise`).
        self.name, self.inner, self.bn = layer.name, inner, bn
        self.end = bn if bn is not None else layer
        bias = getattr(inner, "bias", None) if getattr(inner, "use_bias", False) else None
        self.bias = bias
        b = np.zeros(self._channels(), np.float64) if bias is None else np.asarray(bias, np.float64)
        if bn is None:
            self.slope = np.ones_like(b)  # d b' / d bias
            self.folded = b
            return
        gamma = np.asarray(bn.gamma, np.float64) if bn.scale else np.ones_like(b)
        beta = np.asarray(bn.beta, np.float64) if bn.center else np.zeros_like(b)
        mean = np.asarray(bn.moving_mean, np.float64)
        var = np.asarray(bn.moving_variance, np.float64)
        self.slope = gamma / np.sqrt(var + bn.epsilon)
        self.folded = beta + (b - mean) * self.slope

    def _channels(self):
        if self.inner is None:
            return int(self.bn.moving_mean.shape[0])
        shape = self.inner.kernel.shape
        if isinstance(self.inner, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
            return int(shape[-2] * shape[-1])
        if isinstance(self.inner, keras.layers.Conv2DTranspose):  # (h, w, out, in)
            return int(shape[-2])
        return int(shape[-1])

    def shift(self, delta):
        """Moves `b'` by `-delta`; returns False if no variable can carry it."""
        if self.bn is not None and self.bn.center:
            self.bn.beta.assign(np.asarray(self.bn.beta, np.float64) - delta)
            return True
        if self.bias is None or np.any(self.slope == 0):
            return not np.any(delta)
        self.bias.assign(np.asarray(self.bias, np.float64) - delta / self.slope)
        return True


def _folded_layers(model):
    """`_Folded` for every kernel layer of a flat graph model, in layer order."""
    bn_of = {}
    for layer in model.layers:
        tensor = _single_input(layer) if isinstance(
            layer, keras.layers.BatchNormalization) else None
        # Only a per-channel (last axis) normalization folds into a filter.
        if tensor is not None and layer.axis % len(tensor.shape) == len(tensor.shape) - 1:
            producer = producer_of(tensor)
            if producer is not None:
                bn_of[id(producer)] = layer
    return [_Folded(layer, _kernel_layer(layer), bn_of.get(id(layer)))
            for layer in model.layers if _kernel_layer(layer) is not None] + [
        _Folded(layer, None, layer)
        for layer in model.layers if is_standalone_batch_norm(layer)]


def matched_filter_ops(model, flatbuffer):
    """Pairs each kernel layer (with its BatchNormalization) to its filter op.

    A folded bias `b'` matches the op whose int32 bias `k * s` it equals
    within `_MATCH_STEPS` output steps (after `align_biases`, exactly).

    Returns:
        `(pairs, unmatched)`: `(entry, op)` pairs, `entry` with `name`,
        `end` (the layer whose output the op computes) and `folded`, `op` a
        dict of `tflite_weights.filter_biases`; and the names of kernel
        layers no op matched.
    """
    ops = tflite_weights.filter_biases(flatbuffer)
    used = set()
    pairs, unmatched = [], []
    for entry in _folded_layers(model):
        match = None
        for i, op in enumerate(ops):
            if i in used or op["codes"].shape != entry.folded.shape:
                continue
            grid = op["codes"] * op["scales"]
            if np.all(np.abs(grid - entry.folded) <= _MATCH_STEPS * op["output_scale"]):
                match = i
                break
        if match is None:
            unmatched.append(entry.name)
            continue
        used.add(match)
        pairs.append((entry, ops[match]))
    return pairs, unmatched


def align_biases(model, flatbuffer):
    """Moves the folded biases of `model` onto the int32 grid of `flatbuffer`.

    For every kernel layer (Dense, convolutions) with the BatchNormalization
    that follows it, the folded bias `b'` is matched to the int32 bias
    `k * s` of a filter op of the file, and moved to `k * s` (the
    BatchNormalization's `beta`, or the layer's `bias` without one). Forward
    after: Keras computes `acc * s + k * s` where the file computes
    `(acc + k) * s` (module docstring). No gradient is involved.

    Args:
        model: the flat Functional/Sequential graph the file was converted
            from (a `MetaQuantModel`'s `quantized_model`); its variables are
            changed in place.
        flatbuffer: the full-integer TFLite file of that model.

    Returns:
        A dict: `aligned` (number of layers moved onto the grid),
        `unmatched` (names of kernel layers no filter op matched: the file
        keeps their shift), and `max_shift_steps` (the largest move, in
        output quantization steps of the layer's op).
    """
    pairs, unmatched = matched_filter_ops(model, flatbuffer)
    aligned, max_shift = 0, 0.0
    for entry, op in pairs:
        delta = entry.folded - op["codes"] * op["scales"]
        if not entry.shift(delta):
            unmatched.append(entry.name)
            continue
        aligned += 1
        max_shift = max(max_shift, float(np.abs(delta).max() / op["output_scale"]))
    return dict(aligned=aligned, unmatched=unmatched, max_shift_steps=max_shift)
