"""Smoke test of examples/benchmark_tflite.py: runs it tiny, end to end."""

import ast
import json
import pathlib

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "benchmark_tflite.py"
MODES = ("float", "weights", "weights_int4", "int8")


def _mnist_example_architecture():
    """Layers of examples/mnist.py `make_model`, built without importing the
    script (importing it would define its absl flags in this process)."""
    source = (ROOT / "examples" / "mnist.py").read_text()
    fn = next(node for node in ast.parse(source).body
              if isinstance(node, ast.FunctionDef) and node.name == "make_model")
    namespace = {"keras": keras}
    exec(compile(ast.Module([fn], []), "mnist.py", "exec"), namespace)
    model = namespace["make_model"]()
    return [[type(l).__name__, list(l.output.shape[1:])] for l in model.layers]


# "auto" reads the prepared MNIST when there is one; "random" is the path
# taken without it.
@pytest.mark.parametrize("data", ["auto", "random"])
def test_benchmark_tflite_smoke(tmp_path, data, run_python):
    out = tmp_path / "tflite.json"
    proc = run_python(SCRIPT, "--smoke", f"--data={data}", f"--output_json={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("top-1 agr"):]
    for mode in MODES:
        assert f"\n{mode} " in table, (mode, proc.stdout)

    report = json.loads(out.read_text())
    cfg = report["config"]
    assert (cfg["runs"], cfg["eval_samples"], cfg["train_steps"]) == (5, 20, 0)
    assert cfg["batch_size"] == 1 and cfg["num_threads"] == 1
    assert cfg["architecture"] == _mnist_example_architecture()
    if data == "random":
        assert cfg["random_data"]
    if cfg["random_data"]:
        assert "RANDOM" in proc.stdout
    results = report["results"]
    assert set(results) == set(MODES)
    for mode in MODES:
        r = results[mode]
        assert r["bytes"] > 0, (mode, r)
        assert r["interpreters"], (mode, r)
        for name, t in r["interpreters"].items():
            assert t["median_us"] > 0 and t["p90_us"] >= t["median_us"], (mode, name)
            assert len(t["wall_us"]) == 5 and all(v > 0 for v in t["wall_us"])
            assert 0.0 <= t["top1_agreement"] <= 1.0
            assert t["max_abs_diff"] >= 0.0
    assert results["weights"]["bytes"] < results["float"]["bytes"]
    assert results["float"]["size_ratio_to_float"] == 1.0
    # 1-bit DoReFa: the default file stores every kernel as int8 codes, the
    # weight_dtype="int4" file as int4 codes.
    assert results["weights"]["const_tensor_types"].get("INT8") == 3
    assert "INT4" not in results["weights"]["const_tensor_types"]
    assert results["weights_int4"]["const_tensor_types"].get("INT4") == 3
    assert results["weights_int4"]["bytes"] < results["weights"]["bytes"]
    for mode in ("weights", "weights_int4"):
        assert "DEQUANTIZE" in results[mode]["ops"]
    assert cfg["blocks"] == 1 and cfg["files"]["weights_int4"]["weight_dtype"] == "int4"
    # The float file computes what Keras computes (to float rounding; a
    # near-tie of an untrained model's logits may flip one of 20).
    for t in results["float"]["interpreters"].values():
        assert t["top1_agreement"] >= 0.9


def test_benchmark_tflite_enforces_min_runs(run_python):
    proc = run_python(SCRIPT, "--runs=10")
    assert proc.returncode != 0
    assert "--runs must be >= 50" in proc.stdout + proc.stderr


def test_benchmark_tflite_checks_blocks(run_python):
    proc = run_python(SCRIPT, "--runs=50", "--blocks=51")
    assert proc.returncode != 0
    assert "--blocks must be between 1 and --runs (50); got 51" in proc.stdout + proc.stderr
