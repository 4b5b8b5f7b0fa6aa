"""The accuracy benchmark: its smoke profile runs end to end; profiles are well formed."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def test_profiles_are_well_formed():
    import benchmark

    quick = benchmark.profile_runs("quick")
    full = benchmark.profile_runs("full")
    methods = {r["method"] for r in quick}
    assert {"float", "ste", "fc_grad", "multifc", "lstmfc", "gain_mlp"} <= methods
    assert {r["quantizer"] for r in quick} == {"dorefa", "bwn"}
    assert {r["bits"] for r in quick} == {1, 2, 4}
    assert {r["optimizer"] for r in quick} == {"sgd", "adam"}
    assert any(r["semantics"] == "paper" for r in quick)
    # The paper's setting: CIFAR ResNet20, 1-bit, lr 1e-3, 100 epochs, 5 seeds.
    assert all(r["task"] == "cifar10" and r["bits"] == 1 and r["lr"] == 1e-3 for r in full)
    assert {r["seed"] for r in full} == set(range(5))
    assert all(r["steps"] == 100 * r["eval_every"] for r in full)


@pytest.mark.usefixtures("mnist_available")
def test_smoke_profile(tmp_path, run_python):
    proc = run_python(ROOT / "examples" / "benchmark.py", "--profile=smoke",
                      f"--output_dir={tmp_path}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean last (var)" in proc.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    methods = {r["method"] for r in data["runs"]}
    assert methods == {"float", "ste", "multifc", "gain_mlp"}
    for r in data["runs"]:
        assert r["step_seconds"] > 0 and len(r["accuracy"]) == 2
    assert (tmp_path / "results.csv").exists()
    assert (tmp_path / "meta_function.png").exists()
    assert any(p.name.startswith("curves_") for p in tmp_path.iterdir())
