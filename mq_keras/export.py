"""Export of a trained `MetaQuantModel`: a plain Keras model, then TFLite.

`strip_model` turns a quantized model into an ordinary float Keras model of
the same architecture whose kernels hold the quantized values `Q(A(W))`: no
wrapper, no meta network and no MetaQuant training state remain, so any Keras
tool (saving, TFLite, serving) takes it as it is.

`convert_to_tflite` converts that model to a TFLite flatbuffer with builtin
ops only: "weights" mode stores each quantized kernel as exact integer
codes (int8 by default, int4 on request) with per-channel scales and keeps
float arithmetic (see `tflite_weights`); "int8" mode is the converter's full-integer model;
"float" mode keeps float32 kernels. `verify_tflite` measures how a file
agrees with its Keras model. `python -m mq_keras.export` converts a saved
`.keras` file from the shell; it loads the file in Keras' safe mode (no
Python bytecode from the file runs) unless given `--unsafe`.
"""

import collections.abc
import os
import re
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from mq_keras import export_checks, int8_graph, integer_bias, requantization, tflite_weights
from mq_keras.tflite_graph import affine_layers_as_depthwise, unroll_recurrent
from mq_keras.layers import MetaQuantWrapper
from mq_keras.models import MetaQuantModel, iter_layers
from mq_keras.cloning import clone_graph, copy_layer, is_graph_model

MODES = ("weights", "int8", "float")
# Storage of the codes in "weights" mode; the first is the default.
WEIGHT_DTYPES = ("int8", "int4")
# Accepted but deprecated: the pre-int8-default name of "int4".
_WEIGHT_DTYPE_ALIASES = {"auto": "int4"}


def _weight_dtype(weight_dtype):
    """Returns the canonical name of `weight_dtype`, or raises ValueError.

    "auto" (int4 where the codes fit) was the default until the default
    became "int8"; it still gives the same file as "int4", with a
    DeprecationWarning, so that code written for it keeps working.
    """
    if weight_dtype in _WEIGHT_DTYPE_ALIASES:
        canonical = _WEIGHT_DTYPE_ALIASES[weight_dtype]
        warnings.warn(
            f'weight_dtype={weight_dtype!r} is deprecated; it means '
            f'{canonical!r} (int4 codes where they fit: the smallest file, but '
            'convolutions fed by int4 codes run 2.6-4.6x slower in LiteRT). '
            f'Pass weight_dtype={canonical!r} to keep this file, or leave the '
            'default "int8" (float speed at about 0.27-0.29x the float file).',
            DeprecationWarning, stacklevel=3)
        return canonical
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(
            f"Unknown weight_dtype {weight_dtype!r}; allowed values are "
            f"{WEIGHT_DTYPES} (\"int8\": the default, float speed; \"int4\": "
            "smallest file, slower convolutions)."
        )
    return weight_dtype


def _graph_model(model):
    """Returns the Functional/Sequential model that holds the wrappers."""
    if isinstance(model, MetaQuantModel):
        return model.quantized_model
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected a MetaQuantModel or a keras.Model, got "
            f"{type(model).__name__}."
        )
    if not is_graph_model(model):
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

    def make_layer(layer):
        source = layer.layer if isinstance(layer, MetaQuantWrapper) else layer
        return copy_layer(source)

    stripped, pairs = clone_graph(inner, make_layer)
    for old, new in pairs:
        if isinstance(old, MetaQuantWrapper):
            values = old.quantized_weights()
        else:
            values = old.get_weights()
        new.set_weights(values)
    return stripped


def _convert(graph, *, representative_dataset=None, trained_ranges=False, io_dtype=None):
    """Float TFLite bytes of a plain model; full-integer with a dataset or trained ranges."""
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
        if trained_ranges:
            # The graph's ActivationQuantizers (FakeQuant ops) carry every
            # range: the converter's quantization-aware path reads them.
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if io_dtype is not None:
                converter.inference_input_type = tf.as_dtype(io_dtype)
                converter.inference_output_type = tf.as_dtype(io_dtype)
        elif representative_dataset is None:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        else:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative_dataset
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8
            ]
        try:
            return converter.convert()
        except Exception as e:  # the converter raises several types
            cause = _dataset_error(e)
            if cause is not None:  # the data's fault, not the layers'
                raise ValueError(str(cause)) from cause.__cause__
            raise ValueError(_conversion_error(graph, str(e))) from e


