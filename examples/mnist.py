"""
Title: 1-bit MNIST CNN with MetaQuant
Description: Quantization-aware training with a meta-learned gradient, compared
    with the plain straight-through estimator, then exported to TFLite.

MetaQuant (Chen, Wang & Pan, NeurIPS 2019) replaces the straight-through
estimator (STE) of a quantized network's weights by a small *meta network*
that learns the gradient of the quantizer. This example:

1. trains a small float CNN briefly (a pretrained start, as in the paper);
2. quantizes all its kernels (1-bit DoReFa by default) and trains two copies
   from that same start on the same batches: one with the plain STE, one with
   MetaQuant;
3. exports the MetaQuant model to TFLite, whose accuracy it measures with the
   TFLite interpreter;
4. repeats 1-3 for `--seeds` seeds (default 3: seeds 0, 1, 2) and prints
   each run's test accuracy for every seed with the mean +- sample std over
   seeds, the per-layer storage table and the TFLite files' sizes.

1-bit training at plain SGD is chaotic: one seed's figure says little, and
the same seed on another machine (other CPU kernels, other float summation
order) gives another run. On one machine a seeded run is bit-identical from
process to process (tests/test_determinism.py).

Run:

    python examples/mnist.py                    # 3 seeds; minutes on 2 CPU cores
    python examples/mnist.py --seeds=1          # seed 0 only
    python examples/mnist.py --epochs=5 --train_samples=60000
    python examples/mnist.py --smoke --seeds=1  # seconds; what the test runs

Data: MNIST through tensorflow-datasets when a prepared copy is found
(`TFDS_DATA_DIR`, else `../shared/tensorflow_datasets` beside the repository,
else `~/tensorflow_datasets`); `--data=tfds` lets tfds download it. Without
prepared data and with `--data=auto` the script falls back to synthetic
digits drawn from a 5x7 bitmap font, and says loudly that its numbers are not
MNIST numbers.
"""

import glob
import json
import os
import pathlib
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED_TFDS = _REPO.parent / "shared" / "tensorflow_datasets"
# Must happen before tensorflow_datasets is imported.
if "TFDS_DATA_DIR" not in os.environ and _SHARED_TFDS.is_dir():
    os.environ["TFDS_DATA_DIR"] = str(_SHARED_TFDS)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import mq_keras  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 3, "Epochs of quantization-aware training.")
