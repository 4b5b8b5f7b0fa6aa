"""Runs the example scripts end to end in their --smoke mode."""

import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data", ["auto", "synthetic"])
def test_mnist_smoke(tmp_path, data, run_python):
    result = run_python(_REPO / "examples" / "mnist.py", "--smoke",
                        f"--data={data}", f"--output_dir={tmp_path}",
                        cwd=tmp_path, timeout=600)
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
