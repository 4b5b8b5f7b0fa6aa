r"""MetaQuant vs STE vs float (vs TFMOT): accuracy, cost and plots, in one command.

Profiles:
    smoke   a few steps of MNIST, in-process (the test suite runs it).
    quick   ~15-20 minutes on 2 CPU cores: CIFAR-10 ResNet20 from the paper's
            full-precision weights, 1-bit DoReFa on every layer, short runs of
            STE (paper lr and a 5x lr control), STE+Adam and the meta networks;
            plus MNIST (small CNN from a 1-epoch float start) with DoReFa 1/2/4
            bits and BWN, SGD and Adam; every configuration with `--seeds`
            seeds (default 3); plus TFMOT's QAT when its
            venv exists (examples/tfmot_setup.sh).
    strong  issue 12's fair protocol: every estimator (STE, EWGS with a fixed
            and a Hessian-rule delta, ApproxSign at 1 bit, the meta networks)
            under one sweep of SGD, SGD+momentum and Adam learning rates,
            `--seeds` seeds, MNIST and CIFAR-10 ResNet20 (`--cifar_steps`) at
            DoReFa 1/2/4 bits and BWN; prints each method's best of sweep
            (examples/sweep.py). Hours on 2 cores: a GPU job, or `--tasks`.
    medium  the strong protocol cut to what 2 CPU cores run in a few hours:
            MNIST, DoReFa 1 and 2 bits (`--bits`), STE, EWGS, ApproxSign (1
            bit), MultiFC, MetaEWGS (from the STE, and from EWGS' delta kept
            >= 0: "meta_ewgs_prior") and their frozen controls, SGD+momentum
            at 4 and Adam at 3 learning rates; CIFAR-10 ResNet20 from the FP
            weights, DoReFa 1, 2 and 4 bits, 150 steps, STE and
            meta_ewgs_prior (EWGS too at 1 and 2 bits, the frozen control
            at 1) at Adam's 3 rates; `--seeds` seeds. `--merge` pools the results of several
            invocations (e.g. one per task, run side by side).
    full    the paper's Table 1 for a GPU: ResNet20, 100 epochs, lr x0.1 every
            30 epochs, DoReFa and BWN, SGD and Adam, STE / FC-Grad / MultiFC /
            LSTMFC / GainMLP, 5 seeds.

Each run trains in its own child process (so that its peak memory is its own)
and evaluates the test subset every `eval_every` steps (a "checkpoint"; an
epoch in the full profile). Reported per group of runs:

* per seed, the paper's metric (mean test accuracy over the last `last_k`
  checkpoints); its mean +- sample std over seeds and the per-seed values;
  the paper's pooled population variance in parentheses; the best accuracy;
* the median training-step time, as ratios to float and to STE measured in
  the same invocation (medians over steps, runs in sequence on one machine);
* peak RSS of the run's process.

Writes `results.json`, `results.csv`, `curves_*.png` (test accuracy and
training loss per checkpoint, STE vs MetaQuant: the paper's Fig. 3) and
`meta_function.png` (the learned m against its inputs at the end of training).

Example:
    python examples/benchmark.py --profile=quick --output_dir=/tmp/mq_bench
"""

import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import sweep  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("profile", "quick", ["smoke", "quick", "peer", "medium", "strong", "full"],
                  "Which runs.")
flags.DEFINE_integer("cifar_steps", 1200, "Training steps of each CIFAR-10 run in the "
                     "strong profile (391 = one epoch at batch 128).", lower_bound=1)
flags.DEFINE_string("output_dir", None, "Where results go (default: a new temp dir).")
flags.DEFINE_string("run_one", None, "Internal: run one JSON spec and print its result.")
flags.DEFINE_bool("tfmot", True, "Include TFMOT's QAT when .venv-tfmot exists.")
flags.DEFINE_list("tasks", None, "Run only these tasks (cifar10, mnist); default all.")
flags.DEFINE_list("bits", None, "Run only these weight bit widths (e.g. 1,2); default all.")
flags.DEFINE_list("activation_quantizers", None, "Run only the runs with quantized "
                  "activations of these kinds (ema, pact, lsq); default all runs.")
flags.DEFINE_list("methods", None, "Run only these methods (e.g. float,ste,multifc); default all.")
flags.DEFINE_list("merge", None, "Train nothing: pool the results.json files (or the "
                  "directories holding them) of earlier invocations of this --profile "
                  "and report them together in --output_dir.")
