r"""TFMOT quantization-aware training of our benchmark models: the peer baseline.

This script is NOT part of mq_keras and does not import it. It runs in its own
virtual environment (`examples/tfmot_setup.sh` creates `<repo>/.venv-tfmot`),
with the legacy `tf_keras` (`TF_USE_LEGACY_KERAS=1`), because
tensorflow-model-optimization (TFMOT) 0.8.x QAT only works there and pins
`absl-py~=1.2` and `numpy<2`. `examples/tfmot_runner.py` runs it from our venv
in a child process and parses its result; it can also be run by hand:

    TF_USE_LEGACY_KERAS=1 .venv-tfmot/bin/python examples/tfmot_peer.py \
        --model=small_cnn --dataset=mnist --scheme=default8 \
        --train_limit=10000 --epochs=3 --optimizer=sgd --lr=0.05

What it does:

1. Builds the same architecture as our benchmarks in tf_keras, with the same
   layer names:
   * `small_cnn`: examples/mnist.py's `make_model()` (Conv 32 3x3 -> BN -> ReLU
     -> MaxPool -> Conv 64 3x3 -> BN -> ReLU -> MaxPool -> Flatten -> Dense 10
     -> BN; BN momentum 0.9; names conv1, bn1, conv2, bn2, logits, bn_logits);
   * `resnet20`: CIFAR ResNet20 as in MetaQuant's `resnet20_cifar` (stem conv
     3x3 16 no bias + BN + ReLU; 3 stages x 3 BasicBlocks, 16/32/64 channels;
     projection shortcut 1x1 stride-2 conv + BN where the shape changes; global
     average pooling; Dense 10). BN epsilon 1e-5, momentum 0.9. Stride-2 3x3
     convs are ZeroPadding2D(1) + "valid" (PyTorch's symmetric padding; Keras'
     "same" pads bottom/right only at stride 2), stride-1 3x3 convs "same"
     (identical to padding 1). Names as in
     ../shared/pretrained/resnet20_cifar10_fp.json's "keras_layer" fields:
     conv1, bn1, layer1_0_conv1, layer1_0_bn1, ..., layer2_0_downsample_0
     (1x1 conv), layer2_0_downsample_1 (its BN), ..., fc.
2. Optionally loads float starting weights (`--init_weights`, format below) so
   that TFMOT starts from the same float model as our runs.
3. Loads data with tensorflow-datasets (`TFDS_DATA_DIR` honoured; when it is
   unset, ../shared/tensorflow_datasets beside the repository is used if it
   exists). MNIST: pixels / 255. CIFAR-10: (pixels / 255 - mean) / std with
   mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010); training
   augmentation RandomCrop(32, padding=4) (zero padding before normalising,
   like torchvision) + random horizontal flip. `--train_limit N` /
   `--test_limit N` keep the first N examples in tfds order (as
   examples/zoo.py does), or with `--subset=random` the subset of
   examples/mnist.py's `prepare()`: `default_rng(seed).permutation(len)[:N]`.
4. Applies TFMOT QAT:
   * `--scheme=default8`: `tfmot.quantization.keras.quantize_model(model)`
     (8-bit weights, per-channel for convolutions, and 8-bit activations);
   * `--scheme=nbit --num_bits=K`: `quantize_annotate_model` + `quantize_apply`
     with `tfmot.quantization.keras.experimental.default_n_bit.
     DefaultNBitQuantizeScheme(num_bits_weight=K, num_bits_activation=A)`
     (`--activation_bits`, default 8);
   * `--scheme=float`: no quantization (the tf_keras float reference).
   NOTE: unlike our weight-only quantizers, TFMOT QAT also fake-quantizes
   activations (layer outputs and the model input), 8-bit by default; the
   result reports `activation_bits` and the wrapped layers.
5. Trains `--epochs` epochs (`--optimizer sgd|adam`, `--lr`, `--momentum`,
   `--batch_size`), evaluating the test set after every epoch, and times every
   training step with a Keras callback (`on_train_batch_begin/end`; the
   callback forces the step's results to numpy, so the step has finished).
6. Optionally converts the QAT model to a full-int8 TFLite model
   (`--export_tflite PATH`: int8 input, output, activations and weights; the
   QAT ranges, no representative dataset, see `export_tflite`) and measures
   its size, test accuracy and agreement with the Keras QAT model.

Output: the last line of stdout is `TFMOT_RESULT {json}` with the keys
scheme, weight_bits (alias bits), activation_bits, test_accuracy_per_epoch,
final_accuracy, median_step_s (wall; alias median_step_seconds),
median_step_cpu_s (process CPU time, all threads), steps, timed_steps,
peak_rss_mib, versions, and more (see `main`).

Format of `--init_weights` (written by tfmot_runner.save_init_weights): an
`.npz` written by `np.savez`, one array per key `"<layer_name>/<i>"`, where the
arrays `i = 0, 1, ...` of a layer are that layer's `get_weights()` in Keras
order and layout (Conv2D: kernel HWIO, bias; Dense: kernel (in, out), bias;
BatchNormalization: gamma, beta, moving_mean, moving_variance). Keys starting
with `__` are metadata and ignored. Every layer with weights in the model must
be present and every layer in the file must exist, with matching shapes.

Flags use argparse (absl-py 1.4 does work in this venv; argparse keeps the
script free of that pin).
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import time

# The legacy Keras must be chosen before TensorFlow is imported. This script
# only ever runs in the TFMOT venv, never inside mq_keras.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED_TFDS = _REPO.parent / "shared" / "tensorflow_datasets"
if "TFDS_DATA_DIR" not in os.environ and _SHARED_TFDS.is_dir():
    os.environ["TFDS_DATA_DIR"] = str(_SHARED_TFDS)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

RESULT_PREFIX = "TFMOT_RESULT "
INIT_WEIGHTS_FORMAT = "mq_keras.tfmot_init_weights.v1"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="TFMOT QAT peer baseline (runs under tf_keras).")
    p.add_argument("--model", choices=["small_cnn", "resnet20"], default="small_cnn")
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default=None,
                   help="Default: mnist for small_cnn, cifar10 for resnet20.")
    p.add_argument("--scheme", choices=["default8", "nbit", "float"],
                   default="default8")
    p.add_argument("--num_bits", type=int, default=8,
                   help="Weight bits of --scheme=nbit (e.g. 4 or 2).")
    p.add_argument("--activation_bits", type=int, default=8,
                   help="Activation bits of --scheme=nbit.")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum.")
    p.add_argument("--train_limit", type=int, default=0,
                   help="Training examples (0: all); which ones: --subset.")
    p.add_argument("--test_limit", type=int, default=0,
                   help="Test examples (0: all); which ones: --subset.")
    p.add_argument("--subset", choices=["first", "random"], default="first",
                   help="first: the first N in tfds order (tfds 'train[:N]', as "
                        "examples/zoo.py and benchmark.py take them); random: "
                        "examples/mnist.py's prepare() subset, "
                        "np.random.default_rng(seed).permutation(len)[:N].")
    p.add_argument("--steps_per_epoch", type=int, default=0,
                   help="Training steps per epoch (0: one pass over the data); "
                        "the data repeat, reshuffled each pass.")
    p.add_argument("--no_augment", action="store_true",
                   help="CIFAR-10: no crop/flip augmentation.")
    p.add_argument("--seed", type=int, default=0,
                   help="Seed of the data subset, initial weights and batch order.")
    p.add_argument("--init_weights", default=None,
                   help="npz of float starting weights (see the module docstring).")
    p.add_argument("--eval_initial", action="store_true",
                   help="Also report the test accuracy of the float model "
                        "(with --init_weights) before QAT. (The QAT model's own "
                        "accuracy before training is meaningless: TFMOT's input "
                        "quantizer range starts at [0, 0] and its activation "
                        "ranges at [-6, 6] until training steps set them.)")
    p.add_argument("--dump_float_outputs", default=None,
                   help="Write an npz with the test inputs x, labels y and the "
                        "float model's logits (before QAT), to check that the "
                        "architecture and weights match another framework's.")
    p.add_argument("--skip_steps", type=int, default=5,
                   help="First training steps left out of the step-time medians.")
    p.add_argument("--export_tflite", default=None,
                   help="Path: convert the QAT model to full-int8 TFLite there "
                        "and report its size and test accuracy.")
    p.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity.")
    p.add_argument("--smoke", action="store_true",
                   help="Tiny run: first 64 train / 64 test examples, 1 epoch, "
                        "batch 16.")
    args = p.parse_args(argv)
    if args.dataset is None:
        args.dataset = "mnist" if args.model == "small_cnn" else "cifar10"
    if args.smoke:
        args.train_limit, args.test_limit, args.epochs = 64, 64, 1
        args.subset, args.steps_per_epoch = "first", 0
        args.batch_size = min(args.batch_size, 16)
        args.skip_steps = min(args.skip_steps, 1)
    if args.scheme == "default8":
        args.num_bits, args.activation_bits = 8, 8
    if args.scheme == "nbit" and not 2 <= args.num_bits <= 8:
        p.error("--num_bits must be in 2..8 for --scheme=nbit")
    return args


# ---------------------------------------------------------------------------- models

def small_cnn(input_shape=(28, 28, 1), num_classes=10):
    """examples/mnist.py's make_model(), in tf_keras, with the same names."""
    def bn(name):
        return keras.layers.BatchNormalization(momentum=0.9, name=name)

    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(32, 3, name="conv1")(inputs)
    x = keras.layers.ReLU(name="relu1")(bn("bn1")(x))
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(64, 3, name="conv2")(x)
    x = keras.layers.ReLU(name="relu2")(bn("bn2")(x))
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = bn("bn_logits")(keras.layers.Dense(num_classes, name="logits")(x))
    return keras.Model(inputs, outputs, name="mnist_cnn")


