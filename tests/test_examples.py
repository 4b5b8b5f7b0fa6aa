"""Runs the example scripts end to end in their --smoke mode."""

import json
import pathlib
import re
import sys

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


# One seed on MNIST (when prepared), two on the synthetic digits: the
# per-seed columns and the mean +- std over seeds.
@pytest.mark.parametrize("data,seeds", [("auto", 1), ("synthetic", 2)])
def test_mnist_smoke(tmp_path, data, seeds, run_python):
    result = run_python(_REPO / "examples" / "mnist.py", "--smoke",
                        f"--data={data}", f"--seeds={seeds}",
                        f"--output_dir={tmp_path}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "== Results" in out
    header = "run" + "".join(rf"\s+seed {s}" for s in range(seeds))
    assert re.search(header + r"\s+mean \+- std\s+train s", out), out[-3000:]
    accuracy = r"\s+(\d\.\d{4})"
    for row in ("float (pretrained start)", "STE 1-bit dorefa",
                "MetaQuant multifc 1-bit dorefa",
                "MetaQuant TFLite weights mode", "MetaQuant TFLite int8 mode"):
        # The row's per-seed accuracies, then their mean +- sample std.
        match = re.search(re.escape(row) + accuracy * seeds
                          + r"\s+(\d\.\d{4}) \+- (\d\.\d{4})", out)
        assert match, (row, out[-3000:])
        values = [float(v) for v in match.groups()]
        per_seed, mean, std = values[:seeds], values[-2], values[-1]
        assert abs(mean - sum(per_seed) / seeds) <= 1.5e-4, (row, values)
        assert (std > 0) == (len(set(per_seed)) > 1), (row, values)
    assert f"(mean +- sample std over {seeds} seed(s)" in out
    assert "TFLite file" in out
    if data == "synthetic":
        assert "SYNTHETIC" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == list(range(seeds))
    assert [r["seed"] for r in results["per_seed"]] == list(range(seeds))
    assert len(results["accuracy"]["STE 1-bit dorefa"]["per_seed"]) == seeds
    for seed in range(seeds):
        for name in (f"mnist_metaquant_seed{seed}.keras",
                     f"mnist_metaquant_seed{seed}_weights.tflite",
                     f"mnist_metaquant_seed{seed}_float.tflite",
                     f"mnist_metaquant_seed{seed}_int8.tflite"):
            assert (tmp_path / name).is_file(), name


@pytest.mark.usefixtures("mnist_available")
def test_full_integer_smoke(tmp_path, run_python):
    out_json = tmp_path / "fi.json"
    result = run_python(_REPO / "examples" / "full_integer.py", "--model=mnist", "--seeds=1",
                        "--steps=20", "--test_limit=300", f"--output_json={out_json}",
                        cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = json.loads(out_json.read_text())
    assert run["top1_agreement"] >= 0.99 and run["step_ratio"] > 0
    assert "top1_agreement" in result.stdout and "+-" in result.stdout


def test_full_integer_tfmot_names_what_it_covers(tmp_path, run_python):
    result = run_python(_REPO / "examples" / "full_integer.py", "--model=mobilenetv2",
                        "--tfmot", cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "--tfmot covers --model=mnist and resnet20" in result.stdout + result.stderr


@pytest.mark.usefixtures("mnist_available")
def test_full_integer_tfmot_smoke(tmp_path, run_python):
    sys.path.insert(0, str(_REPO / "examples"))
    import tfmot_runner

    if not tfmot_runner.tfmot_available():
        pytest.skip("no usable .venv-tfmot (run examples/tfmot_setup.sh)")
    out_json = tmp_path / "fi.json"
    result = run_python(_REPO / "examples" / "full_integer.py", "--model=mnist", "--seeds=1",
                        "--steps=10", "--test_limit=200", "--tfmot",
                        f"--output_json={out_json}", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = json.loads(out_json.read_text())
    assert run["tfmot_top1_agreement"] > 0.9 and run["tfmot_tflite_bytes"] > 0


@pytest.mark.usefixtures("mnist_available")
def test_peer_files_smoke(tmp_path, run_python):
    out_json = tmp_path / "peer.json"
    result = run_python(_REPO / "examples" / "peer_files.py", "--steps=6", "--runs=4",
                        "--blocks=1", "--test_limit=200", "--pretrain_steps=4",
                        f"--output_json={out_json}", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["file"]: r for r in json.loads(out_json.read_text())}
    for name in ("ours w8a8", "ours w4a8", "ours w2a8"):
        assert rows[name]["size_ratio"] < 0.35 and rows[name]["median_us"] > 0
        assert rows[name]["top1_agreement"] >= 0.95
    assert rows["float"]["latency_ratio"] == 1.0
