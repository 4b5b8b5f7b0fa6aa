"""Tests of the TFMOT peer baseline: examples/tfmot_peer.py and tfmot_runner.py.

The smoke runs need `<repo>/.venv-tfmot` (examples/tfmot_setup.sh; CI does not
build it: it takes minutes and ~2.5 GB) and prepared MNIST; they are skipped
otherwise. The format tests run everywhere.
"""

import ast
import concurrent.futures
import json
import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import tfmot_runner  # noqa: E402

PRETRAINED_JSON = ROOT.parent / "shared" / "pretrained" / "resnet20_cifar10_fp.json"


def _mnist_make_model():
    """examples/mnist.py's `make_model`, built without importing the script
    (importing it would define its absl flags in this process)."""
    source = (ROOT / "examples" / "mnist.py").read_text()
    fn = next(node for node in ast.parse(source).body
              if isinstance(node, ast.FunctionDef) and node.name == "make_model")
    namespace = {"keras": keras}
    exec(compile(ast.Module([fn], []), "mnist.py", "exec"), namespace)
    return namespace["make_model"]()


# ------------------------------------------------------- without the TFMOT venv

def test_save_init_weights_format(tmp_path):
    model = _mnist_make_model()
    path = tmp_path / "init.npz"
    names = tfmot_runner.save_init_weights(model, path)
    assert names == ["bn1", "bn2", "bn_logits", "conv1", "conv2", "logits"]
    with np.load(path) as z:
        assert str(z["__format__"]) == tfmot_runner.INIT_WEIGHTS_FORMAT
        for layer in model.layers:
            for i, w in enumerate(layer.get_weights()):
                np.testing.assert_array_equal(z[f"{layer.name}/{i}"], w)
        assert len(z.files) == 1 + sum(len(l.get_weights()) for l in model.layers)


def test_resnet20_conversion_names_match_json(tmp_path):
    npz = PRETRAINED_JSON.with_suffix(".npz")
    if not npz.exists() or not PRETRAINED_JSON.exists():
        pytest.skip("../shared/pretrained ResNet20 is not present")
    names = tfmot_runner.resnet20_init_weights_from_pytorch(npz, tmp_path / "r.npz")
    spec = json.loads(PRETRAINED_JSON.read_text())
    assert names == sorted({k["keras_layer"] for k in spec["keys"]})
    with np.load(tmp_path / "r.npz") as z:
        assert z["conv1/0"].shape == (3, 3, 3, 16)  # HWIO
        assert z["fc/0"].shape == (64, 10)
        assert z["layer2_0_downsample_0/0"].shape == (1, 1, 16, 32)
        assert len([k for k in z.files if not k.startswith("__")]) == 107


def test_flags_and_missing_venv(tmp_path):
    assert tfmot_runner._flags(dict(scheme="nbit", num_bits=4, smoke=True,
                                    eval_initial=False, init_weights=None)) == [
        "--scheme=nbit", "--num_bits=4", "--smoke"]
    assert not tfmot_runner.tfmot_available(venv=tmp_path / "none")
    with pytest.raises(tfmot_runner.TFMOTError, match="tfmot_setup.sh"):
        tfmot_runner.run_tfmot(venv=tmp_path / "none", smoke=True)


# ---------------------------------------------------------- with the TFMOT venv

@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Both smoke runs, in parallel (two child processes): default8 from
    TFMOT's own initialisation, nbit 4 from our Keras 3 model's weights."""
    if not tfmot_runner.tfmot_available():
        pytest.skip("no usable .venv-tfmot (run examples/tfmot_setup.sh)")
    env = tfmot_runner.child_env()
    if not (pathlib.Path(env.get("TFDS_DATA_DIR", "/nonexistent")) / "mnist").is_dir():
        pytest.skip("prepared MNIST (TFDS_DATA_DIR) is not present")
    tmp = tmp_path_factory.mktemp("tfmot")
    keras.utils.set_random_seed(7)
    model = _mnist_make_model()
    tfmot_runner.save_init_weights(model, tmp / "init.npz")
    common = dict(model="small_cnn", dataset="mnist", smoke=True, verbose=0,
                  timeout=300)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        default8 = pool.submit(tfmot_runner.run_tfmot, scheme="default8", **common)
        nbit4 = pool.submit(
            tfmot_runner.run_tfmot, scheme="nbit", num_bits=4,
            init_weights=tmp / "init.npz", dump_float_outputs=tmp / "float.npz",
            **common)
        runs = {"default8": default8.result(), "nbit4": nbit4.result()}
    return runs, model, tmp


def _check_result(r, scheme, bits):
    assert r["scheme"] == scheme
    assert r["bits"] == r["weight_bits"] == bits
    assert r["activation_bits"] == 8 and r["quantizes_activations"] is True
    assert r["model"] == "small_cnn" and r["dataset"] == "mnist"
    assert r["train_examples"] == 64 and r["test_examples"] == 64
    assert len(r["test_accuracy_per_epoch"]) == 1
    assert 0.0 <= r["final_accuracy"] <= 1.0
    assert r["final_accuracy"] == r["test_accuracy_per_epoch"][-1]
    assert r["steps"] == 4 and r["timed_steps"] >= 1
    assert 0.0 < r["median_step_s"] < 60.0
    v = r["versions"]
    assert v["tensorflow"] == tf.__version__  # the same TF as ours
    assert v["keras_impl"].startswith("tf_keras")
    assert v["tensorflow-model-optimization"].startswith("0.8")
    wrapped = {q["layer"] for q in r["quantization"]}
    assert {"conv1", "conv2", "logits", "quantize_layer"} <= wrapped


def test_default8_smoke(smoke_runs):
    _check_result(smoke_runs[0]["default8"], "default8", 8)


def test_nbit4_smoke_from_our_weights(smoke_runs):
    runs, model, tmp = smoke_runs
    _check_result(runs["nbit4"], "nbit", 4)
    # The tf_keras model with our weights computes what our Keras 3 model does.
    with np.load(tmp / "float.npz") as z:
        ours = model.predict(z["x"], verbose=0)
        np.testing.assert_allclose(z["logits"], ours, rtol=1e-4, atol=1e-4)