flags.DEFINE_integer("pretrain_epochs", 1, "Epochs of float pretraining.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("num_bits", 1, "Weight bit width.")
flags.DEFINE_enum("quantizer", "dorefa", ["dorefa", "bwn", "ternary", "uniform"],
                  "Weight quantizer.")
flags.DEFINE_enum("meta_network", "multifc",
                  ["multifc", "fc_grad", "lstmfc", "gain_mlp"],
                  "Meta network of the MetaQuant run.")
flags.DEFINE_enum("estimator", "metaquant", ["metaquant", "ste"],
                  "Estimator of the main quantized run (the STE baseline "
                  "always runs beside it).")
flags.DEFINE_enum("semantics", "code", ["code", "paper"],
                  "MetaQuant step: the official code's or the paper's.")
flags.DEFINE_integer("train_samples", 10000,
                     "Training examples used (a subset of the 60000; 0: all).")
flags.DEFINE_integer("test_samples", 0, "Test examples used (0: all 10000).")
flags.DEFINE_float("lr", 0.05, "Learning rate of the base optimizer (SGD) "
                   "for quantization-aware training.")
flags.DEFINE_float("momentum", 0.0, "Momentum of the base optimizer (0: plain "
                   "SGD, where the paper finds the estimator matters most).")
flags.DEFINE_float("meta_lr", 1e-3, "Learning rate of the meta optimizer.")
flags.DEFINE_integer("seed", 0, "First random seed (training subset, "
                     "weights and data order; the synthetic digits).")
flags.DEFINE_integer("seeds", 3, "Number of seeds: every run is trained "
                     "for seeds seed, seed+1, ..., seed+seeds-1, and the "
                     "results give each seed's accuracy and their mean "
                     "+- sample std.")
flags.DEFINE_enum("data", "auto", ["auto", "tfds", "synthetic"],
                  "auto: prepared tfds MNIST if found, else synthetic digits; "
                  "tfds: tfds.load (downloads if needed); synthetic: font digits.")
flags.DEFINE_string("output_dir", None,
                    "Where models and results go (default: a new temp dir).")
flags.DEFINE_bool("smoke", False,
                  "Tiny run (few hundred examples, one epoch) to check the "
                  "pipeline end to end.")


# ----------------------------------------------------------------------------- data

def _prepared_mnist_dir():
    """Returns the tfds data dir holding a prepared MNIST, or None."""
    candidates = [os.environ.get("TFDS_DATA_DIR"),
                  os.path.expanduser("~/tensorflow_datasets")]
    for data_dir in candidates:
        if data_dir and glob.glob(os.path.join(data_dir, "mnist", "*",
                                               "dataset_info.json")):
            return data_dir
    return None


def load_tfds_mnist(data_dir=None, download=False):
    import tensorflow_datasets as tfds

    (x_train, y_train), (x_test, y_test) = tfds.as_numpy(tfds.load(
        "mnist", split=["train", "test"], as_supervised=True, batch_size=-1,
        data_dir=data_dir, download=download,
    ))
    return (x_train, y_train), (x_test, y_test)


# Digits 0-9 on a 5x7 grid, one string of 7 rows per digit.
_GLYPHS = (
    "01110 10001 10011 10101 11001 10001 01110",
    "00100 01100 00100 00100 00100 00100 01110",
    "01110 10001 00001 00010 00100 01000 11111",
    "11111 00010 00100 00010 00001 10001 01110",
    "00010 00110 01010 10010 11111 00010 00010",
    "11111 10000 11110 00001 00001 10001 01110",
    "00110 01000 10000 11110 10001 10001 01110",
    "11111 00001 00010 00100 01000 01000 01000",
    "01110 10001 10001 01110 10001 10001 01110",
    "01110 10001 10001 01111 00001 00010 01100",
)


def synthetic_digits(n, seed):
    """Returns `n` 28x28x1 uint8 images of font digits and their labels.

    Each digit is scaled (2x or 3x), optionally thickened, placed at a random
    offset, and given random contrast and noise. A learnable stand-in for
    MNIST when no real data is available: its accuracies are not MNIST's.
    """
    rng = np.random.default_rng(seed)
    glyphs = [np.array([[c == "1" for c in row] for row in g.split()], "float32")
              for g in _GLYPHS]
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 28, 28), "float32")
    for i, label in enumerate(labels):
        scale = rng.integers(2, 4)
        g = np.kron(glyphs[label], np.ones((scale, scale), "float32"))
        if rng.random() < 0.5:  # thicker stroke
            g = np.maximum(g, np.pad(g, ((0, 0), (1, 0)))[:, :-1])
        h, w = g.shape
        top = rng.integers(0, 28 - h + 1)
        left = rng.integers(0, 28 - w + 1)
        images[i, top:top + h, left:left + w] = g * rng.uniform(0.6, 1.0)
    images += rng.normal(0.0, 0.15, images.shape)
    images = np.clip(images, 0.0, 1.0) * 255.0
    return images[..., None].astype("uint8"), labels.astype("int64")


def load_data(source, seed):
    """Returns `((x_train, y_train), (x_test, y_test), description)`."""
    if source == "tfds":
        return (*load_tfds_mnist(download=True), "MNIST (tfds)")
    data_dir = _prepared_mnist_dir()
    if source == "auto" and data_dir is not None:
        return (*load_tfds_mnist(data_dir=data_dir), f"MNIST (tfds, {data_dir})")
    banner = "!" * 78
    print(banner)
    print("WARNING: no prepared MNIST found (TFDS_DATA_DIR, "
          "../shared/tensorflow_datasets, ~/tensorflow_datasets)."
          if source == "auto" else "WARNING: --data=synthetic.")
    print("Using SYNTHETIC font digits instead. The pipeline runs end to end, "
          "but the\naccuracies below are NOT MNIST accuracies and mean nothing "
          "about MNIST.\nUse --data=tfds (with network access) or prepare "
          "MNIST with tfds for real numbers.")
    print(banner)
    train = synthetic_digits(60000 if not FLAGS.smoke else 2000, seed)
    test = synthetic_digits(10000 if not FLAGS.smoke else 1000, seed + 1)
    return train, test, "SYNTHETIC font digits (not MNIST)"


def prepare(x, y, n, seed):
    if n and n < len(x):
        idx = np.random.default_rng(seed).permutation(len(x))[:n]
        x, y = x[idx], y[idx]
    return x.astype("float32") / 255.0, y.astype("int64")


# ---------------------------------------------------------------------------- model