flags.DEFINE_integer("max_runs", 0, "Run only the first N runs (0: all), for trials.")
flags.DEFINE_integer("seeds", 3, "Seeds per configuration in the quick profile "
                     "(accuracy claims need at least 3).", lower_bound=1)

RESULT_TAG = "MQ_BENCH_RESULT "


# ----------------------------------------------------------------------------- profiles

def _run(task, method, *, quantizer="dorefa", bits=1, optimizer="sgd", lr, seed=0,
         semantics="code", **budget):
    return dict(task=task, method=method, quantizer=quantizer, bits=bits,
                optimizer=optimizer, lr=lr, seed=seed, semantics=semantics, **budget)


def profile_runs(profile, seeds=3):
    """The list of run specs of a profile (`seeds` per configuration in quick)."""
    runs = []
    if profile == "smoke":
        b = dict(steps=4, eval_every=2, batch_size=32, train_limit=256, test_limit=128,
                 last_k=2, pretrain_steps=4)
        for m in ("float", "ste", "multifc", "gain_mlp") + sweep.HAND_METHODS:
            runs.append(_run("mnist", m, lr=0.05, **b))
        return runs
    if profile == "peer":
        # Like for like with TFMOT's QAT (w8a8 default, w4a8 and w2a8 n-bit):
        # symmetric per-channel weights ("uniform", as TFMOT's) and 8-bit
        # activations with moving min/max ranges, as TFMOT's; and the STE
        # with LSQ's trained step on the activations instead.
        mn = dict(steps=300, eval_every=50, batch_size=64, train_limit=10000,
                  test_limit=5000, last_k=3, pretrain_steps=157)
        for seed in range(seeds):
            for bits in (8, 4, 2):
                for m in ("ste", "gain_mlp"):
                    runs.append(_run("mnist", m, quantizer="uniform", bits=bits, lr=0.05,
                                     seed=seed, activation_bits=8, **mn))
                runs.append(_run("mnist", "ste", quantizer="uniform", bits=bits, lr=0.05,
                                 seed=seed, activation_bits=8, activation_quantizer="lsq",
                                 **mn))
        return runs
    if profile == "medium":
        return sweep.medium_runs(
            _run, seeds=seeds,
            mnist_budget=dict(steps=300, eval_every=50, batch_size=64, train_limit=10000,
                              test_limit=5000, last_k=3, pretrain_steps=157),
            cifar_budget=dict(steps=150, eval_every=50, batch_size=128, train_limit=None,
                              test_limit=2000, last_k=2, pretrain_steps=0))
    if profile == "strong":
        return sweep.strong_runs(
            _run, seeds=seeds, cifar_steps=FLAGS.cifar_steps if FLAGS.is_parsed() else 1200,
            mnist_budget=dict(steps=300, eval_every=50, batch_size=64, train_limit=10000,
                              test_limit=5000, last_k=3, pretrain_steps=157),
            cifar_budget=dict(eval_every=100, batch_size=128, train_limit=None,
                              test_limit=1000, last_k=3, pretrain_steps=0))
    if profile == "quick":
        c = dict(steps=100, eval_every=25, batch_size=128, train_limit=None,
                 test_limit=1000, last_k=2, pretrain_steps=0)
        mn = dict(steps=300, eval_every=50, batch_size=64, train_limit=10000,
                  test_limit=5000, last_k=3, pretrain_steps=157)
        for seed in range(seeds):
            for m in ("float", "ste", "fc_grad", "multifc", "lstmfc", "gain_mlp"):
                runs.append(_run("cifar10", m, lr=1e-3, seed=seed, **c))
            runs.append(_run("cifar10", "ste", lr=5e-3, seed=seed, **c))  # tuned-lr control
            for m in ("ste", "multifc"):
                runs.append(_run("cifar10", m, optimizer="adam", lr=1e-3, seed=seed, **c))
        for seed in range(seeds):
            runs.append(_run("mnist", "float", lr=0.05, seed=seed, **mn))
            for opt, lr in (("sgd", 0.05), ("adam", 1e-3)):
                for m in ("ste", "multifc", "gain_mlp"):
                    runs.append(_run("mnist", m, optimizer=opt, lr=lr, seed=seed, **mn))
            runs.append(_run("mnist", "ste", lr=0.25, seed=seed, **mn))  # 5x lr control
            for m in ("fc_grad", "lstmfc"):
                runs.append(_run("mnist", m, lr=0.05, seed=seed, **mn))
            runs.append(_run("mnist", "multifc", lr=0.05, seed=seed, semantics="paper", **mn))
            for q, k in (("bwn", 1), ("dorefa", 2), ("dorefa", 4)):
                for opt, lr in (("sgd", 0.05), ("adam", 1e-3)):
                    for m in ("ste", "multifc", "gain_mlp"):
                        runs.append(_run("mnist", m, quantizer=q, bits=k, optimizer=opt,
                                         lr=lr, seed=seed, **mn))
        return runs
    # full: the paper's Table 1 (GPU scale).
    f = dict(steps=100 * 391, eval_every=391, batch_size=128, train_limit=None,
             test_limit=None, last_k=10, pretrain_steps=0, decay_every=30 * 391)
    for seed in range(5):
        for q in ("dorefa", "bwn"):
            for opt in ("sgd", "adam"):
                for m in ("ste", "fc_grad", "multifc", "lstmfc", "gain_mlp"):
                    if q == "bwn" and m == "multifc":
                        continue  # not in the paper's table
                    runs.append(_run("cifar10", m, quantizer=q, optimizer=opt, lr=1e-3,
                                     seed=seed, **f))
    return runs


