"""The accuracy benchmark: its smoke profile runs end to end; profiles are well formed."""

import json
import pathlib
import sys

import numpy as np
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


def test_strong_profile_gives_every_method_the_same_sweep():
    import benchmark
    import sweep

    strong = benchmark.profile_runs("strong")
    assert {r["task"] for r in strong} == {"mnist", "cifar10"}
    assert {r["optimizer"] for r in strong} == {"sgd", "sgdm", "adam"}
    grids = {}
    for r in strong:
        key = (r["task"], r["quantizer"], r["bits"])
        grids.setdefault(key, {}).setdefault(r["method"], set()).add(
            (r["optimizer"], r["lr"], r["seed"]))
    for (task, q, bits), by_method in grids.items():
        assert set(by_method) == set(sweep.methods_for(q, bits))
        assert "ste" in by_method and len(by_method) >= 4
        first = next(iter(by_method.values()))
        assert len(first) == 3 * 3 * 3  # 3 optimizers x 3 lrs x 3 seeds
        assert all(grid == first for grid in by_method.values())  # the same sweep
    assert ("dorefa", 1) in {(q, b) for _, q, b in grids}
    assert all("approx_sign" in m for (_, _, b), m in grids.items() if b == 1)


def test_medium_profile_gives_every_method_the_same_sweep():
    import benchmark
    import sweep

    medium = benchmark.profile_runs("medium")
    grids = {}
    for r in medium:
        assert r["quantizer"] == "dorefa"
        grids.setdefault((r["task"], r["bits"]), {}).setdefault(r["method"], set()).add(
            (r["optimizer"], r["lr"], r["seed"]))
    assert set(grids) == {("mnist", 1), ("mnist", 2), ("cifar10", 1), ("cifar10", 2),
                          ("cifar10", 4)}
    assert set(grids["mnist", 1]) == set(sweep.MEDIUM_METHODS)
    assert set(grids["mnist", 2]) == set(sweep.MEDIUM_METHODS) - {"approx_sign"}
    for bits in (1, 2, 4):
        assert set(grids["cifar10", bits]) == set(sweep.MEDIUM_CIFAR_METHODS[bits])
        assert {"ste", "meta_ewgs_prior"} <= set(grids["cifar10", bits])
    for m in ("meta_ewgs_lr0", "meta_ewgs_prior_lr0"):
        assert {r["meta_lr"] for r in medium if r["method"] == m} == {0.0}
    sizes = {"mnist": (4 + 3) * 3, "cifar10": 3 * 3}  # lrs x 3 seeds
    for (task, _), by_method in grids.items():
        first = next(iter(by_method.values()))
        assert len(first) == sizes[task]
        assert all(grid == first for grid in by_method.values())


def test_meta_ewgs_prior_starts_at_ewgs_delta_in_level_units():
    import sweep

    assert sweep.meta_ewgs_options("meta_ewgs", "dorefa", 1) == {}
    one = sweep.meta_ewgs_options("meta_ewgs_prior", "dorefa", 1)
    two = sweep.meta_ewgs_options("meta_ewgs_prior_lr0", "dorefa", 2)
    assert one == {"delta_init": sweep.EWGS_DELTA["dorefa"], "delta_range": "nonnegative"}
    assert two["delta_init"] == pytest.approx(sweep.EWGS_DELTA["dorefa"] / 3)


def test_peer_profile_is_like_for_like_with_tfmot():
    import benchmark

    peer = benchmark.profile_runs("peer")
    # TFMOT's schemes: symmetric per-channel weights at 8/4/2 bits, 8-bit activations.
    assert {(r["quantizer"], r["bits"], r["activation_bits"]) for r in peer} == {
        ("uniform", 8, 8), ("uniform", 4, 8), ("uniform", 2, 8)}
    assert {r["seed"] for r in peer} == {0, 1, 2} and {r["method"] for r in peer} >= {"ste"}
    assert benchmark._group_key(peer[0])[5] == "ste a8"
    # LSQ's activations get rows of their own, beside the same runs with EMA ranges.
    lsq = [r for r in peer if r.get("activation_quantizer") == "lsq"]
    assert {(r["method"], r["bits"], r["seed"]) for r in lsq} == {
        ("ste", b, s) for b in (8, 4, 2) for s in range(3)}
    assert benchmark._group_key(lsq[0])[5] == "ste a8 lsq"
    assert benchmark._spec_key(lsq[0]) != benchmark._spec_key(
        {**lsq[0], "activation_quantizer": None})


