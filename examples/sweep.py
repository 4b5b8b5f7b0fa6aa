"""The `strong` benchmark profile: every estimator under one learning-rate sweep.

A user tunes the learning rate of whatever estimator they use, so a fair
comparison gives every method the same small sweep over SGD, SGD with
momentum 0.9 and Adam, and reports each method's best-of-sweep
configuration (issue 12's protocol). A meta network cannot win by being a
learning-rate multiplier in disguise: the STE gets the same grid, whose SGD
learning rates span 25x (the linear meta networks' learned gain was ~20x).
"""

# Hand-designed estimators, trained with Keras' own step ("ewgs_hessian":
# EWGS with each layer's delta from the paper's Hessian rule).
HAND_METHODS = ("ewgs", "ewgs_hessian", "approx_sign")
META_METHODS = ("multifc", "fc_grad", "lstmfc", "gain_mlp", "meta_ewgs")
SWEEP = {"sgd": (0.01, 0.05, 0.25), "sgdm": (0.002, 0.01, 0.05), "adam": (3e-4, 1e-3, 3e-3)}
CIFAR_SWEEP = {"sgd": (1e-3, 5e-3, 2.5e-2), "sgdm": (1e-3, 5e-3, 2.5e-2),
               "adam": (3e-4, 1e-3, 3e-3)}
EWGS_DELTA = {"dorefa": 0.2, "uniform": 0.2}  # fixed-delta variant


def methods_for(quantizer, bits):
    """The estimators that apply to a quantizer (MultiFC pairs with DoReFa only)."""
    out = ["ste"]
    if quantizer in EWGS_DELTA:
        out += ["ewgs", "ewgs_hessian"]
    if bits == 1:
        out.append("approx_sign")
    out += [m for m in META_METHODS if m != "multifc" or quantizer == "dorefa"]
    return out


def strong_runs(make_run, *, seeds=3, cifar_steps=1200, mnist_budget, cifar_budget):
    """All run specs; `make_run(task, method, **kw)` builds one."""
    runs = []
    workloads = [("mnist", q, k, SWEEP, mnist_budget)
                 for q, k in (("dorefa", 1), ("dorefa", 2), ("dorefa", 4), ("bwn", 1))]
    workloads += [("cifar10", q, k, CIFAR_SWEEP, dict(cifar_budget, steps=cifar_steps))
                  for q, k in (("dorefa", 1), ("dorefa", 2), ("dorefa", 4), ("bwn", 1))]
    for seed in range(seeds):
        for task, q, bits, sweep, budget in workloads:
            for method in methods_for(q, bits):
                for opt, lrs in sweep.items():
                    for lr in lrs:
                        runs.append(make_run(task, method, quantizer=q, bits=bits,
                                             optimizer=opt, lr=lr, seed=seed, **budget))
    return runs


def best_of_sweep(rows):
    """Per (task, quantizer, bits, method): the row with the best mean over seeds.

    `rows` are `summarize` rows (one per configuration, seeds pooled). Ties go
    to the smaller std. Returns them sorted, each with `sweep` (how many
    configurations were tried).
    """
    groups = {}
    for r in rows:
        key = (r["task"], r["quantizer"], r["bits"], r["method"])
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in sorted(groups.items()):
        best = max(rs, key=lambda r: (r["mean_last"], -r["std_seeds"]))
        out.append(dict(best, sweep=len(rs)))
    return out


def print_best(rows):
    print("\nBest of sweep (per method: the optimizer and lr with the best mean over seeds)")
    head = (f"{'task':<8}{'quant':<8}{'bits':>4} {'method':<14}{'opt':<6}{'lr':>8}"
            f"{'mean last +- std':>19}{'best':>7}{'x STE':>7}  per seed")
    print(head)
    print("-" * len(head))
    for r in best_of_sweep(rows):
        print(f"{r['task']:<8}{r['quantizer']:<8}{r['bits']:>4} {r['method']:<14}"
              f"{r['optimizer']:<6}{r['lr']:>8g}{r['mean_last']:>11.2f} +- {r['std_seeds']:4.2f}"
              f"{r['best']:>7.2f}{r['x_ste']:>7.2f}  {r['per_seed']}")