# ----------------------------------------------------------------------------- one run

class _StepTimer:
    """Keras callback collecting per-batch wall times."""

    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times, self.loss = [], []

            def on_train_batch_begin(self, batch, logs=None):
                self._t = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                self.times.append(time.perf_counter() - self._t)

            def on_epoch_end(self, epoch, logs=None):
                self.loss.append(float(logs["loss"]))

        return Timer()


def _data(spec):
    import numpy as np
    import tensorflow as tf
    import zoo

    if spec["task"] == "mnist":
        xtr, ytr = zoo.mnist_arrays("train", spec["train_limit"])
        xte, yte = zoo.mnist_arrays("test", spec["test_limit"])
        train = (tf.data.Dataset.from_tensor_slices((xtr, ytr))
                 .shuffle(len(xtr), seed=spec["seed"]).repeat()
                 .batch(spec["batch_size"], drop_remainder=True))
        return train, (xte, yte), xtr
    train = zoo.cifar10("train", batch_size=spec["batch_size"], augment=True,
                        limit=spec["train_limit"], shuffle_seed=spec["seed"]).repeat()
    xte, yte = zoo.cifar10_arrays("test", spec["test_limit"])
    return train, (xte, yte), np.asarray(xte[:256])


def _float_model(spec, cache_dir):
    """The float starting point: the paper's FP ResNet20, or a float-trained CNN."""
    import keras
    import zoo

    if spec["task"] == "cifar10":
        model = zoo.resnet20()
        path = zoo.default_pretrained_path()
        if path is None:
            raise RuntimeError("the paper's FP ResNet20 weights (../shared/pretrained) are absent")
        zoo.load_pretrained_resnet20(model, path)
        return model
    keras.utils.set_random_seed(spec["seed"])
    model = zoo.small_cnn()
    path = os.path.join(cache_dir, f"mnist_float_seed{spec['seed']}.weights.h5")
    if os.path.exists(path):
        model.load_weights(path)
        return model
    train, _, _ = _data(spec)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(train, steps_per_epoch=spec["pretrain_steps"], epochs=1, verbose=0)
    model.save_weights(path)
    return model


def _meta_function(qmodel):
    """m / g on a grid of (g, w_tilde) values, per meta network (for the plot)."""
    import numpy as np
    from keras import ops

    meta = qmodel.meta_network
    slots = [s for _, s in qmodel._slots]
    g_all = np.concatenate([s.prev_grad.numpy().ravel() for s in slots])
    wt_all = np.concatenate([s.prev_w_tilde.numpy().ravel() for s in slots])
    rms = float(np.sqrt(np.mean(g_all**2))) or 1.0
    g = np.linspace(-3, 3, 41) * rms
    wt = np.quantile(wt_all, [0.05, 0.25, 0.5, 0.75, 0.95])
    gg, ww = np.meshgrid(g, wt)
    col = lambda a: ops.convert_to_tensor(a.reshape(-1, 1).astype("float32"))  # noqa: E731
    # The real kernels' rows go along, so networks that normalise per kernel
    # (GainMLP) see the statistics they were trained with.
    n = gg.size
    g_in = np.concatenate([gg.ravel(), g_all])
    w_in = np.concatenate([ww.ravel(), wt_all])
    state = meta.initial_state(len(g_in)) if meta.state_size else ()
    m, _ = meta.call(col(g_in), col(w_in), state,
                     segment_ids=ops.convert_to_tensor(np.zeros(len(g_in), "int32")),
                     num_segments=1)
    m = np.asarray(m).ravel()[:n].reshape(gg.shape)
    return {"g": g.tolist(), "w_tilde": wt.tolist(), "m": m.tolist(), "g_rms": rms}