def _dataset_error(error):
    """The `_RepresentativeDataError` in `error`'s chain, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, _RepresentativeDataError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _conversion_error(graph, text):
    """An error message naming the layers the converter complained about."""
    # Op locations in converter errors look like ".../<layer name>_1/<op>".
    culprits = [
        f"{layer.name} ({type(layer).__name__})"
        for layer in iter_layers(graph)
        if re.search(rf"/{re.escape(layer.name)}(_\d+)?/", text)
    ]
    where = (f" in layer(s) {', '.join(culprits)}" if culprits
             else "")
    first = "\n".join(text.strip().splitlines()[:12])
    return (
        f"TFLite cannot convert model {graph.name!r}{where} with builtin ops "
        "only (mq_keras never emits Flex/SELECT_TF_OPS, which phones would "
        "need to link). Replace or remove those layers. Converter said:\n"
        + first
    )


class _RepresentativeDataError(ValueError):
    """A bad `representative_dataset`, found while the converter reads it."""


def _check_example_shape(shape, input_shape, where):
    """Refuses examples whose shape the model's (single) input cannot take."""
    if input_shape is None:
        return
    want = tuple(input_shape[1:])
    got = tuple(shape)
    if len(got) != len(want) or any(
        w is not None and g != w for g, w in zip(got, want)
    ):
        raise _RepresentativeDataError(
            f"representative_dataset {where} examples of shape {got}, but the "
            f"model's input takes {want} (input shape {tuple(input_shape)}); "
            "pass a batch of model inputs, shaped (num_examples,) + "
            f"{want}."
        )


def _checked_rows(factory):
    """Wraps a generator factory: errors name `representative_dataset`.

    The converter draws the examples itself and would report a failure as a
    conversion error, or quietly skip integer quantization for an empty or
    non-finite dataset (the "int8" model then has float kernels).
    """
    def gen():
        count = 0
        try:
            for item in factory():
                for t in tf.nest.flatten(item):
                    if not np.all(np.isfinite(np.asarray(t, np.float32))):
                        raise _RepresentativeDataError(
                            f"representative_dataset example {count} contains "
                            "NaN or infinite values; calibration needs finite "
                            "example inputs (as the model sees in training)."
                        )
                count += 1
                yield item
        except _RepresentativeDataError:
            raise
        except Exception as e:
            raise _RepresentativeDataError(
                f"representative_dataset raised {type(e).__name__} while the "
                f"converter read it: {e}; it must yield lists of model inputs "
                "of batch size 1 (or pass an array of examples instead)."
            ) from e
        if count == 0:
            raise _RepresentativeDataError(
                "representative_dataset yielded no example; calibration needs "
                "some (a few hundred training inputs)."
            )
    return gen


