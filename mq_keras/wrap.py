"""`quantize_model`: one call from a float Keras model to a `MetaQuantModel`."""

import collections.abc
import warnings

import keras

from mq_keras import gradients, kernels, meta_networks, quantizers
from mq_keras.activation_graph import insert_activation_quantizers
from mq_keras.activation_quantizers import RANGE_MODES, ActivationQuantizer
from mq_keras.cloning import clone_graph, copy_built_layer, copy_layer, is_graph_model
from mq_keras.layer_config import KernelPlan
from mq_keras.layers import SUPPORTED_LAYERS, MetaQuantWrapper, is_supported
from mq_keras.models import ESTIMATORS, SEMANTICS, MetaQuantModel, iter_layers


def _activation_factory(kind, num_bits):
    """`name -> ActivationQuantizer`, or None for float activations (checked now)."""
    if kind is None:
        if num_bits is not None:
            raise ValueError(
                f"activation_bits={num_bits!r} needs activation_quantizer='ema', "
                "'pact' or 'lsq'; activations stay float without one."
            )
        return None
    bits = 8 if num_bits is None else num_bits
    if kind not in RANGE_MODES:  # "fixed" is placed by quantize_model itself
        raise ValueError(
            f"Unknown activation_quantizer {kind!r}; allowed values are "
            f"{RANGE_MODES} (or None for float activations).")
    ActivationQuantizer(num_bits=bits, range_mode=kind)  # validates both

    def make(name):
        return ActivationQuantizer(num_bits=bits, range_mode=kind, name=name)

    return make


def _as_graph(model):
    """A Functional model calling `model` once (for a subclassed model).

    A subclassed model's call() is opaque, so it is quantized as one unit: a
    `MetaQuantWrapper` around a copy of it quantizes every kernel it holds.
    """
    config = model.get_build_config() if model.built else None
    shape = (config or {}).get("input_shape")
    if not (isinstance(shape, (list, tuple)) and shape
            and all(d is None or isinstance(d, int) for d in shape)):
        raise ValueError(
            f"Subclassed model {model.name!r} must be built on one input "
            f"tensor before quantize_model (its build config is {config!r}); "
            "call it once on a batch, e.g. model(x[:1]), or model.build(shape)."
        )
    inputs = keras.Input(batch_shape=(None, *shape[1:]), name="input")
    return keras.Model(inputs, model(inputs), name=model.name)


def _as_options(arg, value, example):
    if value is None:
        return {}
    if not isinstance(value, collections.abc.Mapping):
        raise ValueError(
            f"{arg} must be a dict of keyword options, e.g. {example}, got "
            f"{value!r}."
        )
    return dict(value)


def _check_meta_options(meta_network, estimator, options):
    """Refuses meta network options that would be ignored or are unknown."""
    if not options:
        return
    if estimator == "ste":
        raise ValueError(
            f"meta_network_options={options!r} has no effect with "
            "estimator='ste', which trains without a meta network; drop "
            "meta_network_options or use estimator='metaquant'."
        )
    if not isinstance(meta_network, str):
        cls = (type(meta_network).__name__
               if isinstance(meta_network, meta_networks.MetaNetwork)
               else "MultiFC")
        kwargs = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
        raise ValueError(
            f"meta_network_options={options!r} only apply to a meta network "
            f"given by name, not to {meta_network!r}; set them on the "
            f"instance instead, e.g. mq_keras.{cls}({kwargs})."
        )
    cls = meta_networks.class_for(meta_network)
    if cls is None:
        return  # meta_networks.get names the allowed networks
    meta_networks.check_options(cls, options, f"meta_network={meta_network!r}",
                                label="meta_network_options")


