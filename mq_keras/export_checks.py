"""Checks that a TFLite file made by `convert_to_tflite` is safe to ship.

TFLite trusts its files: a full-integer model calibrated on activations that
overflow float32 gets infinite quantization scales, and the XNNPACK delegate
(applied by default by tf.lite and LiteRT) then crashes the process with a
segmentation fault in `allocate_tensors`. An untrained
`keras.applications.DenseNet121` quantized to 2 bits does exactly that (TF
2.21, LiteRT 2.3): its activations overflow in the third dense block, the
Keras output is NaN, 50 int8 activation tensors of the file have scale `inf`,
and a requantizing QUANTIZE op with such a scale segfaults (an infinite scale
elsewhere makes XNNPACK refuse the node with an error instead). A file like
that is worse than an error, so `convert_to_tflite` runs three checks,
cheapest first:

1. `check_activations`: the Keras model on the calibration examples; NaN or
   Inf there (before the slow conversion) names the first layer whose output
   is non-finite.
2. `check_quantization`: the quantization parameters in the flatbuffer (no
   interpreter involved): non-finite or non-positive scales, zero points
   outside their type's range, scale and zero point counts that disagree.
3. `check_interpreter`: a child process loads the file with the interpreter
   `mq_keras.export.make_interpreter` uses, allocates its tensors and runs
   it once on zeros, so a crash kills the child, not the caller, and becomes
   a `ValueError` with the child's signal.
"""

import os
import signal
import subprocess
import sys
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from mq_keras import tflite_weights

BATCH_SIZE = 64
INTERPRETER_TIMEOUT_S = 300
_CHILD_ERROR = 3  # the child's status when the interpreter raised

# Allowed zero points per quantized tensor type (TFLite's kernels assume them).
_ZERO_POINT_RANGE = {
    schema.TensorType.INT4: (-8, 7),
    schema.TensorType.INT8: (-128, 127),
    schema.TensorType.UINT8: (0, 255),
    schema.TensorType.INT16: (0, 0),
    schema.TensorType.INT32: (0, 0),
    schema.TensorType.INT64: (0, 0),
}
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items()
               if not k.startswith("_")}

# Run in the child: the interpreter make_interpreter picks, defaults as there.
_CHILD = """
import sys
import numpy as np
try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    import tensorflow as tf
    Interpreter = tf.lite.Interpreter
try:
    interp = Interpreter(model_path=sys.argv[1], num_threads=1)
    interp.allocate_tensors()
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    interp.invoke()
except Exception as e:
    print(type(e).__name__ + ": " + str(e), file=sys.stderr)
    sys.exit({status})
""".format(status=_CHILD_ERROR)

_ADVICE = (
    "Check the model's activations on the representative data: an untrained "
    "or diverged model, or badly scaled inputs, overflow (infinite ranges), "
    "and a dead layer gives a constant range. Train the model first, "
    "normalize the inputs, or export with mode=\"weights\" (float "
    "activations) or more bits."
)


def _stack(items):
    return tf.nest.map_structure(lambda *x: np.concatenate(x), *items)


def _batches(factory, batch_size):
    """Stacks the examples a representative-dataset factory yields.

    Consecutive examples of the same shapes form one batch (a model with
    variable-size inputs may be calibrated on examples of several sizes).
    """
    chunk, shapes = [], None
    for item in factory():
        item = tf.nest.map_structure(np.asarray, item)
        key = [x.shape for x in tf.nest.flatten(item)]
        if chunk and (key != shapes or len(chunk) == batch_size):
            yield _stack(chunk)
            chunk = []
        chunk.append(item)
        shapes = key
    if chunk:
        yield _stack(chunk)


def _model_inputs(model, batch):
    """`batch` as `model` takes it: one input unwrapped from a 1-item list."""
    if isinstance(batch, (list, tuple)) and len(batch) == 1 == len(model.inputs):
        return batch[0]
    return batch


def _all_finite(structure):
    return all(np.all(np.isfinite(np.asarray(t, np.float64)))
               for t in tf.nest.flatten(structure))


