"""
Title: 1-bit ResNet20 on CIFAR-10 with MetaQuant (the paper's setup)
Description: Quantization-aware training of the paper's pretrained ResNet20
    with a meta-learned quantizer gradient, then export to TFLite.

This script reproduces the CIFAR-10 / ResNet20 experiment of MetaQuant (Chen,
Wang & Pan, NeurIPS 2019, Table 1):

1. **Float start.** The paper starts from a pretrained full-precision ResNet20
   ("FP 91.5"). The official checkpoint, converted to an npz
   (`../shared/pretrained/resnet20_cifar10_fp.npz`), is loaded into a Keras
   ResNet20 and scores 91.50% on the CIFAR-10 test set. Without it,
   `--pretrain_epochs=N` trains the float model from scratch instead (SGD
   momentum 0.9, lr 0.1, x0.1 at 50% and 75% of the epochs).
2. **Quantization-aware training.** Every conv and the classifier (22
   layers, first and last included) get 1-bit DoReFa weights
   (`mq_keras.quantize_model`); activations and BatchNorm stay float. Training
   as in the paper: base optimizer SGD (or Adam) lr 1e-3, meta optimizer
   Adam 1e-3 (`mq_keras.PaperAdam`), batch 128, 100 epochs, lr x0.1 every 30
   epochs, RandomCrop(32, pad 4) + horizontal flip. The test accuracy is
   measured after every epoch; the paper's metric is the mean over the last
   10 epochs (of 5 runs; this is one run).
3. **Export.** The quantized model is converted to TFLite ("weights" mode:
   1-bit kernels stored as int8 codes with per-channel scales) and checked
   against Keras on the test images.

Paper, Table 1 (ResNet20, 1-bit DoReFa): SGD: STE 80.745, MultiFC 88.942;
Adam: STE 89.782, MultiFC 89.941.

Run:

    python examples/cifar10_resnet20.py                         # the paper's run (hours on a CPU)
    python examples/cifar10_resnet20.py --estimator=ste         # its STE baseline
    python examples/cifar10_resnet20.py --epochs=2 --steps_per_epoch=100 --test_limit=2000
    python examples/cifar10_resnet20.py --smoke                 # under a minute; what the test runs

On a 2-core CPU one epoch (391 steps of 128) takes a few minutes; use
`--train_limit`, `--test_limit` and `--steps_per_epoch` to scale down.

Data: CIFAR-10 through tensorflow-datasets (`TFDS_DATA_DIR`, else
`../shared/tensorflow_datasets` beside the repository); `--download` lets
tfds fetch it.
"""

import json
import math
import os
import pathlib
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `zoo` lives beside this script (its directory is on sys.path when run as a
# script; added here for runpy and other launchers).
_EXAMPLES = pathlib.Path(__file__).resolve().parent
if str(_EXAMPLES) not in sys.path:
    sys.path.insert(0, str(_EXAMPLES))

import zoo  # noqa: E402  (sets TFDS_DATA_DIR before tfds is imported)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import mq_keras  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("pretrained", zoo.default_pretrained_path(),
                    "npz of the paper's full-precision ResNet20 (PyTorch "
                    "names and layouts). Default: the shared copy, if present.")
flags.DEFINE_integer("pretrain_epochs", 0,
                     "If > 0, train the float ResNet20 from scratch for this "
                     "many epochs instead of loading --pretrained.")
flags.DEFINE_float("pretrain_lr", 0.1, "Learning rate of float pretraining "
                   "(SGD momentum 0.9; x0.1 at 50% and 75% of the epochs).")
flags.DEFINE_float("pretrain_weight_decay", 1e-4,
                   "Weight decay of float pretraining (Keras' decoupled form).")
flags.DEFINE_enum("quantizer", "dorefa", ["dorefa", "bwn", "ternary", "uniform"],
                  "Weight quantizer.")
flags.DEFINE_integer("num_bits", 1, "Weight bit width.")
flags.DEFINE_enum("meta_network", "multifc",
                  ["multifc", "fc_grad", "lstmfc", "gain_mlp"],
                  "Meta network (estimator=metaquant).")
flags.DEFINE_enum("estimator", "metaquant", ["metaquant", "ste"],
                  "metaquant: meta-learned gradient; ste: the plain "
                  "straight-through estimator (the paper's baseline).")