def resnet20(input_shape=(32, 32, 3), num_classes=10):
    """CIFAR ResNet20 (MetaQuant's resnet20_cifar), names as in the JSON."""
    def bn(name):
        return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)

    def conv3x3(x, filters, stride, name):
        if stride == 1:
            return keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                       name=name)(x)
        x = keras.layers.ZeroPadding2D(1, name=name + "_pad")(x)
        return keras.layers.Conv2D(filters, 3, strides=stride, padding="valid",
                                   use_bias=False, name=name)(x)

    def block(x, filters, stride, prefix):
        y = conv3x3(x, filters, stride, prefix + "_conv1")
        y = keras.layers.ReLU(name=prefix + "_relu1")(bn(prefix + "_bn1")(y))
        y = bn(prefix + "_bn2")(conv3x3(y, filters, 1, prefix + "_conv2"))
        shortcut = x
        if stride != 1 or x.shape[-1] != filters:
            shortcut = keras.layers.Conv2D(
                filters, 1, strides=stride, use_bias=False,
                name=prefix + "_downsample_0")(x)
            shortcut = bn(prefix + "_downsample_1")(shortcut)
        y = keras.layers.Add(name=prefix + "_add")([y, shortcut])
        return keras.layers.ReLU(name=prefix + "_relu2")(y)

    inputs = keras.Input(input_shape)
    x = conv3x3(inputs, 16, 1, "conv1")
    x = keras.layers.ReLU(name="relu")(bn("bn1")(x))
    for stage, filters in enumerate((16, 32, 64), start=1):
        for i in range(3):
            stride = 2 if (stage > 1 and i == 0) else 1
            x = block(x, filters, stride, f"layer{stage}_{i}")
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = keras.layers.Dense(num_classes, name="fc")(x)
    return keras.Model(inputs, outputs, name="resnet20")


