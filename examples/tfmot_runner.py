"""Runs the TFMOT peer baseline (examples/tfmot_peer.py) from our own venv.

TFMOT's QAT needs the legacy `tf_keras` and pins an old absl-py and numpy<2,
so it lives in its own venv, `<repo>/.venv-tfmot` (created by
examples/tfmot_setup.sh), and runs in a child process. This module has no
flags and imports nothing heavy at import time:

    from examples import tfmot_runner            # or put examples/ on sys.path
    if tfmot_runner.tfmot_available():
        tfmot_runner.save_init_weights(float_model, "/tmp/init.npz")
        r = tfmot_runner.run_tfmot(model="small_cnn", scheme="nbit", num_bits=4,
                                   train_limit=10000, epochs=3, lr=0.05,
                                   init_weights="/tmp/init.npz", timeout=1800)
        print(r["final_accuracy"], r["median_step_s"])

`run_tfmot(**options)` turns each option into a flag of tfmot_peer.py
(`num_bits=4` -> `--num_bits=4`; `True` -> `--smoke`; `False`/`None` ->
omitted) and returns the dict of the child's `TFMOT_RESULT {json}` line.
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PEER_SCRIPT = REPO / "examples" / "tfmot_peer.py"
DEFAULT_VENV = REPO / ".venv-tfmot"
RESULT_PREFIX = "TFMOT_RESULT "
INIT_WEIGHTS_FORMAT = "mq_keras.tfmot_init_weights.v1"
_SHARED_TFDS = REPO.parent / "shared" / "tensorflow_datasets"

_CHECK = (
    "import os; os.environ['TF_USE_LEGACY_KERAS'] = '1'\n"
    "import tensorflow as tf, tf_keras, tensorflow_model_optimization as tfmot\n"
    "import tensorflow_datasets\n"
    "tfmot.quantization.keras.experimental.default_n_bit.DefaultNBitQuantizeScheme\n"
    "assert tf.keras.__name__.startswith('tf_keras'), tf.keras.__name__\n"
)
_available = {}


class TFMOTError(RuntimeError):
    """The TFMOT child process failed, timed out or printed no result."""


def tfmot_python(venv=None):
    """Path of the TFMOT venv's python (it may not exist)."""
    venv = pathlib.Path(venv) if venv else DEFAULT_VENV
    return venv / "bin" / "python"


