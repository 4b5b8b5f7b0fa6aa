"""Keras inference that rounds like the full-integer file: `file_rounding`.

A model trained with activation quantizers and its full-integer file
compute the same integers up to float round-off: Keras computes a block
(convolution or Dense, folded BatchNorm, ReLU) in float32 and rounds
`x / s_out`; XNNPACK (LiteRT's CPU kernels) computes the exact int32
accumulator `acc + k` and rounds `float32(acc + k) * (s_in * s_w / s_out)`.
The two products differ by about 1e-7 relative, so some 1e-5 of a layer's
values that lie within that distance of a rounding boundary round the other
way; in a deep network each such one-step difference spreads (ResNet20
w4a8: 0.1-0.25% of top-1 predictions). No integer arithmetic differs:
every first difference sits at a block whose inputs agree exactly.

`file_rounding(model, flatbuffer)` makes the model's inference round each
such block's output as the file's op does, from the file's own scales: the
quantizer after the block recovers `acc + k = round(x / (s_in * s_w))`
(Keras' float error is far below one accumulator unit) and requantizes it
in float32 as XNNPACK does; a residual `Add` of two quantized tensors
computes XNNPACK's int8 ADD (`_xnnpack_add`). Inside it, `model.predict` /
`evaluate` give the file's integers on every op so handled (a trained
ResNet20 and MobileNetV2: every logit of 3 x 10,000 test images); training
is unchanged, and the model is restored on exit. Other ops (average
pooling, concatenations' shared quantizers, fixed-grid sigmoid/tanh, and
activation quantizers below 8 bits) keep fake-quant rounding.
"""

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf

from mq_keras import integer_bias, tflite_weights
from mq_keras.activation_graph import producer_of
from mq_keras.activation_quantizers import ActivationQuantizer
from mq_keras.models import MetaQuantModel

# TFLite's fused ActivationFunctionType: NONE, RELU, RELU6 (the others are
# left to fake-quant rounding).
_NONE, _RELU, _RELU6 = 0, 1, 3


def _graph_nodes(model):
    """The call nodes of a flat graph model (its own, not those of other
    graphs its layers are also called in)."""
    model = getattr(model, "_functional", None) or model  # a built Sequential's graph
    by_depth = getattr(model, "_nodes_by_depth", None) or {}
    return [node for nodes in by_depth.values() for node in nodes]


def _consumers(nodes):
    """`id(layer) -> [distinct layers reading its output]`, and
    `id(layer) -> number of calls`, over `nodes`."""
    readers, calls = {}, {}
    for node in nodes:
        op = node.operation
        calls[id(op)] = calls.get(id(op), 0) + 1
        for tensor in node.input_tensors:
            producer = producer_of(tensor)
            if producer is not None:
                found = readers.setdefault(id(producer), [])
                if all(r is not op for r in found):
                    found.append(op)
    return readers, calls


def _quantizer_after(layer, readers, calls, activation):
    """The `ActivationQuantizer` that alone quantizes `layer`'s output (through
    the fused activation, if any), or None."""
    after = readers.get(id(layer), [])
    if activation != _NONE and len(after) == 1 and not isinstance(after[0],
                                                                   ActivationQuantizer):
        after = readers.get(id(after[0]), [])  # the ReLU layer the op fuses
    if len(after) != 1 or not isinstance(after[0], ActivationQuantizer):
        return None
    # A quantizer called on several tensors (a concatenation's shared one)
    # rounds other ops' outputs too.
    return after[0] if calls.get(id(after[0])) == 1 else None


def _clamp(activation, zero_point, step):
    """Int8 code bounds of a fused activation (None for one not handled)."""
    code_min, code_max = -128, 127
    if activation in (_RELU, _RELU6):
        code_min = max(code_min, zero_point)
    if activation == _RELU6:
        code_max = min(code_max, zero_point + int(np.rint(np.float32(6.0) / np.float32(step))))
    return (code_min, code_max) if activation in (_NONE, _RELU, _RELU6) else None


def _rounding(op):
    """The `ActivationQuantizer.set_file_rounding` parameters of a filter op."""
    if op["input_scale"] is None or op["filter_scales"] is None:
        return None
    s_in = np.float32(op["input_scale"])
    s_w = op["filter_scales"].astype(np.float32)
    s_out = np.float32(op["output_scale"])
    z = op["output_zero_point"]
    bounds = _clamp(op["activation"], z, s_out)
    if bounds is None:
        return None
    return dict(acc_scale=s_in.astype(np.float64) * s_w.astype(np.float64),
                scale=(s_in * s_w) / s_out,  # float32, in XNNPACK's order
                zero_point=z, code_min=bounds[0], code_max=bounds[1], step=float(s_out))


def _step(aq):
    lo, hi = (float(v) for v in aq.quantization_range())
    return (hi - lo) / (2**aq.num_bits - 1)


def _close(a, b):
    return abs(a - b) <= 1e-5 * abs(b)