def _quantized(spec, model, train, loss):
    """The quantized model of a run: STE, a hand-designed rule or a meta network."""
    import mq_keras

    method = spec["method"]
    act = spec.get("activation_bits")
    common = dict(kernel_quantizer=spec["quantizer"], num_bits=spec["bits"],
                  semantics=spec["semantics"], verbose=False,
                  activation_quantizer=spec.get("activation_quantizer", "ema") if act else None,
                  activation_bits=act)
    if method == "ste":
        return mq_keras.quantize_model(model, estimator="ste", **common)
    if method in sweep.HAND_METHODS:
        rule = "approx_sign" if method == "approx_sign" else "ewgs"
        options = {"delta": sweep.EWGS_DELTA[spec["quantizer"]]} if method == "ewgs" else None
        net = mq_keras.quantize_model(model, estimator=rule, quantizer_options=options, **common)
        if method != "ewgs_hessian":
            return net
        # The paper's rule on the first training batch, then one delta per layer.
        x, y = next(iter(train))
        deltas = mq_keras.ewgs.hessian_deltas(net, x, y, loss=loss)
        per_layer = {
            w.layer.name: mq_keras.quantizers.get(spec["quantizer"], num_bits=spec["bits"],
                                                  gradient="ewgs", delta=deltas[(w.name, "kernel")])
            for w in net.wrappers}
        return mq_keras.quantize_model(model, estimator="ewgs", layer_quantizers=per_layer, **common)
    options = {"seed": spec["seed"]}
    if method.startswith("meta_ewgs"):
        # The "_lr0" controls are the same network with a meta lr of 0: they
        # keep their start (the STE, or EWGS for "_prior").
        options.update(sweep.meta_ewgs_options(method, spec["quantizer"], spec["bits"]))
        method = "meta_ewgs"
    return mq_keras.quantize_model(model, meta_network=method, estimator="metaquant",
                                   meta_network_options=options, **common)


def run_one(spec, cache_dir):
    """Trains one configuration; returns its result dict."""
    import keras
    import numpy as np
    import zoo
    import mq_keras

    keras.utils.set_random_seed(spec["seed"])
    train, (xte, yte), calib = _data(spec)
    model = _float_model(spec, cache_dir)
    keras.utils.set_random_seed(spec["seed"])
    steps_per_epoch = spec["steps"] // max(spec["steps"] // spec["eval_every"], 1)
    lr = spec["lr"]
    if spec.get("decay_every"):
        lr = zoo.step_decay(lr, spec["decay_every"], every_epochs=1)
    momentum = 0.9 if spec["optimizer"] == "sgdm" else 0.0
    opt = zoo.make_optimizer("sgd" if momentum else spec["optimizer"], lr, momentum=momentum)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if spec["method"] == "float":
        net = model
        net.compile(optimizer=opt, loss=loss, metrics=["accuracy"])
    else:
        net = _quantized(spec, model, train, loss)
        meta = net.meta_network is not None
        meta_lr = spec.get("meta_lr", 1e-3)  # the reference's meta Adam rate
        net.compile(optimizer=opt, meta_optimizer=mq_keras.PaperAdam(meta_lr) if meta else None,
                    loss=loss, metrics=["accuracy"])
    start_acc = float(net.evaluate(xte, yte, batch_size=500, verbose=0, return_dict=True)["accuracy"])
    timer = _StepTimer()
    t0 = time.perf_counter()
    hist = net.fit(train, steps_per_epoch=steps_per_epoch,
                   epochs=spec["steps"] // steps_per_epoch,
                   validation_data=(xte, yte), validation_batch_size=500,
                   callbacks=[timer], verbose=0)
    seconds = time.perf_counter() - t0
    acc = [float(a) for a in hist.history["val_accuracy"]]
    skip = min(3, len(timer.times) - 1)
    result = dict(spec, start_accuracy=start_acc, accuracy=acc,
                  train_loss=[float(v) for v in hist.history["loss"]],
                  final_accuracy=acc[-1], best_accuracy=max(acc),
                  step_seconds=statistics.median(timer.times[skip:]),
                  train_seconds=seconds,
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  diverged=not np.isfinite(hist.history["loss"][-1]))
    if "meta_grad_ratio" in hist.history:
        result["meta_grad_ratio"] = [float(v) for v in hist.history["meta_grad_ratio"]]
    meta_net = net.meta_network if net is not model else None
    if meta_net is not None and hasattr(meta_net, "learned_parameters"):
        # A few named parameters per kernel (MetaEWGS) say more than a plot.
        result["meta_parameters"] = dict(
            meta_net.learned_parameters(),
            kernels=[f"{w.name}/{s.key}" for w, s in net._slots])
    elif meta_net is not None:
        result["meta_function"] = _meta_function(net)
    return result