def load_init_weights(model, path):
    """Sets the weights of `model` from an npz (format in the docstring)."""
    groups = {}
    with np.load(path) as z:
        for key in z.files:
            if key.startswith("__"):
                continue
            name, sep, index = key.rpartition("/")
            if not sep or not index.isdigit():
                raise ValueError(f"{path}: key {key!r} is not '<layer_name>/<i>'")
            groups.setdefault(name, {})[int(index)] = z[key]
    weighted = {layer.name: layer for layer in model.layers if layer.weights}
    missing = sorted(set(weighted) - set(groups))
    unexpected = sorted(set(groups) - set(weighted))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match model {model.name!r}: layers missing from the "
            f"file {missing}, layers in the file but not in the model {unexpected}")
    for name, arrays in groups.items():
        layer = weighted[name]
        arrays = [arrays[i] for i in sorted(arrays)]
        expected = [tuple(w.shape) for w in layer.get_weights()]
        got = [tuple(a.shape) for a in arrays]
        if expected != got:
            raise ValueError(f"{path}: layer {name!r} expects shapes {expected}, "
                             f"the file has {got}")
        layer.set_weights(arrays)
    return sorted(groups)


# ------------------------------------------------------------------------------ data

def _subset(x, y, n, seed):
    # Same selection as examples/mnist.py's prepare().
    if n and n < len(x):
        idx = np.random.default_rng(seed).permutation(len(x))[:n]
        x, y = x[idx], y[idx]
    return x, y


