"""Which weights of a layer are quantized kernels, and their output-channel axes.

A "leaf" layer owns kernels directly (Dense, convolutions, EinsumDense,
Embedding, the recurrent cells). Any other layer is quantized through the
leaves nested in it: `MultiHeadAttention` through its four `EinsumDense`
projections, `LSTM`/`GRU`/`SimpleRNN` through their cell, `Bidirectional`
through both directions, a user's subclassed block or model through every
leaf it holds. The meta network is coordinate-wise, so one MetaQuant step
covers any mix of kernels; only the quantizer's per-channel axes differ.

Output channels: Dense/conv kernels end in (..., in, out); transposed convs
in (..., out, in); depthwise kernels in (..., in, multiplier), whose output
channel is the (in, multiplier) pair; an EinsumDense kernel's output axes are
those of its letters that appear in the output; an embedding table's rows are
tokens and its columns the output features; a recurrent kernel maps to its
gates (last axis).
"""

import keras

_LAST = (-1,)
_DEPTHWISE = (-2, -1)

# Leaf type -> ((variable name, output-channel axes or None for "from the
# layer"), ...). The exact type wins over a base class (see `leaf_spec`).
_LEAVES = {
    keras.layers.Dense: (("kernel", _LAST),),
    keras.layers.Conv1D: (("kernel", _LAST),),
    keras.layers.Conv2D: (("kernel", _LAST),),
    keras.layers.Conv3D: (("kernel", _LAST),),
    keras.layers.Conv1DTranspose: (("kernel", (-2,)),),
    keras.layers.Conv2DTranspose: (("kernel", (-2,)),),
    keras.layers.Conv3DTranspose: (("kernel", (-2,)),),
    keras.layers.DepthwiseConv1D: (("kernel", _DEPTHWISE),),
    keras.layers.DepthwiseConv2D: (("kernel", _DEPTHWISE),),
    keras.layers.SeparableConv1D: (
        ("depthwise_kernel", _DEPTHWISE), ("pointwise_kernel", _LAST)),
    keras.layers.SeparableConv2D: (
        ("depthwise_kernel", _DEPTHWISE), ("pointwise_kernel", _LAST)),
    keras.layers.EinsumDense: (("kernel", None),),
    keras.layers.Embedding: (("embeddings", _LAST),),
    keras.layers.LSTMCell: (("kernel", _LAST), ("recurrent_kernel", _LAST)),
    keras.layers.GRUCell: (("kernel", _LAST), ("recurrent_kernel", _LAST)),
    keras.layers.SimpleRNNCell: (("kernel", _LAST), ("recurrent_kernel", _LAST)),
}

LEAF_TYPES = tuple(_LEAVES)


def leaf_spec(layer):
    """`((variable_name, channel_axes), ...)` of a leaf layer, else None."""
    spec = _LEAVES.get(type(layer))
    if spec is None:
        spec = next((s for cls, s in _LEAVES.items() if isinstance(layer, cls)), None)
    return spec


def einsum_output_axes(equation):
    """Output-channel axes of an EinsumDense kernel: its letters kept in the output.

    `"abc,cde->abde"` (a query projection) gives `(-2, -1)`: d and e survive,
    c is contracted.
    """
    try:
        operands, output = equation.replace(" ", "").split("->")
        _, kernel = operands.split(",")
    except ValueError:
        raise ValueError(
            f"EinsumDense equation {equation!r} is not of the form "
            "'input,kernel->output'."
        ) from None
    kernel = kernel.replace("...", "")
    axes = tuple(i - len(kernel) for i, c in enumerate(kernel) if c in output)
    return axes or _LAST


def sublayers(layer):
    """`layer` and every layer nested in it (depth first, each once)."""
    # Keras' own traversal; it follows attributes, lists and dicts of layers,
    # which is how subclassed layers and models hold theirs.
    return list(layer._flatten_layers(include_self=True, recursive=True))


class KernelRef:
    """One kernel found in a layer.

    Attributes:
        owner: the leaf layer that owns it.
        variable: the float kernel variable.
        channel_axes: its output-channel axes.
        key: a name unique within the wrapped layer: the variable's name for
            the layer's own kernels, `<leaf name>_<variable name>` for a
            nested leaf's.
    """

    def __init__(self, owner, variable, channel_axes, key):
        self.owner = owner
        self.variable = variable
        self.channel_axes = channel_axes
        self.key = key


def _variable(layer, name):
    for v in layer.weights:
        if v.name == name:
            return v
    return None


def find_kernels(layer):
    """Every quantizable kernel of a built `layer`, nested leaves included.

    A variable shared by two leaves is listed once. Leaves not built (a branch
    the layer never called) contribute nothing.
    """
    found, seen = [], set()
    for leaf in sublayers(layer):
        spec = leaf_spec(leaf)
        if spec is None:
            continue
        for name, axes in spec:
            var = _variable(leaf, name)
            if var is None or id(var) in seen:
                continue
            seen.add(id(var))
            if axes is None:
                axes = einsum_output_axes(leaf.equation)
            key = name if leaf is layer else f"{leaf.name}_{name}"
            found.append(KernelRef(leaf, var, axes, key))
    keys = [k.key for k in found]
    for i, ref in enumerate(found):
        if keys.count(ref.key) > 1:  # two nested leaves with one name
            ref.key = f"{ref.key}_{i}"
    return found


def find_biases(layer):
    """`(leaf, bias variable)` of the leaves that own kernels, each bias once."""
    out, seen = [], set()
    for leaf in sublayers(layer):
        if leaf_spec(leaf) is None:
            continue
        var = _variable(leaf, "bias")
        if var is not None and id(var) not in seen:
            seen.add(id(var))
            out.append((leaf, var))
    return out


def has_kernels(layer):
    """True if `layer` is a leaf type or holds one (built or not)."""
    return any(leaf_spec(l) is not None for l in sublayers(layer))