# ----------------------------------------------------------------------------- tfmot

def tfmot_runs(profile, out_dir, seeds=3):
    """TFMOT's QAT on the MNIST CNN, from the same float starts, if its venv exists."""
    if profile not in ("quick", "peer") or not FLAGS.tfmot:
        return []
    try:
        import tfmot_runner
    except ImportError:
        return []
    if not tfmot_runner.tfmot_available():
        print("TFMOT venv absent (run examples/tfmot_setup.sh): peer rows skipped.")
        return []
    results = []
    for seed in range(seeds):
        spec = dict(task="mnist", seed=seed, pretrain_steps=157, train_limit=10000,
                    batch_size=64)
        model = _float_model(spec, out_dir)
        init = os.path.join(out_dir, f"tfmot_init_seed{seed}.npz")
        tfmot_runner.save_init_weights(model, init)
        for scheme, bits in (("default8", 8), ("nbit", 4), ("nbit", 2)):
            try:
                r = tfmot_runner.run_tfmot(
                    model="small_cnn", dataset="mnist", scheme=scheme, num_bits=bits,
                    epochs=6, steps_per_epoch=50, optimizer="sgd", lr=0.05, batch_size=64,
                    train_limit=10000, test_limit=5000, init_weights=init, seed=seed,
                    timeout=900)
            except Exception as e:  # a peer failure is a result, not a crash
                print(f"TFMOT {scheme} {bits} seed {seed}: failed: {e}")
                continue
            acc = r.get("test_accuracy_per_epoch") or r.get("accuracy") or []
            results.append(dict(
                task="mnist", method=f"tfmot_{scheme}", quantizer="tfmot", bits=bits,
                optimizer="sgd", lr=0.05, seed=seed, semantics="-", last_k=3, accuracy=acc,
                final_accuracy=r.get("final_accuracy"),
                best_accuracy=max(acc) if acc else None,
                step_seconds=r.get("median_step_seconds") or r.get("step_seconds"),
                peak_rss_mib=r.get("peak_rss_mib"), raw=r))
    return results


# ----------------------------------------------------------------------------- report

def _group_key(r):
    method = r["method"] + (f" a{r['activation_bits']}" if r.get("activation_bits") else "")
    if r.get("activation_quantizer", "ema") != "ema":
        method += f" {r['activation_quantizer']}"
    return (r["task"], r["quantizer"], r["bits"], r["optimizer"], r["lr"], method,
            r["semantics"])


