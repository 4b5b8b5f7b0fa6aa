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
    # Every configuration of the quick profile runs with 3 seeds.
    configs = {}
    for r in quick:
        key = tuple(sorted((k, v) for k, v in r.items() if k != "seed"))
        configs.setdefault(key, set()).add(r["seed"])
    assert all(seeds == {0, 1, 2} for seeds in configs.values())
    assert len(benchmark.profile_runs("quick", seeds=5)) == len(quick) * 5 // 3
    # The paper's setting: CIFAR ResNet20, 1-bit, lr 1e-3, 100 epochs, 5 seeds.
    assert all(r["task"] == "cifar10" and r["bits"] == 1 and r["lr"] == 1e-3 for r in full)
    assert {r["seed"] for r in full} == set(range(5))
    assert all(r["steps"] == 100 * r["eval_every"] for r in full)


@pytest.mark.usefixtures("mnist_available")
def test_smoke_profile(tmp_path, run_python):
    proc = run_python(ROOT / "examples" / "benchmark.py", "--profile=smoke",
                      f"--output_dir={tmp_path}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean last +- std" in proc.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    methods = {r["method"] for r in data["runs"]}
    assert methods == {"float", "ste", "multifc", "gain_mlp"}
    for r in data["runs"]:
        assert r["step_seconds"] > 0 and len(r["accuracy"]) == 2
    assert (tmp_path / "results.csv").exists()
    assert (tmp_path / "meta_function.png").exists()
    assert any(p.name.startswith("curves_") for p in tmp_path.iterdir())