def quantize_model(model, *, kernel_quantizer="dorefa", num_bits=None,
                   meta_network="multifc", estimator="metaquant",
                   semantics="code", filters=None, layer_quantizers=None,
                   activation_quantizer=None, activation_bits=None,
                   reset_meta_state=False,
                   quantizer_options=None, meta_network_options=None,
                   meta_chunk_size=None, verbose=True):
    """Returns a `MetaQuantModel` whose kernels are quantized.

    The input model is cloned, never mutated; its weights are copied into the
    clone. Every layer of the graph that is or holds a kernel (Dense,
    convolutions, EinsumDense and so MultiHeadAttention, Embedding,
    LSTM/GRU/SimpleRNN, user blocks; first and last layer included, as in the
    paper) is wrapped in a `MetaQuantWrapper` unless `filters` excludes all
    its kernels; nested Functional/Sequential models are handled. Activations
    stay float.

    Args:
        model: a built Keras model: Functional or Sequential (operation
            nodes, nested models and shared layers included), or subclassed
            (built on one input; it must have a working `get_config`, which
            Keras 3 writes itself when `__init__` takes plain values; it is
            then quantized as one unit).
        kernel_quantizer: "dorefa" (default), "bwn", "ternary", "uniform", or a
            `Quantizer` instance.
        num_bits: bit width (dorefa 1-8, bwn 1, ternary 2, uniform 2-8);
            `None` takes the quantizer's default (dorefa 1, uniform 8).
        meta_network: "multifc" (default), "fc_grad", "lstmfc", "gain_mlp",
            "meta_ewgs" (ours: learned EWGS, norm-preserving), a
            `MetaNetwork` instance, or "ste" (same as `estimator="ste"`).
        estimator: "metaquant" (default), "ste" (plain straight-through), or
            a hand-designed rule trained like the STE: "ewgs" (set its delta
            with `quantizer_options={"delta": ...}`) or "approx_sign" (1 bit).
        semantics: "code" (default, the official code's step) or "paper".
        filters: which kernels to quantize: `None` (all), a callable
            `layer -> bool` (asked about each layer that owns a kernel), or
            layer names (see `mq_keras.layer_config`).
        layer_quantizers: per-layer quantizers: `{layer name: value}` or a
            callable `layer -> value`; a value is a `Quantizer`, a quantizer
            name, an int (that bit width of `kernel_quantizer`'s kind) or
            None (leave float). E.g. `{"conv1": 8, "logits": 8}` with
            `num_bits=2`.
        activation_quantizer: None (float activations, default), "ema"
            (moving min/max ranges, TFMOT's scheme), "pact" (trained
            clipping bounds) or "lsq" (a trained step, LSQ): fake-quantize
            every tensor TFLite's integer kernels quantize
            (`mq_keras.activation_graph`), so `convert_to_tflite(mode="int8")`
            uses the trained ranges.
        activation_bits: 2 to 8 (default 8) with `activation_quantizer`.
        reset_meta_state: LSTMFC only: zero (h, c) every step.
        quantizer_options: extra quantizer options, e.g.
            `{"per_channel": True}` for bwn / ternary.
        meta_network_options: extra meta network options (`hidden_size`,
            `seed`, ...).
        meta_chunk_size: apply the meta network to this many weights at a
            time to bound the meta step's memory (see `MetaQuantModel`).
        verbose: print once which layers with weights were left float.

    Returns:
        A `MetaQuantModel`, to be compiled with `optimizer` and
        `meta_optimizer`.

    Raises:
        ValueError: an unbuilt model, a model that is already
            quantized, unknown names, bad bit widths, unknown filter names,
            unknown or ignored options (`meta_network_options` with
            estimator="ste" or with an instance, `reset_meta_state` without
            a recurrent meta network), or no layer to quantize.
    """
    if isinstance(model, MetaQuantModel):
        raise ValueError(
            f"Model {model.name!r} is already a MetaQuantModel; quantize the "
            "float model once: pass the original float model (quantize_model "
            "never modifies it)."
        )
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"quantize_model expects a built Functional or Sequential "
            f"keras.Model, got {type(model).__name__}; wrap a single layer "
            "with mq_keras.MetaQuantWrapper instead."
            if isinstance(model, keras.layers.Layer) else
            f"quantize_model expects a built Functional or Sequential "
            f"keras.Model, got {type(model).__name__}."
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
    rule = None
    if estimator in gradients.GRADIENTS[1:]:
        # A hand-designed backward rule is the STE step with the quantizer's
        # own backward replaced (mq_keras.gradients).
        rule, estimator = estimator, "ste"
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"Unknown estimator {estimator!r}; allowed values are "
            f"{ESTIMATORS + gradients.GRADIENTS[1:]}."
        )
    if semantics not in SEMANTICS:
        raise ValueError(
            f"Unknown semantics {semantics!r}; allowed values are {SEMANTICS}."
        )
    quantizer_options = _as_options(
        "quantizer_options", quantizer_options, "{'per_channel': True}"
    )
    if "num_bits" in quantizer_options:
        raise ValueError(
            "quantizer_options must not contain 'num_bits'; pass "
            f"num_bits={quantizer_options['num_bits']!r} to quantize_model "
            "itself."
        )
    meta_network_options = _as_options(
        "meta_network_options", meta_network_options, "{'hidden_size': 50}"
    )
    _check_meta_options(meta_network, estimator, meta_network_options)
    if rule is not None and isinstance(kernel_quantizer, str):
        quantizer_options.setdefault("gradient", rule)
    quantizer = quantizers.get(
        kernel_quantizer, num_bits=num_bits, **quantizer_options
    )
    if rule is not None:
        quantizer = quantizers.with_gradient(quantizer, rule)
    meta = None
    if estimator == "metaquant":
        meta = meta_networks.get(meta_network, **meta_network_options)
    if reset_meta_state and (meta is None or not meta.state_size):
        what = ("estimator='ste' has no meta network" if meta is None
                else f"meta_network={type(meta).__name__} has no recurrent state")
        raise ValueError(
            f"reset_meta_state=True only applies to a recurrent meta network "
            f"(meta_network='lstmfc'), but {what}; drop reset_meta_state or "
            "use meta_network='lstmfc'."
        )
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
    make_activation_quantizer = _activation_factory(activation_quantizer, activation_bits)
    plan = KernelPlan(model, quantizer, filters=filters,
                      layer_quantizers=layer_quantizers)

    def make_layer(layer):
        chosen = plan.quantizers_for(layer) if is_supported(layer) else []
        if all(q is None for q in chosen):
            return copy_layer(layer)
        new = copy_built_layer(layer)
        keys = [ref.key for ref in kernels.find_kernels(new)]
        own = {k: q for k, q in zip(keys, chosen) if q is not quantizer}
        return MetaQuantWrapper(new, kernel_quantizer=quantizer,
                                kernel_quantizers=own or None,
                                record_state=estimator == "metaquant")

    graph = model if is_graph_model(model) else _as_graph(model)
    cloned, pairs = clone_graph(graph, make_layer)
    for old, new in pairs:
        target = new.layer if isinstance(new, MetaQuantWrapper) else new
        target.set_weights(old.get_weights())

    left_float = [
        old.name for old, new in pairs
        if old.weights and not isinstance(new, MetaQuantWrapper)
    ] + [
        f"{new.name}/{key}" for _, new in pairs if isinstance(new, MetaQuantWrapper)
        for key, q in new.kernel_quantizers.items() if q is None
    ]
    if not any(isinstance(new, MetaQuantWrapper) for _, new in pairs):
        raise ValueError(
            f"No layer of model {model.name!r} was quantized: it has no "
            "Dense/convolution layer, or `filters` excluded them all. "
            "quantize_model needs at least one layer of a supported type "
            f"({', '.join(sorted(c.__name__ for c in SUPPORTED_LAYERS))}) "
            "that `filters` selects (filters=None selects every one)."
        )
    if make_activation_quantizer is not None:
        if isinstance(cloned, keras.Sequential):
            cloned = keras.Model(cloned.inputs, cloned.outputs, name=cloned.name)
        cloned = insert_activation_quantizers(cloned, make_activation_quantizer)
    if verbose and left_float:
        print(f"mq_keras: left float (not quantized): {', '.join(left_float)}")
    return MetaQuantModel(
        cloned, meta, estimator=estimator, semantics=semantics,
        reset_meta_state=reset_meta_state, meta_chunk_size=meta_chunk_size,
    )