def summarize(results):
    """One row per configuration, seeds pooled.

    Per seed, the paper's metric: the mean test accuracy over the run's last
    `last_k` checkpoints. The row gives those values' mean and sample standard
    deviation over seeds (ddof=1; 0 for one seed), the values themselves, and
    the paper's own pooled figure: population variance over seeds x last
    checkpoints.
    """
    import numpy as np

    groups = {}
    for r in results:
        groups.setdefault(_group_key(r), []).append(r)
    ref = {}
    for key, rs in groups.items():
        med = statistics.median([r["step_seconds"] for r in rs if r.get("step_seconds")] or [0])
        if key[5] in ("float", "ste"):
            ref.setdefault((key[0], key[5]), med)
    rows = []
    for key, rs in groups.items():
        task, q, bits, opt, lr, method, sem = key
        rs = sorted(rs, key=lambda r: r["seed"])
        lasts = [a for r in rs if r["accuracy"] for a in r["accuracy"][-r["last_k"]:]]
        per_seed = [100 * float(np.mean(r["accuracy"][-r["last_k"]:]))
                    for r in rs if r["accuracy"]]
        step = statistics.median([r["step_seconds"] for r in rs if r.get("step_seconds")] or [0])
        rows.append(dict(
            task=task, quantizer=q, bits=bits, optimizer=opt, lr=lr, method=method,
            semantics=sem, runs=len(rs),
            mean_last=100 * float(np.mean(lasts)) if lasts else float("nan"),
            std_seeds=float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
            per_seed=" / ".join(f"{v:.2f}" for v in per_seed),
            seeds=" ".join(str(r["seed"]) for r in rs),
            var_last=float(np.var(100 * np.asarray(lasts))) if lasts else float("nan"),
            best=100 * max((r["best_accuracy"] or 0) for r in rs),
            step_ms=1000 * step,
            x_float=step / ref[(task, "float")] if ref.get((task, "float")) else float("nan"),
            x_ste=step / ref[(task, "ste")] if ref.get((task, "ste")) else float("nan"),
            peak_rss_mib=max((r.get("peak_rss_mib") or 0) for r in rs)))
    order = ["float", "ste", *sweep.HAND_METHODS, "fc_grad", "multifc", "lstmfc", "gain_mlp",
             "meta_ewgs", "meta_ewgs_lr0", "meta_ewgs_prior", "meta_ewgs_prior_lr0"]
    rows.sort(key=lambda r: (r["task"], r["quantizer"], r["bits"], r["optimizer"], r["lr"],
                             order.index(r["method"]) if r["method"] in order else 99,
                             r["semantics"]))
    return rows


def print_table(rows):
    w = max([15] + [len(r["method"]) + 1 for r in rows])
    head = (f"{'task':<8}{'quant':<8}{'bits':>4} {'opt':<5}{'lr':>7} {'method':<{w}}{'sem':<6}"
            f"{'runs':>4} {'mean last +- std':>17}{'(var)':>8}{'best':>7}{'ms/step':>9}"
            f"{'x float':>8}{'x STE':>7}{'RSS MiB':>9}  per seed")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['task']:<8}{r['quantizer']:<8}{r['bits']:>4} {r['optimizer']:<5}{r['lr']:>7g} "
              f"{r['method']:<{w}}{r['semantics']:<6}{r['runs']:>4} "
              f"{r['mean_last']:>9.2f} +- {r['std_seeds']:5.2f} ({r['var_last']:6.2f})"
              f"{r['best']:>7.2f}{r['step_ms']:>9.1f}{r['x_float']:>8.2f}{r['x_ste']:>7.2f}"
              f"{r['peak_rss_mib']:>9.0f}  {r['per_seed']}")


def _save(plt, fig, out_dir, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=90)
    plt.close(fig)
    return name