def first_nonfinite_layer(model, inputs):
    """Names the first layer (in graph order) whose output is NaN or Inf.

    Builds a model that outputs every operation's (first-call) output and runs
    it once on `inputs`; meant for the one offending example, on the error
    path only.

    Args:
        model: a built Functional or Sequential Keras model.
        inputs: inputs `model` takes (one example is enough).

    Returns:
        `"name (ClassName)"`, or None when the graph cannot be probed (nested
        or shared layers whose outputs lie outside it) or all are finite.
    """
    ops = [op for op in model.operations
           if not isinstance(op, keras.layers.InputLayer)]
    try:
        probe = keras.Model(model.input, [op.output for op in ops])
        outputs = probe(inputs, training=False)
    except Exception:  # best effort: the caller reports without a name
        return None
    for op, out in zip(ops, outputs):
        if not _all_finite(out):
            return f"{op.name} ({type(op).__name__})"
    return None


def check_activations(model, representative, *, batch_size=BATCH_SIZE):
    """Runs `model` on the calibration examples; refuses NaN or Inf outputs.

    Calibration records each activation's range; an infinite range gives the
    int8 file infinite scales, which crash the interpreter. The Keras model
    shows it earlier and more clearly than the converter.

    Args:
        model: the (stripped) Keras model that is converted.
        representative: a generator factory yielding lists of model inputs of
            batch size 1, as the TFLite converter takes it.
        batch_size: examples per Keras call.

    Raises:
        ValueError: an output is NaN or Inf on some example; the message
            names the first non-finite layer where it can be found.
    """
    seen = 0
    for batch in _batches(representative, batch_size):
        inputs = _model_inputs(model, batch)
        outputs = _run(model, inputs, seen)
        if not _all_finite(outputs):
            row = _first_bad_row(outputs)
            one = tf.nest.map_structure(lambda t: t[row:row + 1], inputs)
            raise ValueError(_activation_error(model, one, seen + row))
        seen += len(tf.nest.flatten(inputs)[0])


def _first_bad_row(outputs):
    """The first example (row) of a batch with a NaN or Inf output."""
    finite = [np.isfinite(np.asarray(t, np.float64)).reshape(len(t), -1)
              .all(axis=1) for t in tf.nest.flatten(outputs)]
    return int(np.flatnonzero(~np.logical_and.reduce(finite))[0])


def _run(model, inputs, first):
    """`model`'s outputs on a batch of calibration examples."""
    try:
        return model(inputs, training=False)
    except Exception as e:  # Keras and TF raise several types
        raise ValueError(
            f"Model {model.name!r} cannot run on representative_dataset "
            f"examples {first} and after: {type(e).__name__}: {e}; it must "
            "yield lists of model inputs of batch size 1."
        ) from e


def _activation_error(model, example, index):
    layer = first_nonfinite_layer(model, example)
    where = (f"; the first layer whose output is non-finite is {layer}"
             if layer else "")
    return (
        f"Model {model.name!r} computes NaN or Inf on representative_dataset "
        f"example {index} (its inputs are finite){where}. A full-integer "
        "model calibrated on it would get infinite quantization scales and "
        "crash the TFLite interpreter (segmentation fault in "
        "allocate_tensors). Fix the activations: train the model first (an "
        "untrained model quantized to few bits, e.g. DenseNet121 at 2 bits, "
        "overflows float32), normalize the inputs as in training, or use more "
        "bits; mode=\"weights\" would not crash but computes the same NaN."
    )


def _tensor_problem(tensor):
    """What is wrong with one tensor's quantization parameters, or None."""
    q = tensor.quantization
    if (tensor.type not in _ZERO_POINT_RANGE or q is None or q.scale is None
            or len(q.scale) == 0):
        return None  # float tensors: kernels ignore their parameters
    scale = np.asarray(q.scale, np.float64)
    zero = np.asarray(q.zeroPoint if q.zeroPoint is not None else [], np.int64)
    if not np.all(np.isfinite(scale)):
        return f"non-finite scale {scale[~np.isfinite(scale)][0]}"
    if np.any(scale <= 0):
        return f"scale {scale[scale <= 0][0]} (scales must be positive)"
    if len(zero) != len(scale):
        return f"{len(scale)} scales but {len(zero)} zero points"
    low, high = _ZERO_POINT_RANGE.get(tensor.type, (-np.inf, np.inf))
    if np.any((zero < low) | (zero > high)):
        bad = zero[(zero < low) | (zero > high)][0]
        return (f"zero point {bad} outside [{low}, {high}] for "
                f"{_TYPE_NAMES.get(tensor.type, tensor.type)}")
    axis = int(q.quantizedDimension)
    shape = tensor.shape if tensor.shape is not None else []
    if len(scale) > 1 and (axis >= len(shape) or shape[axis] != len(scale)):
        return (f"{len(scale)} per-channel scales on axis {axis} of a tensor "
                f"of shape {list(shape)}")
    return None


