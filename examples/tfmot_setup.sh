#!/usr/bin/env bash
# Creates the separate virtual environment that runs the TFMOT peer baseline.
#
# Why a separate venv: tensorflow-model-optimization (TFMOT) 0.8.x quantization-
# aware training only works with the legacy `tf_keras` (TF_USE_LEGACY_KERAS=1),
# and TFMOT pins `absl-py~=1.2` (and `numpy~=1.23`, i.e. numpy < 2), which would
# drag our own stack backwards. So it lives in <repo>/.venv-tfmot, never in .venv.
# examples/tfmot_runner.py runs examples/tfmot_peer.py with this venv's python.
#
# Usage:
#     examples/tfmot_setup.sh            # create or check (idempotent)
#     examples/tfmot_setup.sh --force    # delete and recreate
#
# Environment (all optional):
#     TFMOT_VENV     where the venv goes       (default <repo>/.venv-tfmot)
#     MAIN_PYTHON    python of our main venv   (default <repo>/.venv/bin/python);
#                    its TensorFlow and tensorflow-datasets versions are copied
#     TF_VERSION     TensorFlow version        (default: the main venv's, e.g. 2.21.0)
#     TFDS_VERSION   tensorflow-datasets ver.  (default: the main venv's)
#     BASE_PYTHON    interpreter for `-m venv` (default: the one behind MAIN_PYTHON)
#
# What is installed (measured on TF 2.21.0, Python 3.11; see the report in the
# pull request / examples/tfmot_peer.py docstring):
#     tensorflow==$TF_VERSION            same as ours
#     tf-keras~=<TF minor>.0             tf-keras must match the TF minor version
#                                        (tf-keras 2.N requires tensorflow 2.N)
#     tensorflow-model-optimization      0.8.x
#     tensorflow-datasets==$TFDS_VERSION same as ours
#     importlib_resources                tfds 4.9.10 imports it without declaring it
#     numpy<2                            TFMOT 0.8.x declares numpy~=1.23
#
# Measured here (Python 3.11.7, PyPI reachable, empty pip cache): 47 s and
# 2.5 GB (tensorflow alone 1.9 GB). Result: tensorflow 2.21.0, tf-keras 2.21.0,
# tensorflow-model-optimization 0.8.1, tensorflow-datasets 4.9.10, numpy
# 1.26.4, absl-py 1.4.0, dm-tree 0.1.10. A second run only checks the imports
# (a few seconds).

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TFMOT_VENV:-$REPO/.venv-tfmot}"
MAIN_PYTHON="${MAIN_PYTHON:-$REPO/.venv/bin/python}"
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,36p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "tfmot_setup.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

_main_version() {  # prints the main venv's version of distribution $1, or nothing
    if [[ -x "$MAIN_PYTHON" ]]; then
        "$MAIN_PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))" \
            2>/dev/null || true
    fi
}

TF_VERSION="${TF_VERSION:-$(_main_version tensorflow)}"
TF_VERSION="${TF_VERSION:-2.21.0}"
TFDS_VERSION="${TFDS_VERSION:-$(_main_version tensorflow-datasets)}"
TF_MINOR="$(echo "$TF_VERSION" | cut -d. -f1,2)"          # 2.21

if [[ -z "${BASE_PYTHON:-}" ]]; then
    if [[ -x "$MAIN_PYTHON" ]]; then
        BASE_PYTHON="$("$MAIN_PYTHON" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')"
    else
        BASE_PYTHON="$(command -v python3)"
    fi
fi

REQUIREMENTS=(
    "tensorflow==${TF_VERSION}"
    "tf-keras~=${TF_MINOR}.0"
    "tensorflow-model-optimization~=0.8.0"
    "tensorflow-datasets${TFDS_VERSION:+==$TFDS_VERSION}"
    "importlib_resources"
    "numpy<2"
)
STAMP="$VENV/.mq_keras_tfmot_requirements"

# Imports everything the peer script needs, with the legacy Keras, and prints
# the versions. Exit status 0 iff the environment is usable.
CHECK='
import importlib.metadata as m, json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
import tf_keras
import tensorflow_model_optimization as tfmot
import tensorflow_datasets
tfmot.quantization.keras.experimental.default_n_bit.DefaultNBitQuantizeScheme
assert tf.keras.__name__.startswith("tf_keras"), tf.keras.__name__
dists = ["tensorflow", "tf-keras", "tensorflow-model-optimization",
         "tensorflow-datasets", "importlib_resources", "numpy", "absl-py", "dm-tree"]
v = {d: m.version(d) for d in dists}
v["python"] = sys.version.split()[0]
v["tf.keras"] = tf.keras.__name__
print(json.dumps(v))
'

# TF 2.21 logs a few absl lines at start-up whatever TF_CPP_MIN_LOG_LEVEL says:
# show the check's stderr only when it fails.
_check() {
    local err rc=0
    err="$(mktemp)"
    "$VENV/bin/python" -c "$CHECK" 2>"$err" || rc=$?
    if [[ $rc != 0 ]]; then tail -n 30 "$err" >&2; fi
    rm -f "$err"
    return $rc
}

# pip warns about every file:// extra index that lacks a package; drop those lines.
_pip() {
    local log rc=0
    log="$(mktemp)"
    "$VENV/bin/python" -m pip "$@" >"$log" 2>&1 || rc=$?
    grep -v "is ignored: it is neither a file nor a directory" "$log" || true
    rm -f "$log"
    return $rc
}

if [[ "$FORCE" == 1 && -d "$VENV" ]]; then
    echo "Removing $VENV"
    rm -rf "$VENV"
fi

if [[ -x "$VENV/bin/python" && -f "$STAMP" ]] \
        && [[ "$(cat "$STAMP")" == "${REQUIREMENTS[*]}" ]]; then
    if versions="$(_check 2>/dev/null)"; then  # quiet: a failure reinstalls
        echo "TFMOT venv already set up: $VENV"
        echo "$versions"
        exit 0
    fi
    echo "TFMOT venv at $VENV exists but does not import; reinstalling."
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "Creating $VENV with $BASE_PYTHON"
    "$BASE_PYTHON" -m venv "$VENV"
fi
_pip install -q --progress-bar off --upgrade pip
echo "Installing: ${REQUIREMENTS[*]}"
if ! _pip install -q --progress-bar off "${REQUIREMENTS[@]}"; then
    echo "tfmot_setup.sh: pip install failed (see above)." >&2
    exit 1
fi
if ! versions="$(_check)"; then
    echo "tfmot_setup.sh: the TFMOT venv was installed but does not import (see above)." >&2
    exit 1
fi
echo "${REQUIREMENTS[*]}" > "$STAMP"
end=$(date +%s)
echo "TFMOT venv ready: $VENV ($((end - start)) s, $(du -sh "$VENV" | cut -f1))"
echo "$versions"