def _plot_meta_ewgs(plt, runs, out_dir):
    """MetaEWGS' learned per-coordinate factor f(r) for g > 0, one line per kernel."""
    import numpy as np

    r = np.linspace(-0.5, 0.5, 101)
    fig, axes = plt.subplots(1, len(runs), figsize=(3.8 * len(runs), 3.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        p = run["meta_parameters"]
        for kernel, delta, gamma in zip(p["kernels"], p["delta"], p["gamma"]):
            ax.plot(r, 1 + delta * r + gamma * (2 * np.abs(r) - 0.5),
                    label=f"{kernel.split('/')[0]}: d={delta:+.2f} g={gamma:+.2f}")
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="STE")
        ax.set(title=f"{run['method']}: {run['task']} {run['quantizer']}{run['bits']} "
                     f"{run['optimizer']} lr={run['lr']:g}",
               xlabel="residual r = x - x_q (levels), g > 0",
               ylabel="factor f (before renorm.)")
        ax.title.set_fontsize(8)
        if len(p["kernels"]) <= 6:
            ax.legend(fontsize=6)
        else:  # a legend of ResNet20's 22 kernels would hide the lines
            ax.text(0.02, 0.98, f"{len(p['kernels'])} kernels: d {min(p['delta']):+.2f}.."
                    f"{max(p['delta']):+.2f}, g {min(p['gamma']):+.2f}..{max(p['gamma']):+.2f}",
                    transform=ax.transAxes, va="top", fontsize=6)
    return _save(plt, fig, out_dir, "meta_ewgs_function.png")


def plot(results, out_dir, sweep_rows=None):
    """Writes curves_*.png and meta_function.png; returns the file names.

    With `sweep_rows` (the summary of a sweep profile) also best_*.png: per
    workload, each method's best configuration, mean +- std over seeds.
    """
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[examples]').")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    panels = {}
    for r in results:
        if r["method"] == "float" or r.get("seed", 0) != 0 or not r.get("train_loss"):
            continue
        panels.setdefault((r["task"], r["quantizer"], r["bits"], r["optimizer"]), []).append(r)
    for (task, q, bits, opt), rs in panels.items():
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
        for r in rs:
            label = f"{r['method']} lr={r['lr']:g}" + (" paper" if r["semantics"] == "paper" else "")
            x = [r["eval_every"] * (i + 1) for i in range(len(r["accuracy"]))]
            a1.plot(x, [100 * a for a in r["accuracy"]], marker="o", label=label)
            a2.plot(x, r["train_loss"], marker="o", label=label)
        a1.set(xlabel="step", ylabel="test accuracy %", title=f"{task} {q}{bits} {opt}")
        a2.set(xlabel="step", ylabel="training loss", title="training loss")
        a1.legend(fontsize=7)
        files.append(_save(plt, fig, out_dir, f"curves_{task}_{q}{bits}_{opt}.png"))
    for (task, q, bits), curves in (sweep.best_curves(results, sweep_rows).items()
                                    if sweep_rows else ()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for steps, mean, std, label in curves.values():
            ax.plot(steps, mean, marker="o", label=label)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], alpha=0.15)
        ax.set(xlabel="step", ylabel="test accuracy %",
               title=f"{task} {q}{bits}: best of sweep per method")
        ax.legend(fontsize=7)
        files.append(_save(plt, fig, out_dir, f"best_{task}_{q}{bits}.png"))
    # Learned MetaEWGS variants (not the frozen "_lr0" controls), seed 0.
    learned = [r for r in results if r.get("meta_parameters") and r.get("seed", 0) == 0
               and r["method"].startswith("meta_ewgs") and not r["method"].endswith("_lr0")]
    if sweep_rows:  # each method's best configuration per workload only
        best = {(b["task"], b["bits"], b["method"], b["optimizer"], b["lr"])
                for b in sweep.best_of_sweep(sweep_rows)}
        learned = [r for r in learned
                   if (r["task"], r["bits"], r["method"], r["optimizer"], r["lr"]) in best]
    if learned:
        files.append(_plot_meta_ewgs(plt, learned[:6], out_dir))
    metas = [r for r in results if r.get("meta_function") and r.get("seed", 0) == 0
             and r["task"] == "cifar10" and r["optimizer"] == "sgd"] or \
            [r for r in results if r.get("meta_function") and r.get("seed", 0) == 0][:4]
    if metas:
        fig, axes = plt.subplots(1, len(metas), figsize=(3.6 * len(metas), 3.2), squeeze=False)
        for ax, r in zip(axes[0], metas):
            mf = r["meta_function"]
            g = [v / mf["g_rms"] for v in mf["g"]]
            for wt, row in zip(mf["w_tilde"], mf["m"]):
                ax.plot(g, [v / mf["g_rms"] for v in row], label=f"w~={wt:.2f}")
            ax.plot(g, g, "k--", lw=0.8, label="STE (m=g)")
            ax.set(title=f"{r['method']} {r['semantics']} ({r['task']})",
                   xlabel="g / rms(g)", ylabel="m / rms(g)")
            ax.legend(fontsize=6)
        files.append(_save(plt, fig, out_dir, "meta_function.png"))
    return files


# ----------------------------------------------------------------------------- main

