"""Runs the example scripts end to end in their --smoke mode."""

import os
import pathlib
import subprocess
import sys

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data", ["auto", "synthetic"])
def test_mnist_smoke(tmp_path, data):
    env = dict(os.environ)
    # Importable from the checkout even when the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_REPO), env.get("PYTHONPATH")) if p
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = subprocess.run(
        [sys.executable, str(_REPO / "examples" / "mnist.py"), "--smoke",
         f"--data={data}", f"--output_dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "== Results" in out
    for row in ("float (pretrained start)", "STE 1-bit dorefa",
                "MetaQuant multifc 1-bit dorefa",
                "MetaQuant TFLite weights mode", "MetaQuant TFLite int8 mode",
                "TFLite file"):
        assert row in out, out[-3000:]
    if data == "synthetic":
        assert "SYNTHETIC" in out
    for name in ("results.json", "mnist_metaquant.keras",
                 "mnist_metaquant_weights.tflite",
                 "mnist_metaquant_float.tflite"):
        assert (tmp_path / name).is_file(), name