def _xnnpack_add(operand_scales, out, bounds):
    """A Keras `Add.call` that computes the file's int8 ADD as XNNPACK does.

    With each operand's code `d_i = q_i - z_i = round(x_i / s_i)`, the
    ratios `r_i = float32(s_i / s_out)`, a shift that puts the larger ratio
    in `[2^20, 2^21)` and multipliers `m_i = rint(r_i 2^shift)`:
    `o = clip(floor((sum_i m_i d_i + 2^(shift-1)) / 2^shift) + z_out)`
    (integers, exact in float64), and `y = (o - z_out) s_out`, on the grid
    of the quantizer after it, which leaves it unchanged. Checked against
    LiteRT on every pair of int8 inputs (12 random scale sets, with and
    without a fused ReLU): identical; rounding the exact sum instead is off
    on 1-6 of 65,536.
    """
    s_out, z = out
    ratios = [np.float32(np.float32(s) / np.float32(s_out)) for s in operand_scales]
    shift = 21 - math.frexp(float(max(ratios)))[1]
    multipliers = [float(np.rint(np.ldexp(np.float64(r), shift))) for r in ratios]

    def call(inputs, *args, **kwargs):
        acc = 2.0 ** (shift - 1)
        for x, s, m in zip(inputs, operand_scales, multipliers):
            acc += tf.round(tf.cast(x, tf.float64) / s) * m
        o = tf.clip_by_value(tf.floor(acc / 2.0**shift) + z, bounds[0], bounds[1])
        return tf.cast((o - z) * s_out, inputs[0].dtype)

    return call


def _match_add(op, node, file_adds, used, readers, calls):
    """`(call, index)` making a Keras Add compute the file ADD `file_adds[index]`
    (one not in `used`), or None."""
    producers = [producer_of(t) for t in node.input_tensors]
    if len(producers) != 2 or not all(
            isinstance(p, ActivationQuantizer) and p.num_bits == 8 for p in producers):
        return None
    steps = [_step(p) for p in producers]
    for i, file_op in enumerate(file_adds):
        if i in used:
            continue
        aq = _quantizer_after(op, readers, calls, file_op["activation"])
        s_out, z = file_op["output"]
        bounds = _clamp(file_op["activation"], z, s_out)
        if aq is None or aq.num_bits != 8 or bounds is None or not _close(_step(aq), s_out):
            continue
        # The file's inputs may come in either order; match them by scale.
        scales = [s for s, _ in file_op["inputs"]]
        for order in (scales, scales[::-1]):
            if all(_close(a, float(b)) for a, b in zip(steps, order)):
                return _xnnpack_add([float(b) for b in order], (float(s_out), z), bounds), i
    return None


def _graph(model):
    return model.quantized_model if isinstance(model, MetaQuantModel) else model


def _reset_compiled(model):
    # The compiled predict/evaluate functions read the quantizers' rounding
    # when traced.
    for m in {id(model): model, id(_graph(model)): _graph(model)}.values():
        for name in ("predict_function", "test_function"):
            if getattr(m, name, None) is not None:
                setattr(m, name, None)


@contextlib.contextmanager
def file_rounding(model, flatbuffer):
    """Within it, `model`'s inference rounds its blocks as `flatbuffer` does.

    Args:
        model: a `MetaQuantModel` (or its flat graph) trained with activation
            quantizers.
        flatbuffer: its full-integer file (`convert_to_tflite(mode="int8")`).

    Yields:
        A dict: `layers` (names of the quantizers that round as the file),
        `unmatched` (kernel layers whose op or quantizer was not found; they
        keep fake-quant rounding).
    """
    graph = _graph(model)
    pairs, unmatched = integer_bias.matched_filter_ops(graph, flatbuffer)
    nodes = _graph_nodes(graph)
    readers, calls = _consumers(nodes)
    configured = []
    for entry, op in pairs:
        rounding = _rounding(op)
        aq = _quantizer_after(entry.end, readers, calls, op["activation"]) if rounding else None
        if aq is None:
            unmatched.append(entry.name)
            continue
        if aq.num_bits != 8 or not _close(_step(aq), rounding["step"]):
            unmatched.append(entry.name)  # not the file's int8 grid
            continue
        aq.set_file_rounding(rounding)
        configured.append(aq)
    adds, file_adds, used = [], tflite_weights.add_ops(flatbuffer), set()
    for node in nodes:
        op = node.operation
        if not isinstance(op, keras.layers.Add) or calls.get(id(op)) != 1:
            continue
        found = _match_add(op, node, file_adds, used, readers, calls)
        if found is None:
            unmatched.append(op.name)
            continue
        used.add(found[1])
        # This instance only, for the duration of the context.
        object.__setattr__(op, "call", found[0])
        adds.append(op)
    _reset_compiled(model)
    try:
        yield dict(layers=[aq.name for aq in configured] + [op.name for op in adds],
                   unmatched=unmatched)
    finally:
        for aq in configured:
            aq.set_file_rounding(None)
        for op in adds:
            object.__delattr__(op, "call")
        _reset_compiled(model)