def quantization_problems(flatbuffer):
    """Lists the quantized tensors whose parameters no interpreter can use.

    Args:
        flatbuffer: TFLite model bytes.

    Returns:
        One `"tensor name: problem"` string per bad tensor (empty if none).
    """
    data = tflite_weights.check_flatbuffer(flatbuffer, "flatbuffer")
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    problems = []
    for sg in model.subgraphs:
        for tensor in sg.tensors:
            problem = _tensor_problem(tensor)
            if problem is not None:
                name = tensor.name
                name = name.decode() if isinstance(name, bytes) else name
                problems.append(f"{name}: {problem}")
    return problems


def check_quantization(flatbuffer):
    """Refuses a file with unusable quantization parameters (in process).

    The typical cause of a crashing file, found in milliseconds without
    running an interpreter.

    Args:
        flatbuffer: TFLite model bytes.

    Raises:
        ValueError: some tensor has a NaN, Inf, zero or negative scale, a zero
            point out of range, or mismatched scale/zero point counts; the
            message names the first tensors.
    """
    problems = quantization_problems(flatbuffer)
    if problems:
        shown = "\n  ".join(problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(
            f"The TFLite converter produced an unusable file: {len(problems)} "
            f"quantized tensor(s) have invalid parameters, which crash the "
            f"interpreter:\n  {shown}{more}\n{_ADVICE}"
        )


def _describe_exit(returncode):
    if returncode == _CHILD_ERROR:
        return "got an error from the interpreter"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def check_interpreter(flatbuffer, *, timeout=INTERPRETER_TIMEOUT_S):
    """Loads and runs the file once in a child process; refuses a crash.

    The child (`sys.executable`, the file passed through a temporary file)
    builds the interpreter `make_interpreter` would (ai-edge-litert when
    installed, else tf.lite, default XNNPACK delegate), calls
    `allocate_tensors` and invokes it once on zeros. A segmentation fault
    there kills only the child. A child that does not finish in `timeout`
    seconds is reported by a warning, not an error: it proves nothing.

    Args:
        flatbuffer: TFLite model bytes.
        timeout: seconds the child may take.

    Raises:
        ValueError: the child crashed or the interpreter raised; the message
            gives its signal or error and what to do.
    """
    data = tflite_weights.check_flatbuffer(flatbuffer, "flatbuffer")
    fd, path = tempfile.mkstemp(prefix="mq_keras_check_", suffix=".tflite")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        result = subprocess.run([sys.executable, "-c", _CHILD, path], env=env,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        warnings.warn(f"The TFLite interpreter did not load and run the file "
                      f"within {timeout} s; it was not checked.")
        return
    finally:
        os.unlink(path)
    if result.returncode != 0:
        said = "\n".join(result.stderr.strip().splitlines()[-3:])
        raise ValueError(
            "The TFLite converter produced an unusable file: a child process "
            f"that loaded it {_describe_exit(result.returncode)} in "
            "allocate_tensors/invoke"
            + (f" and said:\n{said}\n" if said else ". ") + _ADVICE
        )


def check_tflite(flatbuffer):
    """Refuses a file that TFLite cannot allocate or run.

    Runs `check_quantization`, then `check_interpreter` (about 0.2-0.5 s: one
    child process).

    Args:
        flatbuffer: TFLite model bytes.

    Raises:
        ValueError: from either check.
    """
    check_quantization(flatbuffer)
    check_interpreter(flatbuffer)