def load_data(args):
    import tensorflow_datasets as tfds

    def split(name, limit):
        first = args.subset == "first" and limit
        spec = f"{name}[:{limit}]" if first else name
        x, y = tfds.as_numpy(tfds.load(args.dataset, split=spec,
                                       as_supervised=True, batch_size=-1))
        if args.subset == "random":
            x, y = _subset(x, y, limit, args.seed)
        return x, y.astype("int64")

    return split("train", args.train_limit), split("test", args.test_limit)


def make_datasets(args, train, test):
    """Returns (train_ds, test_ds, (normalised test inputs, test labels))."""
    if args.dataset == "mnist":
        def normalise(x):
            return tf.cast(x, tf.float32) / 255.0
        augment = None
    else:
        mean = tf.constant(CIFAR_MEAN, tf.float32)
        std = tf.constant(CIFAR_STD, tf.float32)

        def normalise(x):
            return (tf.cast(x, tf.float32) / 255.0 - mean) / std

        def crop_flip(x):  # on uint8 pixels: zero padding == torchvision's
            x = tf.pad(x, [[4, 4], [4, 4], [0, 0]])
            x = tf.image.random_crop(x, [32, 32, 3])
            return tf.image.random_flip_left_right(x)
        augment = None if args.no_augment else crop_flip

    x_train, y_train = train
    ds = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    ds = ds.shuffle(len(x_train), seed=args.seed, reshuffle_each_iteration=True)
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, y: (normalise(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    if args.steps_per_epoch:
        ds = ds.repeat()
    train_ds = ds.batch(args.batch_size).prefetch(tf.data.AUTOTUNE)
    x_test, y_test = test
    test_x = normalise(x_test).numpy()
    test_ds = tf.data.Dataset.from_tensor_slices((test_x, y_test)).batch(1000)
    return train_ds, test_ds, (test_x, y_test)


# ----------------------------------------------------------------------------- QAT

def apply_scheme(model, args):
    import tensorflow_model_optimization as tfmot

    qk = tfmot.quantization.keras
    if args.scheme == "float":
        return model
    if args.scheme == "default8":
        return qk.quantize_model(model)
    scheme = qk.experimental.default_n_bit.DefaultNBitQuantizeScheme(
        num_bits_weight=args.num_bits, num_bits_activation=args.activation_bits)
    return qk.quantize_apply(qk.quantize_annotate_model(model), scheme=scheme)


def describe_quantization(qmodel):
    """Names of the wrapped layers and what their quantize configs quantize."""
    rows = []
    for layer in qmodel.layers:
        inner = getattr(layer, "layer", None)
        config = getattr(layer, "quantize_config", None)
        if inner is None or config is None:
            if type(layer).__name__ == "QuantizeLayer":
                rows.append({"layer": layer.name, "kind": "QuantizeLayer (input)"})
            continue
        weights = [w.name.split("/")[-1].split(":")[0]
                   for w, _ in (config.get_weights_and_quantizers(inner) or [])]
        acts = len(config.get_activations_and_quantizers(inner) or [])
        outs = len(config.get_output_quantizers(inner) or [])
        rows.append({"layer": inner.name, "config": type(config).__name__,
                     "weights": weights, "activation_quantizers": acts,
                     "output_quantizers": outs})
    return rows


class StepTimer(keras.callbacks.Callback):
    """Wall and process-CPU time of every training step.

    A plain Callback (no `_supports_tf_logs`) makes tf_keras convert each
    step's logs to numpy before `on_train_batch_end`, so the step has finished
    when the clock is read.
    """

    def __init__(self):
        super().__init__()
        self.wall, self.cpu = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, batch, logs=None):
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.process_time() - self._cpu)


