"""Shared test setup: quiet TF, fixed seeds, offline data locations."""

import os
import pathlib
import subprocess
import sys

# Must be set before TensorFlow / tfds are imported by any test module.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED = REPO.parent / "shared"
if (_SHARED / "tensorflow_datasets").is_dir():
    os.environ.setdefault("TFDS_DATA_DIR", str(_SHARED / "tensorflow_datasets"))

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture
def shared_dir():
    """`../shared` beside the repository, or skip when it is absent."""
    if not _SHARED.is_dir():
        pytest.skip("../shared is not present")
    return _SHARED


@pytest.fixture
def golden(shared_dir):
    """The recorded reference numbers (npz) of the official PyTorch code."""
    import numpy as np

    path = shared_dir / "golden" / "metaquant_reference_dorefa_sgd.npz"
    if not path.exists():
        pytest.skip("golden reference file is not present")
    return np.load(path)


@pytest.fixture
def mnist_available():
    path = os.environ.get("TFDS_DATA_DIR")
    if not path or not (pathlib.Path(path) / "mnist").is_dir():
        pytest.skip("prepared MNIST (TFDS_DATA_DIR) is not present")
    return path


def _child_env(**extra):
    """The environment for a child Python: the checkout importable, TF quiet."""
    env = dict(os.environ)
    # Importable from the checkout even when the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH")) if p
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def child_env():
    """`child_env(**extra)`: an environment dict for a child Python process."""
    return _child_env


@pytest.fixture
def run_python():
    """`run(script, *args, cwd=REPO, timeout=300)`: a finished child Python.

    Returns the `subprocess.CompletedProcess` (text stdout/stderr captured).
    """
    def run(script, *args, cwd=REPO, timeout=300):
        return subprocess.run(
            [sys.executable, str(script), *map(str, args)], cwd=cwd,
            env=_child_env(), capture_output=True, text=True, timeout=timeout,
        )
    return run