def child_env(extra=None):
    """Environment of the child: ours, minus Python/venv variables, plus
    TF_USE_LEGACY_KERAS=1, TF_CPP_MIN_LOG_LEVEL=3 and TFDS_DATA_DIR (passed
    through, or ../shared/tensorflow_datasets when unset and present)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["TF_USE_LEGACY_KERAS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if "TFDS_DATA_DIR" not in env and _SHARED_TFDS.is_dir():
        env["TFDS_DATA_DIR"] = str(_SHARED_TFDS)
    env.update(extra or {})
    return env


def tfmot_available(venv=None, timeout=300):
    """True when the TFMOT venv exists and TF, tf_keras, TFMOT and tfds import.

    The import check runs once per venv in a child process (a few seconds)
    and its answer is cached.
    """
    python = tfmot_python(venv)
    if not python.exists() or not PEER_SCRIPT.exists():
        return False
    key = str(python)
    if key not in _available:
        try:
            proc = subprocess.run([str(python), "-c", _CHECK], env=child_env(),
                                  capture_output=True, text=True, timeout=timeout)
            _available[key] = proc.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _available[key] = False
    return _available[key]


def _flags(options):
    argv = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        if value is True:
            argv.append(f"--{name}")
        else:
            argv.append(f"--{name}={value}")
    return argv


def _tail(text, n=4000):
    text = text or ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    # TF 2.21 logs a few absl lines at start-up whatever TF_CPP_MIN_LOG_LEVEL says.
    lines = [l for l in text.splitlines()
             if not l.startswith(("I0000 ", "E0000 ", "W0000 ",
                                  "WARNING: All log messages before absl"))]
    return "\n".join(lines)[-n:]


def run_tfmot(timeout=3600, venv=None, env=None, **options):
    """Runs examples/tfmot_peer.py in the TFMOT venv; returns its result dict.

    Args:
        timeout: seconds before the child is killed (raises TFMOTError).
        venv: the TFMOT venv (default <repo>/.venv-tfmot).
        env: extra environment variables for the child.
        **options: flags of tfmot_peer.py, e.g. model="small_cnn",
            dataset="mnist", scheme="default8" | "nbit" | "float", num_bits=4,
            epochs=3, optimizer="sgd", lr=0.05, batch_size=128,
            train_limit=10000, test_limit=10000, init_weights=path,
            export_tflite=path, eval_initial=True, smoke=True.

    Raises:
        TFMOTError: the venv is missing, the child failed or timed out, or it
            printed no `TFMOT_RESULT` line. The message has its stderr tail.
    """
    python = tfmot_python(venv)
    if not python.exists():
        raise TFMOTError(f"No TFMOT venv at {python.parent.parent}; create it with "
                         f"{REPO / 'examples' / 'tfmot_setup.sh'}")
    cmd = [str(python), str(PEER_SCRIPT)] + _flags(options)
    try:
        proc = subprocess.run(cmd, env=child_env(env), cwd=str(REPO),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise TFMOTError(
            f"TFMOT peer timed out after {timeout} s: {' '.join(cmd)}\n"
            f"--- stderr tail ---\n{_tail(e.stderr)}\n"
            f"--- stdout tail ---\n{_tail(e.stdout, 2000)}") from None
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise TFMOTError(
            f"TFMOT peer failed (exit status {proc.returncode}"
            f"{'' if lines else ', no ' + RESULT_PREFIX.strip() + ' line'}): "
            f"{' '.join(cmd)}\n--- stderr tail ---\n{_tail(proc.stderr)}\n"
            f"--- stdout tail ---\n{_tail(proc.stdout, 2000)}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["command"] = cmd
    return result


# ------------------------------------------------------------- starting weights

def _leaf_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and not hasattr(layer, "layer"):
            yield from _leaf_layers(layer)  # a nested Model / Sequential
        else:
            yield layer


def init_weights_arrays(keras_model):
    """{"<layer_name>/<i>": array} of every layer with weights (Keras 3 model).

    A `keras.layers.Wrapper` (e.g. mq_keras' MetaQuantWrapper) contributes its
    inner layer's float weights under the inner layer's name; its own extra
    state is not written.
    """
    import numpy as np

    arrays = {}
    for layer in _leaf_layers(keras_model):
        inner = getattr(layer, "layer", None)
        source = inner if inner is not None else layer
        weights = source.get_weights()
        if not weights:
            continue
        if any(key.startswith(source.name + "/") for key in arrays):
            raise ValueError(f"Two layers are named {source.name!r}")
        for i, w in enumerate(weights):
            arrays[f"{source.name}/{i}"] = np.asarray(w)
    return arrays


def save_init_weights(keras_model, path):
    """Writes the npz that tfmot_peer.py's --init_weights reads.

    Format: `np.savez` with one key `"<layer_name>/<i>"` per array, the arrays
    of a layer being its `get_weights()` in Keras order and layout (Conv2D:
    kernel HWIO, bias; Dense: kernel (in, out), bias; BatchNormalization:
    gamma, beta, moving_mean, moving_variance), which Keras 3 and tf_keras
    share; plus `__format__`. The layer names must be those of tfmot_peer.py's
    models: examples/mnist.py's make_model() names (conv1, bn1, conv2, bn2,
    logits, bn_logits) and the ResNet20 names of
    ../shared/pretrained/resnet20_cifar10_fp.json (conv1, bn1,
    layer1_0_conv1, ..., layer2_0_downsample_0, ..., fc).

    Returns the sorted layer names written.
    """
    import numpy as np

    arrays = init_weights_arrays(keras_model)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez adds no ".npz"
        np.savez(f, __format__=np.array(INIT_WEIGHTS_FORMAT), **arrays)
    return sorted({key.rpartition("/")[0] for key in arrays})


def resnet20_init_weights_from_pytorch(npz_path, out_path):
    """Converts ../shared/pretrained/resnet20_cifar10_fp.npz (PyTorch names and
    layouts) to the --init_weights format, following the JSON beside it:
    "a.b.weight" -> layer "a_b"; conv OIHW -> HWIO; linear (out, in) -> (in,
    out); BN (weight, bias, running_mean, running_var) -> (gamma, beta,
    moving_mean, moving_variance). Returns the sorted layer names."""
    import numpy as np

    bn_order = ("weight", "bias", "running_mean", "running_var")
    layers = {}
    with np.load(npz_path) as z:
        for key in z.files:
            module, _, param = key.rpartition(".")
            if param == "num_batches_tracked":
                continue
            layers.setdefault(module.replace(".", "_"), {})[param] = z[key]
    arrays = {}
    for name, params in layers.items():
        if "running_mean" in params:  # BatchNorm
            values = [params[p] for p in bn_order]
        elif params["weight"].ndim == 4:  # conv
            values = [params["weight"].transpose(2, 3, 1, 0)]
            if "bias" in params:
                values.append(params["bias"])
        else:  # linear
            values = [params["weight"].T]
            if "bias" in params:
                values.append(params["bias"])
        for i, v in enumerate(values):
            arrays[f"{name}/{i}"] = np.ascontiguousarray(v, dtype=np.float32)
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as f:
        np.savez(f, __format__=np.array(INIT_WEIGHTS_FORMAT), **arrays)
    return sorted(layers)


if __name__ == "__main__":  # python examples/tfmot_runner.py: availability check
    ok = tfmot_available()
    print(f"TFMOT venv {DEFAULT_VENV}: {'available' if ok else 'NOT available'}")
    sys.exit(0 if ok else 1)