def make_model():
    """Conv 32 -> BN -> ReLU -> pool -> Conv 64 -> BN -> ReLU -> pool -> Dense 10 -> BN.

    BatchNormalization momentum 0.9 (Keras' default is 0.99): the moving
    statistics must settle within a short run. The BN after the logits gives
    1-bit kernels (all +-1, no scale) logits of a trainable scale.
    """
    def bn(name):
        return keras.layers.BatchNormalization(momentum=0.9, name=name)

    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(32, 3, name="conv1")(inputs)
    x = keras.layers.ReLU()(bn("bn1")(x))
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, name="conv2")(x)
    x = keras.layers.ReLU()(bn("bn2")(x))
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    outputs = bn("bn_logits")(keras.layers.Dense(10, name="logits")(x))
    return keras.Model(inputs, outputs, name="mnist_cnn")


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def quantized_run(float_model, estimator, train, test, epochs, seed):
    """Quantizes `float_model` (a clone) and trains it; returns (model, acc, s)."""
    qmodel = mq_keras.quantize_model(
        float_model, kernel_quantizer=FLAGS.quantizer, num_bits=FLAGS.num_bits,
        meta_network=FLAGS.meta_network, estimator=estimator,
        semantics=FLAGS.semantics, verbose=False,
    )
    qmodel.compile(
        optimizer=keras.optimizers.SGD(FLAGS.lr, momentum=FLAGS.momentum),
        meta_optimizer=mq_keras.PaperAdam(FLAGS.meta_lr)
        if estimator == "metaquant" else None,
        loss=_loss(), metrics=["accuracy"],
    )
    keras.utils.set_random_seed(seed + 1)  # same batches for every run
    start = time.perf_counter()
    qmodel.fit(*train, batch_size=FLAGS.batch_size, epochs=epochs,
               verbose=2)
    seconds = time.perf_counter() - start
    _, acc = qmodel.evaluate(*test, batch_size=1000, verbose=0)
    return qmodel, acc, seconds


def mean_std(values):
    """(mean, sample standard deviation) of `values`; the std is 0 for one value."""
    values = np.asarray(values, "float64")
    return (float(values.mean()),
            float(values.std(ddof=1)) if len(values) > 1 else 0.0)


def run_seed(seed, data, sizes, out_dir, print_summary):
    """One seed of the job: float start, STE (and MetaQuant), TFLite export.

    Seeds the training subset, the float model's initial weights and the
    batch order, so on MNIST `--seed=S --seeds=1` repeats the run of seed S
    exactly (the synthetic digits are drawn once, from the first seed).
    Returns a dict of this seed's rows (label -> (accuracy, train seconds or
    None)) and its TFLite files (mode -> bytes and `verify_tflite` report).
    """
    (x_train, y_train), (x_test, y_test) = data
    train_n, test_n, epochs, pretrain_epochs = sizes
    train = prepare(x_train, y_train, train_n, seed)
    test = prepare(x_test, y_test, test_n, seed)

    # 1. Float pretraining: the paper starts from a full-precision model.
    keras.utils.set_random_seed(seed)
    float_model = make_model()
    float_model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=_loss(),
                        metrics=["accuracy"])
    print(f"\n== Seed {seed}: float pretraining ({pretrain_epochs} epoch(s), "
          "Adam 1e-3)")
    start = time.perf_counter()
    float_model.fit(*train, batch_size=FLAGS.batch_size, epochs=pretrain_epochs,
                    verbose=2)
    float_seconds = time.perf_counter() - start
    _, float_acc = float_model.evaluate(*test, batch_size=1000, verbose=0)
    print(f"seed {seed}: float test accuracy: {float_acc:.4f}")

    # 2. Quantization-aware training from the same start and the same batches.
    bits = f"{FLAGS.num_bits}-bit {FLAGS.quantizer}"
    runs = {}
    estimators = ["ste"] if FLAGS.estimator == "ste" else ["ste", "metaquant"]
    for estimator in estimators:
        name = "STE" if estimator == "ste" else f"MetaQuant ({FLAGS.meta_network})"
        print(f"\n== Seed {seed}: {name}, {bits}, {epochs} epoch(s), SGD lr "
              f"{FLAGS.lr} momentum {FLAGS.momentum}"
              + (f", meta PaperAdam {FLAGS.meta_lr}" if estimator != "ste" else ""))
        runs[estimator] = quantized_run(float_model, estimator, train, test,
                                        epochs, seed)
        print(f"seed {seed}: {name} test accuracy: {runs[estimator][1]:.4f}")

    main_run = "metaquant" if "metaquant" in runs else "ste"
    qmodel = runs[main_run][0]
    if print_summary:  # the same for every seed
        print("\n== Storage of the quantized model")
        mq_keras.summary(qmodel)
    qmodel.save(out_dir / f"mnist_{main_run}_seed{seed}.keras")

    # 3. Export to TFLite and measure each file against the Keras model.
    tflite = {}
    calibration = train[0][:256]
    for mode in ("float", "weights", "int8"):
        path = out_dir / f"mnist_{main_run}_seed{seed}_{mode}.tflite"
        extra = {"representative_dataset": calibration} if mode == "int8" else {}
        path.write_bytes(mq_keras.convert_to_tflite(qmodel, mode=mode, **extra))
        tflite[mode] = {"bytes": path.stat().st_size,
                        **mq_keras.verify_tflite(qmodel, path.read_bytes(), *test)}

    rows = {"float (pretrained start)": (float_acc, float_seconds)}
    for estimator, (_, acc, seconds) in runs.items():
        label = ("STE" if estimator == "ste"
                 else f"MetaQuant {FLAGS.meta_network}") + f" {bits}"
        rows[label] = (acc, seconds)
    label = "MetaQuant" if main_run == "metaquant" else "STE"
    for mode in ("weights", "int8"):
        rows[f"{label} TFLite {mode} mode"] = (tflite[mode]["tflite_accuracy"], None)
    return {"seed": seed, "train_samples": len(train[0]),
            "test_samples": len(test[0]), "rows": rows, "tflite": tflite,
            "main_run": main_run}


