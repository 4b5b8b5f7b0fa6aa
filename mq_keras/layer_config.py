"""Which kernels `quantize_model` quantizes, and with which quantizer.

Two options decide it, both evaluated per kernel against the leaf layer that
owns the kernel (a Dense, a convolution, an attention projection, a recurrent
cell) and the layer of the model's graph that holds it (the same layer, or a
`MultiHeadAttention`, an `LSTM`, a subclassed block):

- `filters`: `None` (all), a callable `leaf -> bool`, or layer names; a name
  selects a kernel when it names its leaf or its graph layer.
- `layer_quantizers`: per-layer quantizers, a mapping `{layer name: value}`
  (the leaf's name wins over its graph layer's) or a callable
  `leaf -> value`. A value is a `Quantizer`, a quantizer name, an int (that
  bit width, with the model's `kernel_quantizer` kind and options) or `None`
  (leave the kernel float). Common practice: 8 bits for the first and last
  layer, 2-4 bits inside.
"""

import collections.abc

from mq_keras import kernels, quantizers


def _names(model):
    return {layer.name for layer in kernels.sublayers(model)} - {model.name}


def _check_names(arg, names, model):
    known = _names(model)
    unknown = sorted(set(names) - known, key=repr)
    if unknown:
        raise ValueError(
            f"{arg} names layers that are not in model {model.name!r}: "
            f"{unknown}. Known layers: {sorted(known)}."
        )


def _as_selector(filters, model):
    if filters is None:
        return lambda leaf, node: True
    if callable(filters):
        return lambda leaf, node: bool(filters(leaf))
    if isinstance(filters, str):
        filters = [filters]
    if not isinstance(filters, collections.abc.Iterable):
        raise ValueError(
            f"filters must be None, a callable `layer -> bool`, a layer name "
            f"or a collection of layer names, got {filters!r}."
        )
    names = set(filters)
    _check_names("filters", names, model)
    return lambda leaf, node: leaf.name in names or node.name in names


def _with_bits(default, num_bits):
    config = dict(default.get_config(), num_bits=num_bits)
    return type(default).from_config(config)


def _as_quantizer(value, default, where):
    if value is None or isinstance(value, quantizers.Quantizer):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a quantizer, a name, an int or None, got {value!r}.")
    if isinstance(value, int):
        return _with_bits(default, value)
    if isinstance(value, str):
        return quantizers.get(value)
    raise ValueError(
        f"{where}: expected a Quantizer, a quantizer name, an int bit width or "
        f"None (leave float), got {value!r}; e.g. {{'conv1': 8, 'fc': None}}."
    )


def _as_assigner(layer_quantizers, default, model):
    if layer_quantizers is None:
        return lambda leaf, node: default
    if callable(layer_quantizers):
        return lambda leaf, node: _as_quantizer(
            layer_quantizers(leaf), default, f"layer_quantizers({leaf.name!r})")
    if not isinstance(layer_quantizers, collections.abc.Mapping):
        raise ValueError(
            f"layer_quantizers must be a mapping {{layer name: quantizer}} or "
            f"a callable `layer -> quantizer`, got {layer_quantizers!r}."
        )
    _check_names("layer_quantizers", layer_quantizers, model)
    table = {name: _as_quantizer(v, default, f"layer_quantizers[{name!r}]")
             for name, v in layer_quantizers.items()}

    def assign(leaf, node):
        for name in (leaf.name, node.name):
            if name in table:
                return table[name]
        return default

    return assign


class KernelPlan:
    """Decides the quantizer of every kernel of a model (`None`: left float).

    Args:
        model: the float model being quantized.
        default: the model-wide `Quantizer`.
        filters: see the module docstring.
        layer_quantizers: see the module docstring.
    """

    def __init__(self, model, default, *, filters=None, layer_quantizers=None):
        self.default = default
        self._select = _as_selector(filters, model)
        self._assign = _as_assigner(layer_quantizers, default, model)

    def quantizers_for(self, node):
        """`[Quantizer or None]`, one per kernel of `kernels.find_kernels(node)`."""
        out = []
        for ref in kernels.find_kernels(node):
            chosen = self._select(ref.owner, node)
            out.append(self._assign(ref.owner, node) if chosen else None)
        return out
