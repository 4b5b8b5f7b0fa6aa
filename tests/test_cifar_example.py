"""Runs examples/cifar10_resnet20.py end to end in its --smoke mode."""

import json
import os
import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


def test_cifar10_resnet20_smoke(tmp_path, run_python):
    data = os.environ.get("TFDS_DATA_DIR")
    if not data or not (pathlib.Path(data) / "cifar10").is_dir():
        pytest.skip("prepared CIFAR-10 (TFDS_DATA_DIR) is not present")
    result = run_python(_REPO / "examples" / "cifar10_resnet20.py", "--smoke",
                        f"--output_dir={tmp_path}", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for line in ("float test accuracy:",
                 "quantized start (before training) test accuracy:",
                 "MetaQuant multifc epoch   1/1:",
                 "== Storage of the quantized model",
                 "23.60x smaller",  # 22 1-bit layers, BN float (mq_keras.summary)
                 "== Results",
                 "MetaQuant multifc 1-bit dorefa: final (epoch 1)",
                 "MetaQuant multifc 1-bit dorefa: mean of last 1 epochs",
                 "MetaQuant multifc TFLite weights mode (64 images)",
                 "top-1 agreement with Keras"):
        assert line in out, (line, out[-3000:])
    if "pretrained weights" in out:  # the shared npz was found
        assert "float ResNet20 (pretrained (resnet20_cifar10_fp.npz))" in out

    history = json.loads((tmp_path / "history.json").read_text())
    assert history["quantized_layers"] == 22
    assert len(history["history"]) == 1
    assert history["config"]["steps_per_epoch"] == 2
    assert history["mean_last_epochs"]["epochs"] == 1
    assert history["tflite"]["top1_agreement"] == 1.0
    assert history["tflite"]["flex_ops"] == []
    assert (tmp_path / "resnet20_metaquant_weights.tflite").is_file()
    assert (tmp_path / "resnet20_metaquant.keras").is_file()