flags.DEFINE_enum("semantics", "code", ["code", "paper"],
                  "MetaQuant step: the official code's (default) or the paper's.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "Base optimizer.")
flags.DEFINE_float("lr", 1e-3, "Base learning rate.")
flags.DEFINE_float("momentum", 0.0, "SGD momentum (the paper: 0, plain SGD).")
flags.DEFINE_float("meta_lr", 1e-3, "Learning rate of the meta optimizer "
                   "(PaperAdam; constant, as in the official code).")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("epochs", 100, "Epochs of quantization-aware training.")
flags.DEFINE_integer("decay_every", 30, "Multiply the base lr by 0.1 every "
                     "this many epochs.")
flags.DEFINE_integer("train_limit", 0,
                     "Use only the first N training images (0: all 50000).")
flags.DEFINE_integer("test_limit", 0,
                     "Use only the first N test images (0: all 10000).")
flags.DEFINE_integer("steps_per_epoch", 0, "Training steps per epoch (0: one "
                     "pass over the training images; otherwise the data "
                     "repeat and an 'epoch' is this many steps).")
flags.DEFINE_integer("tflite_limit", 1000, "Test images the TFLite file is "
                     "checked on (0: all of the test subset).")
flags.DEFINE_integer("last_epochs", 10, "The paper's metric: mean test "
                     "accuracy over this many last epochs.")
flags.DEFINE_integer("seed", 0, "Random seed (meta network, data order, "
                     "augmentation).")
flags.DEFINE_bool("download", False, "Let tfds download CIFAR-10 if absent.")
flags.DEFINE_string("output_dir", None,
                    "Where history, model and TFLite file go (default: a new "
                    "temp dir).")
flags.DEFINE_bool("smoke", False, "Tiny run (64 train / 64 test images, 1 "
                  "epoch of 2 steps of 32) to check the pipeline end to end.")

_EVAL_BATCH = 500


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class EpochLog(keras.callbacks.Callback):
    """Prints one line per epoch and keeps the history (with lr and time)."""

    def __init__(self, title):
        super().__init__()
        self.title = title
        self.rows = []
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        # The rate of this epoch's steps (read at its end it would be the next one's).
        self._lr = float(keras.ops.convert_to_numpy(
            self.model.optimizer.learning_rate))
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        lr = self._lr
        row = {"epoch": epoch + 1, "seconds": time.perf_counter() - self._start,
               "lr": lr, **{k: float(v) for k, v in logs.items()}}
        self.rows.append(row)
        extra = ""
        if "meta_grad_ratio" in row:
            extra = f"  |g_meta|/|g_ste| {row['meta_grad_ratio']:.3g}"
        print(f"{self.title} epoch {epoch + 1:3d}/{self.params['epochs']}: "
              f"loss {row.get('loss', float('nan')):.4f}  "
              f"train acc {row.get('accuracy', float('nan')):.4f}  "
              f"test acc {row.get('val_accuracy', float('nan')):.4f}  "
              f"lr {lr:.3g}  {row['seconds']:.1f} s{extra}", flush=True)


def _train_data(n_train, batch_size, steps_per_epoch, seed):
    """Training dataset and its steps per epoch."""
    ds = zoo.cifar10("train", batch_size=batch_size, augment=True,
                     limit=n_train, shuffle_seed=seed, download=FLAGS.download)
    if steps_per_epoch:
        return ds.repeat(), steps_per_epoch
    return ds, math.ceil(n_train / batch_size)


def pretrain_float(model, train, steps, test, epochs):
    """Trains the float ResNet20 from scratch (when no checkpoint is at hand)."""
    boundaries = [int(epochs * steps * 0.5), int(epochs * steps * 0.75)]
    lr = keras.optimizers.schedules.PiecewiseConstantDecay(
        [max(b, 1) for b in boundaries],
        [FLAGS.pretrain_lr, FLAGS.pretrain_lr * 0.1, FLAGS.pretrain_lr * 0.01])
    model.compile(optimizer=keras.optimizers.SGD(
        lr, momentum=0.9, weight_decay=FLAGS.pretrain_weight_decay or None),
        loss=_loss(), metrics=["accuracy"])
    log = EpochLog("float")
    model.fit(train, epochs=epochs, steps_per_epoch=steps, shuffle=False,
              validation_data=test, callbacks=[log], verbose=0)
    return log.rows


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("ERROR")
    t_start = time.perf_counter()
    batch_size, epochs = FLAGS.batch_size, FLAGS.epochs
    train_limit, test_limit = FLAGS.train_limit, FLAGS.test_limit
    steps_per_epoch, pretrain_epochs = FLAGS.steps_per_epoch, FLAGS.pretrain_epochs
    tflite_limit = FLAGS.tflite_limit
    if FLAGS.smoke:
        batch_size, epochs, steps_per_epoch = 32, 1, 2
        train_limit, test_limit, tflite_limit = 64, 64, 64
        pretrain_epochs = min(pretrain_epochs, 1)
    pretrained = FLAGS.pretrained
    if pretrain_epochs <= 0 and not (pretrained and os.path.isfile(pretrained)):
        if not FLAGS.smoke:
            raise app.UsageError(
                f"No pretrained ResNet20 at {pretrained!r}. Pass --pretrained="
                "PATH.npz, or --pretrain_epochs=N to train the float model "
                "from scratch first.")
        pretrain_epochs = 1
        print("WARNING: no pretrained npz; --smoke trains the float model "
              "for one tiny epoch instead.")
    out_dir = pathlib.Path(FLAGS.output_dir
                           or tempfile.mkdtemp(prefix="mq_cifar10_resnet20_"))
    out_dir.mkdir(parents=True, exist_ok=True)

    n_train = train_limit or 50000
    n_test = test_limit or 10000
    train, steps = _train_data(n_train, batch_size, steps_per_epoch, FLAGS.seed)
    test = zoo.cifar10("test", batch_size=_EVAL_BATCH, augment=False,
                       limit=n_test, download=FLAGS.download)
    print(f"CIFAR-10: {n_train} training images ({steps} steps of "
          f"{batch_size} per epoch), {n_test} test images. Output: {out_dir}")

    # 1. The full-precision start.
    keras.utils.set_random_seed(FLAGS.seed)
    float_model = zoo.resnet20()
    float_history = []
    start = time.perf_counter()
    if pretrain_epochs > 0:
        print(f"\n== Float ResNet20 from scratch ({pretrain_epochs} epoch(s), "
              f"SGD momentum 0.9, lr {FLAGS.pretrain_lr})")
        float_history = pretrain_float(float_model, train, steps, test,
                                       pretrain_epochs)
        float_source = f"trained from scratch, {pretrain_epochs} epoch(s)"
    else:
        print(f"\n== Float ResNet20: the paper's pretrained weights ({pretrained})")
        zoo.load_pretrained_resnet20(float_model, pretrained)
        float_source = f"pretrained ({os.path.basename(pretrained)})"
        float_model.compile(loss=_loss(), metrics=["accuracy"])
    float_seconds = time.perf_counter() - start
    _, float_acc = float_model.evaluate(test, verbose=0)
    print(f"float test accuracy: {float_acc:.4f}  (paper: 0.915 on all 10000)")

    # 2. Quantization-aware training.
    is_meta = FLAGS.estimator == "metaquant"
    label = f"MetaQuant {FLAGS.meta_network}" if is_meta else "STE"
    bits = f"{FLAGS.num_bits}-bit {FLAGS.quantizer}"
    keras.utils.set_random_seed(FLAGS.seed + 1)
    qmodel = mq_keras.quantize_model(
        float_model, kernel_quantizer=FLAGS.quantizer, num_bits=FLAGS.num_bits,
        meta_network=FLAGS.meta_network, estimator=FLAGS.estimator,
        semantics=FLAGS.semantics, verbose=False)
    n_wrapped = len(qmodel.wrappers)
    n_float = sum(1 for l in qmodel.quantized_model.layers
                  if l.weights and not isinstance(l, mq_keras.MetaQuantWrapper))
    lr = zoo.step_decay(FLAGS.lr, steps, every_epochs=FLAGS.decay_every,
                        max_epochs=max(epochs, FLAGS.decay_every + 1))
    qmodel.compile(
        optimizer=zoo.make_optimizer(FLAGS.optimizer, lr, momentum=FLAGS.momentum),
        meta_optimizer=mq_keras.PaperAdam(FLAGS.meta_lr) if is_meta else None,
        loss=_loss(), metrics=["accuracy"])
    _, start_acc = qmodel.evaluate(test, verbose=0)
    opt = FLAGS.optimizer.upper() + (f" momentum {FLAGS.momentum}"
                                     if FLAGS.momentum else "")
    print(f"\n== {label}, {bits} on {n_wrapped} layers ({n_float} BatchNorm "
          f"layers float)"
          + (f", {FLAGS.semantics} semantics" if is_meta else "")
          + f"; {opt} lr {FLAGS.lr} "
          f"x0.1 every {FLAGS.decay_every} epochs"
          + (f", meta PaperAdam {FLAGS.meta_lr}" if is_meta else "")
          + f"; {epochs} epoch(s)")
    print(f"quantized start (before training) test accuracy: {start_acc:.4f}")
    log = EpochLog(label)
    start = time.perf_counter()
    qmodel.fit(train, epochs=epochs, steps_per_epoch=steps, shuffle=False,
               validation_data=test, callbacks=[log], verbose=0)
    train_seconds = time.perf_counter() - start
    test_accs = [r["val_accuracy"] for r in log.rows]
    final_acc = test_accs[-1]
    last = test_accs[-FLAGS.last_epochs:]
    mean_last = float(np.mean(last))

    print("\n== Storage of the quantized model")
    storage = mq_keras.summary(qmodel)
    model_path = out_dir / f"resnet20_{FLAGS.estimator}.keras"
    qmodel.save(model_path)

    # 3. TFLite export ("weights" mode) and agreement with Keras.
    blob = mq_keras.convert_to_tflite(qmodel)
    tflite_path = out_dir / f"resnet20_{FLAGS.estimator}_weights.tflite"
    tflite_path.write_bytes(blob)
    n_check = min(n_test, tflite_limit) if tflite_limit else n_test
    x_check, y_check = zoo.cifar10_arrays("test", n_check,
                                          download=FLAGS.download)
    report = mq_keras.verify_tflite(qmodel, blob, x_check, y_check)

    total = time.perf_counter() - t_start
    print(f"\n== Results (CIFAR-10, {n_train} train / {n_test} test images; "
          f"seed {FLAGS.seed}; one run)")
    rows = [
        (f"float ResNet20 ({float_source})", float_acc),
        (f"{label} {bits}: quantized start", start_acc),
        (f"{label} {bits}: final (epoch {len(test_accs)})", final_acc),
        (f"{label} {bits}: mean of last {len(last)} epochs", mean_last),
        (f"{label} TFLite weights mode ({n_check} images)",
         report["tflite_accuracy"]),
    ]
    print(f"{'run':<58}{'test acc':>10}")
    print("-" * 68)
    for name, acc in rows:
        print(f"{name:<58}{acc:>10.4f}")
    print("-" * 68)
    print(f"TFLite file: {len(blob):,} bytes; top-1 agreement with Keras "
          f"{report['top1_agreement']:.4f}; max |dlogit| "
          f"{report['max_abs_diff']:.2e} (relative {report['max_rel_diff']:.1e}); flex ops: {report['flex_ops'] or 'none'}")
    print(f"Training {train_seconds:.1f} s for {epochs * steps} steps (tracing "
          f"and per-epoch test evaluation included); total {total:.1f} s. "
          f"Files in {out_dir}")

    results = {
        "config": {
            "quantizer": FLAGS.quantizer, "num_bits": FLAGS.num_bits,
            "estimator": FLAGS.estimator, "meta_network": FLAGS.meta_network
            if is_meta else None, "semantics": FLAGS.semantics,
            "optimizer": FLAGS.optimizer, "lr": FLAGS.lr,
            "momentum": FLAGS.momentum, "meta_lr": FLAGS.meta_lr if is_meta
            else None, "batch_size": batch_size, "epochs": epochs,
            "steps_per_epoch": steps, "decay_every": FLAGS.decay_every,
            "train_images": n_train, "test_images": n_test,
            "seed": FLAGS.seed, "smoke": FLAGS.smoke,
        },
        "float": {"source": float_source, "test_accuracy": float_acc,
                  "seconds": float_seconds, "history": float_history},
        "quantized_layers": n_wrapped,
        "start_accuracy": start_acc,
        "history": log.rows,
        "final_accuracy": final_acc,
        "mean_last_epochs": {"epochs": len(last), "accuracy": mean_last},
        "train_seconds": train_seconds,
        "storage": {k: v for k, v in storage.items() if k != "layers"},
        "tflite": {"path": str(tflite_path), "test_images": n_check, **report},
        "seconds": total,
    }
    (out_dir / "history.json").write_text(json.dumps(results, indent=2))
    print(f"History: {out_dir / 'history.json'}")
    return 0


if __name__ == "__main__":
    app.run(main)