def test_best_of_sweep_picks_each_methods_best_configuration():
    import sweep

    def row(method, opt, lr, mean, std):
        return dict(task="mnist", quantizer="dorefa", bits=1, method=method, optimizer=opt,
                    lr=lr, mean_last=mean, std_seeds=std)

    rows = [row("ste", "sgd", 0.05, 90.0, 1.0), row("ste", "adam", 1e-3, 95.0, 2.0),
            row("ste", "sgd", 0.25, 95.0, 0.5), row("ewgs", "sgd", 0.05, 93.0, 0.1)]
    best = {r["method"]: r for r in sweep.best_of_sweep(rows)}
    assert (best["ste"]["optimizer"], best["ste"]["lr"], best["ste"]["sweep"]) == ("sgd", 0.25, 3)
    assert best["ewgs"]["mean_last"] == 93.0 and best["ewgs"]["sweep"] == 1
    # The curves follow each method's best configuration, averaged over seeds.
    runs = [dict(task="mnist", quantizer="dorefa", bits=1, method="ste", optimizer="sgd",
                 lr=0.25, seed=s, accuracy=[0.5 + 0.1 * s, 0.9], eval_every=50)
            for s in range(3)]
    runs.append(dict(runs[0], lr=0.05, accuracy=[0.1, 0.1]))
    steps, mean, std, label = sweep.best_curves(runs, rows)[("mnist", "dorefa", 1)]["ste"]
    assert steps == [50, 100] and label == "ste sgd lr=0.25"
    np.testing.assert_allclose(mean, [60.0, 90.0])
    np.testing.assert_allclose(std, [10.0, 0.0], atol=1e-9)


@pytest.mark.usefixtures("mnist_available")
def test_smoke_profile(tmp_path, run_python):
    proc = run_python(ROOT / "examples" / "benchmark.py", "--profile=smoke",
                      f"--output_dir={tmp_path}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean last +- std" in proc.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    methods = {r["method"] for r in data["runs"]}
    assert methods == {"float", "ste", "multifc", "gain_mlp", "ewgs", "ewgs_hessian",
                       "approx_sign"}
    for r in data["runs"]:
        assert r["step_seconds"] > 0 and len(r["accuracy"]) == 2
    assert (tmp_path / "results.csv").exists()
    assert (tmp_path / "meta_function.png").exists()
    assert any(p.name.startswith("curves_") for p in tmp_path.iterdir())
    # Two invocations' results pool into one report (--merge); a clash refuses.
    runs = data["runs"]
    for i, part in enumerate((runs[:3], runs[2:])):
        (tmp_path / f"part{i}").mkdir()
        (tmp_path / f"part{i}" / "results.json").write_text(
            json.dumps({"profile": "smoke", "runs": part}))
    merged = tmp_path / "merged"
    proc = run_python(ROOT / "examples" / "benchmark.py", "--profile=smoke",
                      f"--merge={tmp_path / 'part0'},{tmp_path / 'part1' / 'results.json'}",
                      f"--output_dir={merged}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pooled = json.loads((merged / "results.json").read_text())
    assert sorted(map(json.dumps, pooled["runs"])) == sorted(map(json.dumps, runs))
    assert pooled["summary"] == data["summary"]


def test_merge_refuses_clashing_runs_and_other_profiles(tmp_path):
    import benchmark

    run = dict(task="mnist", quantizer="dorefa", bits=1, optimizer="sgd", lr=0.05,
               method="ste", semantics="code", seed=0, steps=4, accuracy=[0.5, 0.6])
    for name, profile, r in (("a", "smoke", run), ("b", "smoke", dict(run, accuracy=[0.5, 0.7])),
                             ("c", "quick", run)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"profile": profile, "runs": [r]}))
    assert benchmark.merge([tmp_path / "a.json", tmp_path / "a.json"], "smoke") == [run]
    with pytest.raises(ValueError, match="differs from the same run"):
        benchmark.merge([tmp_path / "a.json", tmp_path / "b.json"], "smoke")
    with pytest.raises(ValueError, match="profile=quick runs, not smoke"):
        benchmark.merge([tmp_path / "c.json"], "smoke")
