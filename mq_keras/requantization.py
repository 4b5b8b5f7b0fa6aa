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
in float32 as XNNPACK does. Inside it, `model.predict` / `evaluate` give the
file's integers on every block so handled; training is unchanged, and the
model is restored on exit. Ops it does not handle (ADD, MEAN, pooling,
concatenation: their fixed-point requantization differs by kernel) keep
fake-quant rounding.
"""

import contextlib

import numpy as np

from mq_keras import integer_bias
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


def _rounding(op):
    """The `ActivationQuantizer.set_file_rounding` parameters of a filter op."""
    if op["input_scale"] is None or op["filter_scales"] is None:
        return None
    s_in = np.float32(op["input_scale"])
    s_w = op["filter_scales"].astype(np.float32)
    s_out = np.float32(op["output_scale"])
    z = op["output_zero_point"]
    code_min, code_max = -128, 127
    if op["activation"] == _RELU:
        code_min = max(code_min, z)
    elif op["activation"] == _RELU6:
        code_min = max(code_min, z)
        code_max = min(code_max, z + int(np.rint(np.float32(6.0) / s_out)))
    elif op["activation"] != _NONE:
        return None
    return dict(acc_scale=s_in.astype(np.float64) * s_w.astype(np.float64),
                scale=(s_in * s_w) / s_out,  # float32, in XNNPACK's order
                zero_point=z, code_min=code_min, code_max=code_max, step=float(s_out))


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
    readers, calls = _consumers(_graph_nodes(graph))
    configured = []
    for entry, op in pairs:
        rounding = _rounding(op)
        aq = _quantizer_after(entry.end, readers, calls, op["activation"]) if rounding else None
        if aq is None:
            unmatched.append(entry.name)
            continue
        lo, hi = (float(v) for v in aq.quantization_range())
        step = (hi - lo) / (2**aq.num_bits - 1)
        if aq.num_bits != 8 or abs(step - rounding["step"]) > 1e-5 * step:
            unmatched.append(entry.name)  # not the file's int8 grid
            continue
        aq.set_file_rounding(rounding)
        configured.append(aq)
    _reset_compiled(model)
    try:
        yield dict(layers=[aq.name for aq in configured], unmatched=unmatched)
    finally:
        for aq in configured:
            aq.set_file_rounding(None)
        _reset_compiled(model)