# ----------------------------------------------------------------------------- main

def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("ERROR")  # retracing notes of the several fits
    t_start = time.perf_counter()
    if FLAGS.seeds < 1:
        raise app.UsageError(f"--seeds={FLAGS.seeds}: pass 1 or more.")
    if FLAGS.smoke:
        train_n, test_n, epochs, pretrain_epochs = 256, 256, 1, 1
        FLAGS.batch_size = min(FLAGS.batch_size, 64)
    else:
        train_n, test_n = FLAGS.train_samples, FLAGS.test_samples
        epochs, pretrain_epochs = FLAGS.epochs, FLAGS.pretrain_epochs
    out_dir = pathlib.Path(FLAGS.output_dir or tempfile.mkdtemp(prefix="mq_mnist_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(range(FLAGS.seed, FLAGS.seed + FLAGS.seeds))

    (x_train, y_train), (x_test, y_test), source = load_data(FLAGS.data, FLAGS.seed)
    print(f"Data: {source}; {min(train_n or len(x_train), len(x_train))} "
          f"training and {min(test_n or len(x_test), len(x_test))} test examples; "
          f"seeds {', '.join(map(str, seeds))}. Output: {out_dir}")

    per_seed = [
        run_seed(seed, ((x_train, y_train), (x_test, y_test)),
                 (train_n, test_n, epochs, pretrain_epochs), out_dir,
                 print_summary=seed == seeds[0])
        for seed in seeds
    ]
    total = time.perf_counter() - t_start

    first = per_seed[0]
    seed_cols = "".join(f"{f'seed {s}':>9}" for s in seeds)
    width = 40 + len(seed_cols) + 18 + 10
    print(f"\n== Results ({source}; {first['train_samples']} train / "
          f"{first['test_samples']} test examples; seeds "
          f"{', '.join(map(str, seeds))})")
    print(f"{'run':<40}{seed_cols}{'mean +- std':>18}{'train s':>10}")
    print("-" * width)
    summary = {}
    for label in first["rows"]:
        accs = [r["rows"][label][0] for r in per_seed]
        secs = [r["rows"][label][1] for r in per_seed]
        mean, std = mean_std(accs)
        summary[label] = {"mean": mean, "std": std, "per_seed": accs}
        secs = (f"{np.mean(secs):10.1f}" if secs[0] is not None else f"{'-':>10}")
        print(f"{label:<40}{''.join(f'{a:>9.4f}' for a in accs)}"
              f"{f'{mean:.4f} +- {std:.4f}':>18}{secs}")
    print("-" * width)
    print(f"(mean +- sample std over {len(seeds)} seed(s); train s: mean per seed)")
    print(f"{'TFLite file':<14}{'seed':>6}{'bytes':>10}{'x float':>9}"
          f"{'top-1 agree':>13}{'max |dlogit|':>14}")
    for mode in ("float", "weights", "int8"):
        for r in per_seed:
            t = r["tflite"]
            print(f"{mode:<14}{r['seed']:>6}{t[mode]['bytes']:>10,}"
                  f"{t[mode]['bytes'] / t['float']['bytes']:>9.3f}"
                  f"{t[mode]['top1_agreement']:>13.4f}"
                  f"{t[mode]['max_abs_diff']:>14.2e}")
    print(f"Total time: {total:.1f} s. Files in {out_dir}")

    results = {
        "data": source, "train_samples": first["train_samples"],
        "test_samples": first["test_samples"], "seeds": seeds,
        "quantizer": FLAGS.quantizer, "num_bits": FLAGS.num_bits,
        "meta_network": FLAGS.meta_network, "semantics": FLAGS.semantics,
        "epochs": epochs, "lr": FLAGS.lr, "momentum": FLAGS.momentum,
        "meta_lr": FLAGS.meta_lr,
        "accuracy": summary,
        "per_seed": [{"seed": r["seed"],
                      "accuracy": {k: v[0] for k, v in r["rows"].items()},
                      "train_seconds": {k: v[1] for k, v in r["rows"].items()},
                      "tflite": r["tflite"]} for r in per_seed],
        "seconds": total,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    app.run(main)