def _accuracy(model, test_ds):
    return float(model.evaluate(test_ds, verbose=0)[1])


def export_tflite(qmodel, path, test, keras_logits):
    """Full-int8 TFLite (int8 input and output); returns a report dict.

    The QAT model's fake-quant ranges give every tensor its int8 scale, so no
    representative dataset is given. Measured (TF 2.21, TFMOT 0.8.1, MNIST
    small_cnn default8): with a `representative_dataset` (and
    TFLITE_BUILTINS_INT8) the converter's calibration overrides the QAT ranges
    and the file agrees with the Keras QAT model on only ~30% of top-1
    predictions (max |dlogit| 4.3); without it, 100% (max |dlogit| 0.05, one
    output step).

    Not every model comes out all-int8: TFMOT has no Dense + BatchNormalization
    fold, so small_cnn's `logits` -> `bn_logits` tail becomes one float32
    FULLY_CONNECTED between DEQUANTIZE and QUANTIZE (BN folded into float
    weights: 64 KB of the 90 KB file); `float32_tensors` counts such tensors.
    ResNet20 converts with none.
    """
    converter = tf.lite.TFLiteConverter.from_keras_model(qmodel)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    flat = converter.convert()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(flat)

    x, y = test
    interpreter = tf.lite.Interpreter(model_content=flat)
    inp = interpreter.get_input_details()[0]
    batch = 100
    try:
        interpreter.resize_tensor_input(inp["index"], [batch, *x.shape[1:]])
        interpreter.allocate_tensors()
    except Exception:  # pylint: disable=broad-except
        batch = 1
        interpreter = tf.lite.Interpreter(model_content=flat)
        interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    logits = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
        q = np.clip(np.round(chunk / in_scale + in_zero), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], q)
        interpreter.invoke()
        o = interpreter.get_tensor(out["index"])[:n].astype(np.float32)
        logits.append((o - out_zero) * out_scale)
    logits = np.concatenate(logits)
    try:  # builtin ops of the file (without XNNPACK's DELEGATE node)
        plain = tf.lite.Interpreter(
            model_content=flat, experimental_op_resolver_type=(
                tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
        plain.allocate_tensors()
        ops = sorted({d["op_name"] for d in plain._get_ops_details()})
        # Activations and weights of a full-int8 model: int8 (biases int32).
        float_tensors = sum(np.dtype(d["dtype"]) == np.float32
                            for d in plain.get_tensor_details())
    except Exception:  # pylint: disable=broad-except
        ops = float_tensors = None
    return {
        "path": str(path), "bytes": len(flat),
        "accuracy": float(np.mean(np.argmax(logits, -1) == y)),
        "top1_agreement_with_keras": float(np.mean(
            np.argmax(logits, -1) == np.argmax(keras_logits, -1))),
        "max_abs_logit_diff": float(np.max(np.abs(logits - keras_logits))),
        "input": str(np.dtype(inp["dtype"]).name),
        "output": str(np.dtype(out["dtype"]).name),
        "ops": ops, "float32_tensors": None if float_tensors is None
        else int(float_tensors),
        "tensor_types": _tensor_types(flat),
    }


def _tensor_types(flat):
    """Storage type counts of the file's tensors, read from the flatbuffer.

    The interpreter reports INT4 tensors as int8; the file tells the truth.
    Measured: with the n-bit scheme (4 and 2 bits alike) the converter stores
    the conv kernels as INT4 (two per byte), so the file shrinks further.
    """
    try:
        from tensorflow.lite.python import schema_py_generated as schema
    except ImportError:
        return None
    names = {v: k for k, v in vars(schema.TensorType).items()
             if not k.startswith("_")}
    model = schema.Model.GetRootAsModel(flat, 0)
    counts = {}
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            name = names.get(graph.Tensors(t).Type(), "?")
            counts[name] = counts.get(name, 0) + 1
    return counts


def versions():
    import importlib.metadata as md

    v = {"python": sys.version.split()[0], "tensorflow": tf.__version__,
         "tf_keras": keras.__version__, "keras_impl": tf.keras.__name__}
    for dist in ("tensorflow-model-optimization", "tensorflow-datasets",
                 "numpy", "absl-py"):
        try:
            v[dist] = md.version(dist)
        except md.PackageNotFoundError:
            v[dist] = None
    return v


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    tf.get_logger().setLevel("ERROR")
    if not tf.keras.__name__.startswith("tf_keras"):
        raise RuntimeError(f"tf.keras is {tf.keras.__name__}, not tf_keras: "
                           "TF_USE_LEGACY_KERAS=1 was not honoured")

    train, test = load_data(args)
    train_ds, test_ds, test_arrays = make_datasets(args, train, test)
    keras.utils.set_random_seed(args.seed)
    model = (small_cnn if args.model == "small_cnn" else resnet20)(
        input_shape=train[0].shape[1:])
    result = {"model": args.model, "dataset": args.dataset,
              "train_examples": int(len(train[0])),
              "test_examples": int(len(test[0]))}
    if args.init_weights:
        load_init_weights(model, args.init_weights)
    result["init_weights"] = args.init_weights
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if args.eval_initial or args.dump_float_outputs:
        model.compile(loss=loss, metrics=["accuracy"])
    if args.eval_initial:
        result["float_initial_accuracy"] = _accuracy(model, test_ds)
    if args.dump_float_outputs:
        np.savez(args.dump_float_outputs, x=test_arrays[0], y=test_arrays[1],
                 logits=model.predict(test_arrays[0], batch_size=1000, verbose=0))

    qmodel = apply_scheme(model, args)
    if args.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(args.lr, momentum=args.momentum)
    else:
        optimizer = keras.optimizers.Adam(args.lr)
    qmodel.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])

    timer = StepTimer()
    keras.utils.set_random_seed(args.seed + 1)
    t_fit = time.perf_counter()
    history = {}
    if args.epochs > 0:
        history = qmodel.fit(train_ds, epochs=args.epochs, validation_data=test_ds,
                             steps_per_epoch=args.steps_per_epoch or None,
                             callbacks=[timer], verbose=args.verbose).history
    train_seconds = time.perf_counter() - t_fit
    per_epoch = [float(a) for a in history.get("val_accuracy", [])]
    final = per_epoch[-1] if per_epoch else _accuracy(qmodel, test_ds)

    skip = min(args.skip_steps, max(len(timer.wall) - 1, 0))
    wall, cpu = timer.wall[skip:], timer.cpu[skip:]
    quantized = args.scheme != "float"
    result.update({
        "scheme": args.scheme,
        "bits": args.num_bits if quantized else 32,
        "weight_bits": args.num_bits if quantized else 32,
        "activation_bits": args.activation_bits if quantized else 32,
        "quantizes_activations": quantized,
        "epochs": args.epochs, "batch_size": args.batch_size,
        "optimizer": args.optimizer, "lr": args.lr, "momentum": args.momentum,
        "seed": args.seed, "augment": args.dataset == "cifar10" and not args.no_augment,
        "test_accuracy_per_epoch": per_epoch,
        "train_accuracy_per_epoch": [float(a) for a in history.get("accuracy", [])],
        "train_loss_per_epoch": [float(a) for a in history.get("loss", [])],
        "final_accuracy": final,
        "median_step_s": statistics.median(wall) if wall else None,
        "median_step_cpu_s": statistics.median(cpu) if cpu else None,
        "steps_per_epoch": args.steps_per_epoch or None, "subset": args.subset,
        "steps": len(timer.wall), "timed_steps": len(wall), "skip_steps": skip,
        "train_seconds": train_seconds,
        "params": int(model.count_params()),
        "quantization": describe_quantization(qmodel) if quantized else [],
    })
    if args.export_tflite:
        keras_logits = qmodel.predict(test_arrays[0], batch_size=1000, verbose=0)
        result["tflite"] = export_tflite(qmodel, args.export_tflite, test_arrays,
                                         keras_logits)
    result["median_step_seconds"] = result["median_step_s"]  # alias
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["versions"] = versions()
    result["seconds"] = time.perf_counter() - t_start
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