def _child(spec, cache_dir):
    cmd = [sys.executable, os.path.abspath(__file__), f"--run_one={json.dumps(spec)}",
           f"--output_dir={cache_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"run {spec} failed:\n{proc.stderr[-3000:]}")


def main(argv):
    del argv
    out_dir = FLAGS.output_dir or tempfile.mkdtemp(prefix="mq_bench_")
    os.makedirs(out_dir, exist_ok=True)
    if FLAGS.run_one:
        print(RESULT_TAG + json.dumps(run_one(json.loads(FLAGS.run_one), out_dir)))
        return 0
    if FLAGS.merge:
        results = merge(FLAGS.merge, FLAGS.profile)
        report(results, out_dir, FLAGS.profile, f"{len(results)} runs merged")
        return 0
    runs = profile_runs(FLAGS.profile, FLAGS.seeds)
    if FLAGS.tasks:
        unknown = sorted(set(FLAGS.tasks) - {r["task"] for r in runs})
        if unknown:
            raise app.UsageError(f"--tasks: no runs of {unknown} in --profile={FLAGS.profile}.")
        runs = [r for r in runs if r["task"] in FLAGS.tasks]
    if FLAGS.methods:
        unknown = sorted(set(FLAGS.methods) - {r["method"] for r in runs})
        if unknown:
            raise app.UsageError(f"--methods: no runs of {unknown} in --profile={FLAGS.profile}.")
        runs = [r for r in runs if r["method"] in FLAGS.methods]
    if FLAGS.bits:
        runs = [r for r in runs if str(r["bits"]) in FLAGS.bits]
    if FLAGS.activation_quantizers:
        runs = [r for r in runs if r.get("activation_bits")
                and r.get("activation_quantizer", "ema") in FLAGS.activation_quantizers]
    if FLAGS.max_runs:
        runs = runs[:FLAGS.max_runs]
    print(f"profile {FLAGS.profile}: {len(runs)} runs -> {out_dir}")
    results = []
    t0 = time.perf_counter()
    for i, spec in enumerate(runs):
        t = time.perf_counter()
        if FLAGS.profile == "smoke":
            r = run_one(spec, out_dir)  # in-process: faster, RSS not per run
        else:
            r = _child(spec, out_dir)
        results.append(r)
        print(f"[{i + 1}/{len(runs)}] {spec['task']} {spec['quantizer']}{spec['bits']} "
              f"{spec['optimizer']} lr={spec['lr']:g} {spec['method']} {spec['semantics']} "
              f"seed {spec['seed']}: acc {100 * r['final_accuracy']:.2f} "
              f"(start {100 * r['start_accuracy']:.2f}), {1000 * r['step_seconds']:.1f} ms/step, "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    results += tfmot_runs(FLAGS.profile, out_dir, FLAGS.seeds)
    report(results, out_dir, FLAGS.profile, f"{time.perf_counter() - t0:.0f} s")
    return 0


def _spec_key(run):
    return (run["task"], run["quantizer"], run["bits"], run["optimizer"], run["lr"],
            run["method"], run["semantics"], run["seed"], run.get("activation_bits"),
            run.get("activation_quantizer"), run.get("meta_lr"), run["steps"])


def merge(paths, profile):
    """The runs of several results.json files of one profile, each configuration once.

    Raises:
        ValueError: a file of another profile, or one configuration and seed
            with two different results (the same run is bit-identical across
            invocations, so two results mean two different codes or budgets).
    """
    runs = {}
    for path in paths:
        if os.path.isdir(path):
            path = os.path.join(path, "results.json")
        with open(path) as f:
            data = json.load(f)
        if data.get("profile") != profile:
            raise ValueError(f"{path} holds --profile={data.get('profile')} runs, not "
                             f"{profile}; merge the results of one profile at a time.")
        for run in data["runs"]:
            key = _spec_key(run)
            if key in runs and runs[key]["accuracy"] != run["accuracy"]:
                raise ValueError(f"{path}: run {key} differs from the same run in an earlier "
                                 "file; were they made by different code?")
            runs[key] = run
    return list(runs.values())


def report(results, out_dir, profile, took):
    """Prints the tables; writes results.json, results.csv and the plots."""
    rows = summarize(results)
    print(f"\nResults ({profile} profile, {took}; per seed the "
          "mean of the last checkpoints; mean +- sample std over seeds; in parentheses the "
          "paper's population variance over seeds x last checkpoints)")
    print_table(rows)
    if profile in ("medium", "strong"):
        sweep.print_best(rows)
        sweep.print_best_curves(results, rows)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"profile": profile, "runs": results, "summary": rows}, f)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    files = plot(results, out_dir, rows if profile in ("medium", "strong") else None)
    print(f"\nWrote results.json, results.csv{', ' if files else ''}{', '.join(files)} in {out_dir}")


if __name__ == "__main__":
    app.run(main)
