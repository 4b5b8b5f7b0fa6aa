"""Cloning a Functional or Sequential model layer by layer.

`quantize_model` (float -> wrapped) and `strip_model` (wrapped -> float) both
rebuild the caller's graph with some layers swapped. This module is the one
place that knows how: which models can be cloned, how a layer is copied
without its weights, and what to do with graph nodes that are operations
rather than layers (`x + y`, `x * 2.0`, `keras.ops.mean(x)` applied to
KerasTensors).
"""

import inspect

import keras


def is_graph_model(model):
    """True for Functional and Sequential models (their graph can be cloned).

    A subclassed model's `call()` is opaque Python: it has no graph of layer
    calls to rebuild, so it is not a graph model.
    """
    return isinstance(model, keras.Sequential) or any(
        c.__name__ == "Functional" for c in type(model).__mro__
    )


def is_layer(node):
    """True for a `keras.layers.Layer`; False for a bare `keras.Operation`."""
    return isinstance(node, keras.layers.Layer)


def copy_layer(layer):
    """A fresh, unbuilt layer with `layer`'s configuration (weights not copied)."""
    if isinstance(layer, keras.layers.Lambda):
        # Lambda.get_config() stores a Python lambda as marshalled bytecode,
        # which from_config refuses in safe mode (rightly, for files). This
        # layer is a live object of the caller's: hand its callables to the
        # new layer directly instead of round-tripping through bytecode.
        config = layer.get_config()
        config["function"] = layer.function
        config["arguments"] = layer.arguments
        config["mask"] = layer.mask
        config["output_shape"] = getattr(
            layer, "_output_shape", config.get("output_shape")
        )
        return keras.layers.Lambda(**config)
    try:
        return layer.__class__.from_config(layer.get_config())
    except (TypeError, ValueError, NotImplementedError) as e:
        raise ValueError(
            f"Cannot copy layer {layer.name!r} ({type(layer).__name__}) from "
            f"its config: {e}. A subclassed layer or model is copied with "
            "from_config(get_config()): let __init__ take **kwargs and its own "
            "arguments as plain values (Keras 3 then writes get_config "
            "itself), or define get_config/from_config."
        ) from e


def copy_built_layer(layer):
    """`copy_layer`, built like `layer` (its variables exist; values not copied).

    Layers with several inputs (`MultiHeadAttention`) or a subclassed `build`
    cannot be built from one input shape; Keras' build config records how
    `layer` was built, so the copy replays it.
    """
    new = copy_layer(layer)
    config = layer.get_build_config() if layer.built else None
    if config:
        new.build_from_config(config)
    return new


def copy_operation(op):
    """A copy of a stateless graph operation (`Add`, `Multiply`, `Mean`, ...).

    Operations hold no weights; a copy keeps the clone's graph from adding
    nodes to the caller's operation objects. An operation whose config cannot
    be replayed is reused as is, which is equally correct because it has no
    state.
    """
    try:
        return op.__class__.from_config(op.get_config())
    except (TypeError, ValueError, NotImplementedError):
        return op


def clone_graph(model, make_layer):
    """Clones a Functional/Sequential model, nested models included.

    Args:
        model: a built Functional or Sequential `keras.Model`.
        make_layer: `layer -> new layer`, called once per layer of the graph
            (a shared layer is called once and its clone is shared too);
            operations that are not layers are copied by `copy_operation`.

    Returns:
        `(clone, pairs)` where `pairs` lists `(old_layer, new_layer)` for every
        layer `make_layer` was called on, in graph order. Weights are not
        copied: the caller sets them from `pairs`.
    """
    pairs = []

    def clone(node):
        if not is_layer(node):
            return copy_operation(node)
        new = make_layer(node)
        pairs.append((node, new))
        return new

    def call(layer, *args, **kwargs):
        # A wrapper's call takes `mask` for any layer, so Keras records one
        # on its node; the plain layer it is swapped back for may not.
        if "mask" in kwargs and not takes_argument(layer.call, "mask"):
            kwargs.pop("mask")
        return layer(*args, **kwargs)

    sequential = isinstance(model, keras.Sequential)
    cloned = keras.models.clone_model(
        model, clone_function=clone, recursive=True,
        call_function=None if sequential else call,
    )
    return cloned, pairs


def takes_argument(fn, name):
    """True if `fn` accepts a keyword argument `name` (or any keyword)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
