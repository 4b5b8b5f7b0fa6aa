"""Export of a trained `MetaQuantModel`: a plain Keras model, then TFLite.

`strip_model` turns a quantized model into an ordinary float Keras model of
the same architecture whose kernels hold the quantized values `Q(A(W))`: no
wrapper, no meta network and no MetaQuant training state remain, so any Keras
tool (saving, TFLite, serving) takes it as it is.

`convert_to_tflite` converts that model to a TFLite flatbuffer with builtin
ops only. In "weights" mode the converter stores the weights as int8 (dynamic
range quantization); "float" mode keeps float32 weights.
"""

import tempfile

import keras
import tensorflow as tf

from mq_keras.layers import MetaQuantWrapper
from mq_keras.models import MetaQuantModel, iter_layers
from mq_keras.wrap import _is_graph_model

MODES = ("weights", "float")
_PLANNED_MODES = ("int8",)


def _graph_model(model):
    """Returns the Functional/Sequential model that holds the wrappers."""
    if isinstance(model, MetaQuantModel):
        return model.quantized_model
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected a MetaQuantModel or a keras.Model, got "
            f"{type(model).__name__}."
        )
    if not _is_graph_model(model):
        raise ValueError(
            f"Model {model.name!r} is a subclassed {type(model).__name__}; "
            "only Functional and Sequential models (or a MetaQuantModel) can "
            "be stripped."
        )
    return model


def strip_model(model):
    """Returns a plain float Keras model whose kernels hold `Q(A(W))`.

    The quantized model is cloned layer by layer: every `MetaQuantWrapper` is
    replaced by a fresh copy of the layer it wraps, whose kernels are set to
    the wrapper's quantized kernels and whose other weights (biases) are
    copied; every other layer is copied with its weights. Predictions of the
    stripped model equal the quantized model's inference predictions. The
    input model is not modified.

    Args:
        model: a `MetaQuantModel`, or a built Functional/Sequential model that
            contains `MetaQuantWrapper` layers (nested models included).

    Returns:
        A `keras.Model` of the same architecture without any wrapper, meta
        network or MetaQuant training state.

    Raises:
        ValueError: the model is not built, is subclassed, or contains no
            `MetaQuantWrapper`.
    """
    inner = _graph_model(model)
    if not inner.built:
        raise ValueError(
            f"Model {inner.name!r} is not built; build it (give it an Input "
            "or call it on data) before strip_model."
        )
    if not any(isinstance(l, MetaQuantWrapper) for l in iter_layers(inner)):
        raise ValueError(
            f"Model {inner.name!r} contains no MetaQuantWrapper: there is "
            "nothing to strip. Quantize it with mq_keras.quantize_model first."
        )

    pairs = []

    def clone(layer):
        source = layer.layer if isinstance(layer, MetaQuantWrapper) else layer
        new = source.__class__.from_config(source.get_config())
        pairs.append((layer, new))
        return new

    stripped = keras.models.clone_model(
        inner, clone_function=clone, recursive=True
    )
    for old, new in pairs:
        if isinstance(old, MetaQuantWrapper):
            quantized = old.quantized_kernels()
            values = [
                quantized[v.name] if v.name in quantized else v.numpy()
                for v in old.layer.weights
            ]
        else:
            values = old.get_weights()
        new.set_weights(values)
    return stripped


def convert_to_tflite(model, *, mode="weights"):
    """Converts a quantized model to a TFLite flatbuffer (builtin ops only).

    A `MetaQuantModel` or a model with `MetaQuantWrapper` layers is first
    stripped (`strip_model`); a plain Keras model (for example the output of
    `strip_model`) is converted as it is. The model is exported in inference
    mode (BatchNormalization uses its moving statistics).

    Args:
        model: a `MetaQuantModel`, a model containing `MetaQuantWrapper`
            layers, or a plain Functional/Sequential Keras model.
        mode: "weights" (default): weights stored as int8 by the converter's
            dynamic range quantization (`tf.lite.Optimize.DEFAULT`); tensors
            with fewer than 1024 elements stay float32. "float": no
            optimization, float32 weights.

    Returns:
        The TFLite model as `bytes`.

    Raises:
        ValueError: unknown `mode`, or a model that cannot be stripped.
        NotImplementedError: `mode="int8"` (full-integer export) is not
            implemented yet.
    """
    if mode in _PLANNED_MODES:
        raise NotImplementedError(
            f"mode={mode!r} (full-integer export) is not implemented yet; "
            f"available modes are {MODES}."
        )
    if mode not in MODES:
        raise ValueError(
            f"Unknown mode {mode!r}; allowed modes are {MODES}."
        )
    graph = _graph_model(model)
    if any(isinstance(l, MetaQuantWrapper) for l in iter_layers(graph)):
        graph = strip_model(graph)
    elif not graph.built:
        raise ValueError(f"Model {graph.name!r} is not built.")

    signature = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, dtype=t.dtype, name=t.name),
        graph.inputs,
    )
    if isinstance(signature, list) and len(signature) > 1:
        signature = [signature]
    archive = keras.export.ExportArchive()
    archive.track(graph)
    archive.add_endpoint(
        "serve", lambda *args: graph(*args, training=False), signature
    )
    with tempfile.TemporaryDirectory(prefix="mq_keras_export_") as path:
        archive.write_out(path, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(path)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if mode == "weights":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return converter.convert()