def _as_representative(dataset, input_shape=None):
    """Accepts a callable generator factory, a tf.data.Dataset or an array.

    `input_shape`: the model's input shape (batch first), to check examples
    against, or None (several inputs: not checked).
    """
    if isinstance(dataset, (str, bytes, os.PathLike)):
        raise ValueError(
            f"representative_dataset={dataset!r} looks like a file path; pass "
            "the examples themselves, e.g. representative_dataset="
            "np.load(path)."
        )
    if isinstance(dataset, tf.data.Dataset):
        def rows():
            for batch in dataset:
                batch = batch[0] if isinstance(batch, (tuple, list)) else batch
                batch = tf.convert_to_tensor(batch)
                _check_example_shape(batch.shape[1:], input_shape, "has")
                for row in tf.unstack(batch[:64]):
                    yield [tf.cast(row[None], tf.float32)]
        return _checked_rows(rows)
    if callable(dataset):
        return _checked_rows(dataset)
    if isinstance(dataset, collections.abc.Iterator):
        raise ValueError(
            "representative_dataset is an iterator (a generator object?), "
            "which the converter could only read once; pass the generator "
            "function itself (representative_dataset=gen, not gen()), a "
            "tf.data.Dataset or an array."
        )
    try:
        array = np.asarray(dataset, np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(
            "representative_dataset must be a non-empty batch of numeric "
            f"inputs, a tf.data.Dataset or a generator factory; converting "
            f"{type(dataset).__name__} to float32 failed: {e}"
        ) from e
    if array.ndim < 2 or len(array) == 0:
        raise ValueError(
            "representative_dataset must be a non-empty batch of inputs "
            f"(got shape {array.shape}), a tf.data.Dataset or a generator "
            "factory."
        )
    try:
        _check_example_shape(array.shape[1:], input_shape, "has")
    except _RepresentativeDataError as e:
        raise ValueError(str(e)) from None
    if not np.all(np.isfinite(array[:256])):
        raise ValueError(
            "representative_dataset contains NaN or infinite values; "
            "calibration needs finite example inputs (as the model sees in "
            "training)."
        )

    def rows():
        for row in array[:256]:
            yield [row[None]]
    return _checked_rows(rows)


def convert_to_tflite(model, *, mode="weights", representative_dataset=None,
                      weight_dtype="int8", io_dtype="float32", align_biases=True):
    """Converts a quantized model to a TFLite flatbuffer (builtin ops only).

    A `MetaQuantModel` or a model with `MetaQuantWrapper` layers is first
    stripped (`strip_model`); a plain Keras model is converted as it is. The
    model is exported in inference mode; the converter folds BatchNorm into
    the preceding kernels.

    Modes:
        "weights" (default): float activations and float arithmetic, as in
            Keras; each quantized kernel is stored as integer codes with one
            scale per output channel (`codes * scales` equals the Keras kernel
            `Q(A(W))`, BatchNorm folded in, to float rounding) and a builtin
            DEQUANTIZE op expands it. By default the codes are int8
            (`weight_dtype="int8"`): the XNNPACK delegate, which LiteRT and
            tf.lite apply by default on CPU, expands an int8 DEQUANTIZE of a
            constant once when the model loads and then runs the float op, so
            the file runs at float speed, at about 0.27-0.29x the float
            file's size (measured: examples/benchmark_tflite.py and the
            README's "TFLite latency"). `weight_dtype="int4"` stores codes
            that fit in [-7, 7] (1-3-bit DoReFa, BWN, ternary, uniform up to
            4 bits) as int4, two a byte: about 0.15-0.17x the float file, but
            that delegate does not expand int4 constants, so every
            convolution fed by one falls back to TFLite's own kernels:
            2.6-4.6x float latency (batch 1, one thread, LiteRT 2.3). Codes
            that do not fit int4 are int8 either way; 8-bit DoReFa needs
            9-bit codes and stays float32, and layers left float stay
            float32.
        "int8": full-integer model (int8 weights and activations, float
            input/output unless `io_dtype`). A model trained with
            `activation_quantizer=` carries its ranges: the file's scales are
            the trained ones, no dataset is taken, and a file with any op
            left in float is refused; with `align_biases` (default) the
            model's folded biases are then moved onto the file's int32 bias
            grid so that the two compute the same integers up to float
            round-off at rounding boundaries; inside
            `mq_keras.file_rounding(model, file)` the model's inference
            rounds its blocks as the file's kernels do. Otherwise ranges
            are calibrated on `representative_dataset`; each
            quantized filter is then moved from the converter's max|w|/127
            scale onto its exact grid (`tflite_weights.regrid_int8_filters`).
        "float": no quantized storage at all (float32 kernels holding Q(W)).

    Args:
        model: a `MetaQuantModel`, a model containing `MetaQuantWrapper`
            layers, or a plain Functional/Sequential Keras model.
        mode: "weights", "int8" or "float".
        representative_dataset: inputs for "int8" calibration: an array of
            examples, a `tf.data.Dataset` of batches (or (x, y) batches), or a
            generator factory as TFLite takes it. Only for mode="int8".
        weight_dtype: storage of the codes in mode="weights": "int8"
            (default; float speed) or "int4" (int4 where the codes fit:
            smallest file, slower convolutions). "auto", the former default,
            is a deprecated alias of "int4" (DeprecationWarning).
        io_dtype: "float32" (default), or "int8"/"uint8" input and output for
            delegates that need them: mode="int8" on a model trained with
            activation quantizers only.
        align_biases: mode="int8" on a model trained with activation
            quantizers: move each folded bias of the Keras model (a
            BatchNormalization's `beta`, else the layer's `bias`) onto the
            file's int32 grid, by at most half an int32 step (below 1% of an
            output quantization step; `mq_keras.integer_bias`). The model is
            changed in place and the file is not: without it the file's
            rounded biases shift some activations by one step, and these
            differences grow layer by layer (ResNet20 w4a8: 0.5-1% of top-1
            predictions differ). False leaves the model untouched.

    Before returning, the file is checked so that no file that crashes a
    phone leaves here (`export_checks`): in "int8" mode the Keras model first
    runs on the calibration examples (NaN or Inf activations would give the
    file infinite quantization scales); then the file's quantization
    parameters are validated, and a child process loads it, allocates its
    tensors and runs it once (a segmentation fault kills the child only).
    This adds under a second (one child process) and, in "int8" mode, one
    Keras pass over the calibration data.

    Returns:
        The TFLite model as `bytes`.

    Raises:
        ValueError: unknown `mode` or `weight_dtype`, a dataset missing for
            (or given to a mode other than) "int8", a model that cannot be
            stripped, NaN/Inf activations on the representative data, or a
            converted file the interpreter cannot allocate or run.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; allowed modes are {MODES}.")
    weight_dtype = _weight_dtype(weight_dtype)
    graph = _graph_model(model)
    trained = int8_graph.has_activation_ranges(graph)
    int8_graph.check_int8_options(mode, trained, representative_dataset, io_dtype)
    if mode == "int8" and representative_dataset is None and not trained:
        raise ValueError(
            'mode="int8" needs representative_dataset= (a few hundred '
            "training inputs) to calibrate activation ranges, or a model "
            "trained with quantize_model(..., activation_quantizer='ema')."
        )
    if mode != "int8" and representative_dataset is not None:
        raise ValueError(
            f"representative_dataset is only used by mode='int8', not "
            f"mode={mode!r}; drop it, or pass mode='int8' for a full-integer "
            "model."
        )
    source = graph
    if any(isinstance(l, MetaQuantWrapper) for l in iter_layers(graph)):
        graph = strip_model(graph)
    elif not graph.built:
        raise ValueError(
            f"Model {graph.name!r} is not built; give it an Input (or call "
            "it on data) before convert_to_tflite."
        )
    representative = None
    if mode == "int8" and trained:
        graph = affine_layers_as_depthwise(unroll_recurrent(graph))
        full = _convert(graph, trained_ranges=True,
                        io_dtype=None if io_dtype == "float32" else io_dtype)
        blob = tflite_weights.regrid_int8_filters(full, _convert(graph))[0]
        int8_graph.check_all_integer(blob)
        export_checks.check_tflite(blob)
        if align_biases:
            integer_bias.align_biases(source, blob)
        return blob
    if mode == "int8":  # checked before the first (slow) conversion
        inputs = graph.inputs
        representative = _as_representative(
            representative_dataset,
            tuple(inputs[0].shape) if len(inputs) == 1 else None,
        )
        try:
            export_checks.check_activations(graph, representative)
        except _RepresentativeDataError as e:  # read by us, not the converter
            raise ValueError(str(e)) from e.__cause__
    graph = unroll_recurrent(graph)
    blob = _convert_mode(graph, mode, representative, weight_dtype)
    export_checks.check_tflite(blob)
    return blob


def _convert_mode(graph, mode, representative, weight_dtype):
    """The TFLite bytes of a plain Keras model in `mode` (unchecked)."""
    flat = _convert(graph)
    if mode == "float":
        return flat
    if mode == "int8":
        full = _convert(graph, representative_dataset=representative)
        return tflite_weights.regrid_int8_filters(full, flat)[0]
    packed, _ = tflite_weights.store_kernels_as_codes(
        flat, allow_int4=weight_dtype == "int4")
    return packed


def make_interpreter(tflite_bytes, *, num_threads=1):
    """A LiteRT interpreter (ai-edge-litert when installed, else tf.lite)."""
    tflite_bytes = tflite_weights.check_flatbuffer(tflite_bytes, "tflite_bytes")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # the phone runtime's Python build is optional
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation
        return Interpreter(model_content=tflite_bytes, num_threads=num_threads)


def run_tflite(tflite_bytes, x, *, batch_size=256, num_threads=1):
    """Runs a single-input TFLite model on `x` in batches; returns the outputs."""
    interp = make_interpreter(tflite_bytes, num_threads=num_threads)
    inp = interp.get_input_details()[0]
    x = np.asarray(x)
    outs = []
    shape = None
    for i in range(0, len(x), batch_size):
        batch = x[i:i + batch_size]
        if shape != batch.shape:
            interp.resize_tensor_input(inp["index"], batch.shape)
            interp.allocate_tensors()
            shape = batch.shape
        interp.set_tensor(inp["index"], batch.astype(inp["dtype"]))
        interp.invoke()
        outs.append(interp.get_tensor(interp.get_output_details()[0]["index"]))
    return np.concatenate(outs)


def tflite_ops(tflite_bytes):
    """Names of the operators a TFLite model uses (custom/Flex ops by name)."""
    return tflite_weights.op_names(tflite_bytes)


def verify_tflite(model, tflite_bytes, x, y=None, *, batch_size=256):
    """Compares a TFLite file with the Keras model it came from.

    Args:
        model: the Keras (`MetaQuantModel` or plain) model.
        tflite_bytes: the converted model.
        x: inputs (a NumPy batch).
        y: optional integer labels, to report both accuracies.
        batch_size: batch size for both runtimes.

    Returns:
        A dict: `max_abs_diff` and `max_rel_diff` of the outputs,
        `top1_agreement` (fraction), `keras_accuracy` / `tflite_accuracy`
        (when `y` is given), `tflite_bytes`, `ops` and `flex_ops` (any op
        that is not a TFLite builtin). For a model trained with activation
        quantizers and its full-integer file, also the same comparison with
        Keras rounding its blocks as the file does
        (`requantization.file_rounding`): `file_rounding_top1_agreement`,
        `file_rounding_max_abs_diff`, `file_rounding_identical` (fraction
        of outputs equal), `file_rounding_layers` (blocks so rounded).
    """
    tflite_bytes = tflite_weights.check_flatbuffer(tflite_bytes, "tflite_bytes")
    x = np.asarray(x, np.float32)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(
            f"verify_tflite needs at least one input example; got x of shape "
            f"{x.shape}, pass a batch of model inputs (num_examples, ...)."
        )
    ref = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
    got = run_tflite(tflite_bytes, x, batch_size=batch_size)
    if got.shape != ref.shape:
        raise ValueError(
            f"TFLite output shape {got.shape} differs from Keras {ref.shape}: "
            "was this file converted from this model?"
        )
    ops = tflite_ops(tflite_bytes)
    report = {
        "max_abs_diff": float(np.abs(got - ref).max()),
        "max_rel_diff": float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)),
        "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
        "tflite_bytes": len(tflite_bytes),
        "ops": sorted(set(ops)),
        "flex_ops": sorted({o for o in ops if not o.isupper() or o.startswith("FLEX")}),
    }
    if y is not None:
        y = np.asarray(y).reshape(-1)
        report["keras_accuracy"] = float(np.mean(ref.argmax(-1) == y))
        report["tflite_accuracy"] = float(np.mean(got.argmax(-1) == y))
    graph = model.quantized_model if isinstance(model, MetaQuantModel) else model
    if (is_graph_model(graph) and int8_graph.has_activation_ranges(graph)
            and not int8_graph.float_ops(tflite_bytes)):
        with requantization.file_rounding(model, tflite_bytes) as info:
            if info["layers"]:
                same = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
                report.update(
                    file_rounding_top1_agreement=float(np.mean(got.argmax(-1) == same.argmax(-1))),
                    file_rounding_max_abs_diff=float(np.abs(got - same).max()),
                    file_rounding_identical=float(np.mean(got == same)),
                    file_rounding_layers=len(info["layers"]))
    return report


def _load_model(path, *, safe_mode=True):
    """Loads a `.keras` file, in Keras' safe mode unless told otherwise.

    Safe mode refuses files whose config holds Python bytecode (a `Lambda`
    layer's lambda), which would run on load. A MetaQuantModel loads in safe
    mode (every mq_keras class is registered with Keras) unless the model
    itself holds such a layer.
    """
    return keras.saving.load_model(path, safe_mode=safe_mode)


def _main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m mq_keras.export",
        description="Convert a saved .keras MetaQuant model to a .tflite file.",
    )
    parser.add_argument("model", help="path of the .keras file")
    parser.add_argument("output", help="path of the .tflite file to write")
    parser.add_argument("--mode", default="weights", choices=MODES)
    parser.add_argument(
        "--weight_dtype", default=WEIGHT_DTYPES[0],
        choices=WEIGHT_DTYPES + tuple(_WEIGHT_DTYPE_ALIASES),
        help='--mode weights: storage of the codes. "int8" (default) runs at '
             'float speed at about 0.27-0.29x the float file; "int4" gives about '
             "0.15-0.17x but its convolutions run 2.6-4.6x slower in LiteRT. "
             '"auto" is a deprecated name of "int4".',
    )
    parser.add_argument(
        "--representative_data",
        help='mode "int8": a .npy file of example inputs for calibration',
    )
    parser.add_argument(
        "--unsafe", action="store_true",
        help="load the .keras file with safe_mode=False, which lets it hold "
             "Lambda layers whose Python bytecode runs when the model loads "
             "or runs: a crafted file can then execute arbitrary code. Use "
             "it only for files you made or trust. By default the file is "
             "loaded in safe mode, which refuses such layers; a MetaQuant "
             "model needs --unsafe only if it contains one.",
    )
    args = parser.parse_args(argv)
    if not args.model.endswith(".keras"):
        parser.error(
            f"{args.model!r} is not a .keras file; save the model with "
            "model.save('name.keras') (the Keras 3 format) and pass that path"
        )
    if not os.path.isfile(args.model):
        parser.error(f"{args.model!r} does not exist or is not a file; pass "
                     "the path of a saved .keras model")
    if args.mode == "int8" and not args.representative_data:
        parser.error('--mode int8 needs --representative_data FILE.npy')
    if args.representative_data and args.mode != "int8":
        parser.error(
            f"--representative_data is only used by --mode int8, not --mode "
            f"{args.mode}; drop it or add --mode int8"
        )
    if args.representative_data and not os.path.isfile(args.representative_data):
        parser.error(f"--representative_data {args.representative_data!r} "
                     "does not exist; pass a .npy file of example inputs")
    try:
        model = _load_model(args.model, safe_mode=not args.unsafe)
    except ValueError as e:
        if args.unsafe or "safe_mode" not in str(e):
            raise
        raise ValueError(
            f"{e}\nmq_keras.export loads {args.model!r} in safe mode; if you "
            "made or trust this file, rerun with --unsafe."
        ) from e
    data = None
    if args.representative_data:
        data = np.load(args.representative_data, allow_pickle=False)
    try:
        blob = convert_to_tflite(model, mode=args.mode,
                                 representative_dataset=data,
                                 weight_dtype=args.weight_dtype)
    except ValueError as e:  # a refused model or file: no traceback, no file
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    with open(args.output, "wb") as f:
        f.write(blob)
    print(f"wrote {args.output}: {len(blob):,} bytes ({args.mode} mode)")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
