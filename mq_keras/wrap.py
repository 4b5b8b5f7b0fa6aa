"""`quantize_model`: one call from a float Keras model to a `MetaQuantModel`."""

import warnings

import keras

from mq_keras import meta_networks, quantizers
from mq_keras.layers import MetaQuantWrapper, is_supported
from mq_keras.models import ESTIMATORS, SEMANTICS, MetaQuantModel, iter_layers


def _is_graph_model(model):
    # Functional and Sequential models can be cloned layer by layer; a
    # subclassed model's call() is opaque Python and cannot.
    return isinstance(model, keras.Sequential) or any(
        c.__name__ == "Functional" for c in type(model).__mro__
    )


def _layer_filter(filters, model):
    if filters is None:
        return lambda layer: True
    if callable(filters):
        return filters
    if isinstance(filters, str):
        filters = [filters]
    names = set(filters)
    known = {layer.name for layer in iter_layers(model)}
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(
            f"filters names layers that are not in model {model.name!r}: "
            f"{unknown}. Known layers: {sorted(known)}."
        )
    return lambda layer: layer.name in names


def quantize_model(model, *, kernel_quantizer="dorefa", num_bits=None,
                   meta_network="multifc", estimator="metaquant",
                   semantics="code", filters=None, reset_meta_state=False,
                   quantizer_options=None, meta_network_options=None,
                   verbose=True):
    """Returns a `MetaQuantModel` whose Dense/conv kernels are quantized.

    The input model is cloned, never mutated; its weights are copied into the
    clone. Every supported layer (first and last included, as in the paper)
    is wrapped in a `MetaQuantWrapper` unless `filters` excludes it; nested
    Functional/Sequential models are handled. Activations stay float.

    Args:
        model: a built Functional or Sequential Keras model.
        kernel_quantizer: "dorefa" (default), "bwn", "ternary", "uniform", or a
            `Quantizer` instance.
        num_bits: bit width (dorefa 1-8, bwn 1, ternary 2, uniform 2-8);
            `None` takes the quantizer's default (dorefa 1, uniform 8).
        meta_network: "multifc" (default), "fc_grad", "lstmfc", "gain_mlp", a
            `MetaNetwork` instance, or "ste" (same as `estimator="ste"`).
        estimator: "metaquant" (default) or "ste" (plain straight-through).
        semantics: "code" (default, the official code's step) or "paper".
        filters: which layers to quantize: `None` (all supported), a callable
            `layer -> bool`, or a collection of layer names.
        reset_meta_state: LSTMFC only: zero (h, c) every step.
        quantizer_options: extra quantizer options, e.g.
            `{"per_channel": True}` for bwn / ternary.
        meta_network_options: extra meta network options (`hidden_size`,
            `seed`, ...).
        verbose: print once which layers with weights were left float.

    Returns:
        A `MetaQuantModel`, to be compiled with `optimizer` and
        `meta_optimizer`.

    Raises:
        ValueError: subclassed or unbuilt model, a model that is already
            quantized, unknown names, bad bit widths, unknown filter names, or
            no layer to quantize.
    """
    if isinstance(model, MetaQuantModel):
        raise ValueError(
            f"Model {model.name!r} is already a MetaQuantModel; quantize the "
            "float model once."
        )
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"quantize_model expects a keras.Model, got {type(model).__name__}."
        )
    if not _is_graph_model(model):
        raise ValueError(
            f"quantize_model supports Functional and Sequential models; "
            f"{model.name!r} is a subclassed {type(model).__name__}, whose "
            "layers cannot be cloned from its config. Rebuild it with the "
            "Functional API (keras.Input + layer calls)."
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built. Give it an Input (or call "
            "model.build(input_shape)) before quantize_model."
        )
    if any(isinstance(layer, MetaQuantWrapper) for layer in iter_layers(model)):
        raise ValueError(
            f"Model {model.name!r} already contains MetaQuantWrapper layers; "
            "quantize the float model once."
        )
    if meta_network == "ste":
        estimator = "ste"
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"Unknown estimator {estimator!r}; allowed values are {ESTIMATORS}."
        )
    if semantics not in SEMANTICS:
        raise ValueError(
            f"Unknown semantics {semantics!r}; allowed values are {SEMANTICS}."
        )
    quantizer = quantizers.get(
        kernel_quantizer, num_bits=num_bits, **(quantizer_options or {})
    )
    meta = None
    if estimator == "metaquant":
        meta = meta_networks.get(meta_network, **(meta_network_options or {}))
    if (isinstance(meta, meta_networks.MultiFC)
            and not isinstance(quantizer, quantizers.DoReFa)):
        # MultiFC's m = g * f(W_tilde) was designed for DoReFa's W_tilde in
        # [0, 1]; with a signed W_tilde (W itself) a linear f flips the
        # gradient of every negative weight. The paper has no BWN MultiFC
        # result; our quick benchmark saw BWN + MultiFC + Adam collapse.
        warnings.warn(
            f"meta_network='multifc' with kernel_quantizer={quantizer.name!r}: "
            "W_tilde takes both signs, so MultiFC's g * f(W_tilde) reverses "
            "the gradient of negative weights unless f learns otherwise (the "
            "paper pairs MultiFC with DoReFa only). Consider 'gain_mlp', "
            "'fc_grad' or 'lstmfc'.",
            stacklevel=2,
        )
    selected = _layer_filter(filters, model)

    pairs = []

    def clone(layer):
        new = layer.__class__.from_config(layer.get_config())
        if is_supported(layer) and selected(layer):
            new = MetaQuantWrapper(new, kernel_quantizer=quantizer)
        pairs.append((layer, new))
        return new

    cloned = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for old, new in pairs:
        target = new.layer if isinstance(new, MetaQuantWrapper) else new
        target.set_weights(old.get_weights())

    left_float = [
        old.name for old, new in pairs
        if old.weights and not isinstance(new, MetaQuantWrapper)
    ]
    if not any(isinstance(new, MetaQuantWrapper) for _, new in pairs):
        raise ValueError(
            f"No layer of model {model.name!r} was quantized: it has no "
            "Dense/convolution layer, or `filters` excluded them all."
        )
    if verbose and left_float:
        print(f"mq_keras: left float (not quantized): {', '.join(left_float)}")
    return MetaQuantModel(
        cloned, meta, estimator=estimator, semantics=semantics,
        reset_meta_state=reset_meta_state,
    )
