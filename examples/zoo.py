"""Models, data and optimizers shared by the example and benchmark scripts.

A flag-free module (no absl flags are defined at import), so that scripts and
tests can import it:

* `resnet20`: the CIFAR ResNet20 of the MetaQuant paper as a Keras Functional
  model whose layer names are the PyTorch module paths of the official
  checkpoint ('.' -> '_'), and `load_pretrained_resnet20`, which loads that
  checkpoint (`../shared/pretrained/resnet20_cifar10_fp.npz`, the paper's
  "FP 91.5" start) by name.
* `cifar10` (a `tf.data` pipeline with the paper's normalisation and
  crop + flip augmentation) and `cifar10_arrays` (NumPy arrays).
* `mnist_arrays` and `small_cnn`, the MNIST CNN of `examples/mnist.py`.
* `make_optimizer` and `step_decay` (the paper's "lr x0.1 every 30 epochs").

Data come from tensorflow-datasets. The only side effect of importing this
module is that `TFDS_DATA_DIR` is set to `../shared/tensorflow_datasets`
beside the repository when that directory exists and the variable is unset
(tfds reads it when it is imported, so this happens first).
"""

import math
import os
import pathlib

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED = _REPO.parent / "shared"
_SHARED_TFDS = _SHARED / "tensorflow_datasets"
# Must happen before tensorflow_datasets is imported.
if "TFDS_DATA_DIR" not in os.environ and _SHARED_TFDS.is_dir():
    os.environ["TFDS_DATA_DIR"] = str(_SHARED_TFDS)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# The paper's CIFAR normalisation (utils/dataset.py of the official code),
# applied to images scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                   "frog", "horse", "ship", "truck")

_PRETRAINED_NAME = "resnet20_cifar10_fp.npz"
# PyTorch BatchNorm2d(eps=1e-5, momentum=0.1) == Keras (epsilon=1e-5, momentum=0.9).
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9
# Keys of a PyTorch state_dict that carry no weight Keras needs.
_IGNORED_SUFFIXES = (".num_batches_tracked",)


# --------------------------------------------------------------------- ResNet20

def _bn(name):
    return keras.layers.BatchNormalization(
        epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=name)


def _conv3x3(x, filters, strides, name):
    """3x3 conv, no bias, PyTorch padding=1.

    Stride 1: Keras "same" pads 1 on every side, as PyTorch does. Stride 2:
    "same" would pad only bottom/right on even sizes, so pad explicitly.
    """
    if strides == 1:
        return keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                   name=name)(x)
    x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(filters, 3, strides=strides, padding="valid",
                               use_bias=False, name=name)(x)


def _basic_block(x, filters, strides, name):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU."""
    shortcut = x
    y = _conv3x3(x, filters, strides, f"{name}_conv1")
    y = _bn(f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv3x3(y, filters, 1, f"{name}_conv2")
    y = _bn(f"{name}_bn2")(y)
    if strides != 1 or x.shape[-1] != filters:
        # Option B: 1x1 conv (stride 2, PyTorch padding=0) + BN.
        shortcut = keras.layers.Conv2D(
            filters, 1, strides=strides, padding="valid", use_bias=False,
            name=f"{name}_downsample_0")(x)
        shortcut = _bn(f"{name}_downsample_1")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_relu2")(y)


def resnet20(num_classes=10, *, name="resnet20"):
    """The CIFAR ResNet20 of the MetaQuant paper (He et al. 2016, 0.27M params).

    Stem conv3x3 16 (no bias) + BN + ReLU; three stages of 16, 32 and 64
    channels, each of three BasicBlocks (conv3x3-BN-ReLU-conv3x3-BN, add the
    shortcut, ReLU), the first block of stages 2 and 3 with stride 2 and a
    1x1 conv (stride 2, no bias) + BN shortcut; global average pooling; Dense
    with bias (logits). BatchNormalization uses PyTorch's epsilon 1e-5 and
    momentum 0.1 (Keras momentum 0.9).

    Layer names are the PyTorch module paths of the official code with '.'
    replaced by '_' (`conv1`, `bn1`, `layer2_0_conv1`,
    `layer2_0_downsample_0`, ..., `fc`), so `load_pretrained_resnet20` loads
    the checkpoint by name.

    Args:
        num_classes: number of logits.
        name: name of the Keras model.

    Returns:
        An uncompiled Functional `keras.Model` mapping (N, 32, 32, 3)
        channels_last normalised images to (N, num_classes) logits.
    """
    inputs = keras.Input((32, 32, 3), name="input")
    x = _conv3x3(inputs, 16, 1, "conv1")
    x = _bn("bn1")(x)
    x = keras.layers.ReLU(name="relu")(x)
    in_channels = 16
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(3):
            strides = 2 if block == 0 and filters != in_channels else 1
            x = _basic_block(x, filters, strides, f"layer{stage}_{block}")
            in_channels = filters
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = keras.layers.Dense(num_classes, name="fc")(x)
    return keras.Model(inputs, outputs, name=name)


def resnet18(num_classes=10, *, input_shape=(32, 32, 3), name="resnet18"):
    """ResNet-18 in its CIFAR form (11.2M params), for scale tests.

    Stem conv3x3 64 (no bias) + BN + ReLU (no max pool); four stages of 64,
    128, 256 and 512 channels, two BasicBlocks each, the first block of
    stages 2-4 with stride 2 and a 1x1 conv + BN shortcut; global average
    pooling; Dense with bias. Same blocks as `resnet20`.

    Args:
        num_classes: number of logits.
        input_shape: channels_last image shape.
        name: name of the Keras model.

    Returns:
        An uncompiled Functional `keras.Model`.
    """
    inputs = keras.Input(input_shape, name="input")
    x = _conv3x3(inputs, 64, 1, "conv1")
    x = _bn("bn1")(x)
    x = keras.layers.ReLU(name="relu")(x)
    for stage, filters in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            strides = 2 if block == 0 and stage > 1 else 1
            x = _basic_block(x, filters, strides, f"layer{stage}_{block}")
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = keras.layers.Dense(num_classes, name="fc")(x)
    return keras.Model(inputs, outputs, name=name)


def default_pretrained_path():
    """Path of the shared pretrained ResNet20 npz, or None when it is absent.

    Returns:
        `<repo>/../shared/pretrained/resnet20_cifar10_fp.npz` as a string if
        that file exists, else None.
    """
    path = _SHARED / "pretrained" / _PRETRAINED_NAME
    return str(path) if path.is_file() else None


def _pretrained_arrays(layer, arrays, prefix):
    """Keras weights of `layer` from its PyTorch arrays, in `layer.weights` order."""
    def get(suffix):
        return arrays.pop(f"{prefix}.{suffix}")

    if isinstance(layer, keras.layers.BatchNormalization):
        return [get("weight"), get("bias"), get("running_mean"), get("running_var")]
    if isinstance(layer, keras.layers.Conv2D):
        out = [np.transpose(get("weight"), (2, 3, 1, 0))]  # OIHW -> HWIO
        if layer.use_bias:
            out.append(get("bias"))
        return out
    if isinstance(layer, keras.layers.Dense):
        out = [np.transpose(get("weight"))]  # (out, in) -> (in, out)
        if layer.use_bias:
            out.append(get("bias"))
        return out
    raise ValueError(
        f"Layer {layer.name!r} ({type(layer).__name__}) has weights but no "
        "PyTorch conversion (only Conv2D, Dense and BatchNormalization).")


def load_pretrained_resnet20(model, npz_path):
    """Loads the official MetaQuant ResNet20 checkpoint (npz) into `model`.

    The npz holds the PyTorch state_dict as float32 arrays under the original
    names (`layer2.0.downsample.0.weight`, ...). Each key `<module>.<param>`
    goes to the Keras layer named `<module>` with '.' -> '_'. Conversions:
    conv kernels OIHW -> HWIO (`transpose(2, 3, 1, 0)`), linear weights
    (out, in) -> (in, out), BatchNorm as [gamma, beta, moving_mean,
    moving_variance]. `*.num_batches_tracked` keys are ignored.

    Args:
        model: a model built by `resnet20()` (any float Keras model whose
            layer names and shapes match the checkpoint).
        npz_path: path of the npz (`default_pretrained_path()` for the
            shared copy).

    Returns:
        `model`, with its weights replaced.

    Raises:
        ValueError: a key names no layer of the model (or a layer without
            weights), a layer with weights has no (or an incomplete) set of
            keys, or an array's shape does not match; nothing is assigned
            in that case.
    """
    with np.load(npz_path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files
                  if not k.endswith(_IGNORED_SUFFIXES)}
    prefixes = {k.rsplit(".", 1)[0] for k in arrays}
    by_name = {layer.name: layer for layer in model.layers}
    unknown = sorted(p for p in prefixes
                     if p.replace(".", "_") not in by_name
                     or not by_name[p.replace(".", "_")].weights)
    if unknown:
        raise ValueError(
            f"{npz_path}: keys for modules that are not layers with weights in "
            f"model {model.name!r}: {unknown}")
    keyed = {p.replace(".", "_"): p for p in prefixes}
    missing = sorted(l.name for l in model.layers
                     if l.weights and l.name not in keyed)
    if missing:
        raise ValueError(
            f"{npz_path} has no weights for layers {missing} of model "
            f"{model.name!r}")

    assignments = []
    remaining = dict(arrays)
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = keyed[layer.name]
        try:
            values = _pretrained_arrays(layer, remaining, prefix)
        except KeyError as e:
            raise ValueError(
                f"{npz_path}: key {e.args[0]!r} for layer {layer.name!r} "
                f"({type(layer).__name__}) is missing") from None
        if len(values) != len(layer.weights):
            raise ValueError(
                f"Layer {layer.name!r} has {len(layer.weights)} weights, the "
                f"checkpoint gives {len(values)}")
        for weight, value in zip(layer.weights, values):
            if tuple(weight.shape) != value.shape:
                raise ValueError(
                    f"{npz_path}: shape mismatch for layer {layer.name!r} "
                    f"weight {weight.path!r}: model {tuple(weight.shape)}, "
                    f"checkpoint (converted) {value.shape}")
        assignments.append((layer, values))
    if remaining:
        raise ValueError(
            f"{npz_path}: unexpected keys not used by model {model.name!r}: "
            f"{sorted(remaining)}")
    for layer, values in assignments:
        layer.set_weights([v.astype(np.float32) for v in values])
    return model


# ------------------------------------------------------------------------ data

def prepared_tfds_dir(name):
    """The tfds data dir (`$TFDS_DATA_DIR`) holding a prepared `name`, or None."""
    import glob

    data_dir = os.environ.get("TFDS_DATA_DIR")
    if data_dir and glob.glob(os.path.join(data_dir, name, "*",
                                           "dataset_info.json")):
        return data_dir
    return None


def _tfds():
    import tensorflow_datasets as tfds  # after TFDS_DATA_DIR is set above

    return tfds


def _split(split, limit):
    return f"{split}[:{int(limit)}]" if limit else split


def _normalize(images):
    """uint8 (or [0, 255] float) RGB images -> the paper's normalised float32."""
    x = tf.cast(images, tf.float32) / 255.0
    return (x - tf.constant(CIFAR10_MEAN)) / tf.constant(CIFAR10_STD)


def _augment(image, seed):
    """RandomCrop(32, padding=4) with zero (black) padding + horizontal flip.

    Applied to the uint8 image before normalisation, as torchvision does on
    the PIL image; stateless, so the result depends only on `seed`.
    """
    seeds = tf.random.experimental.stateless_split(seed, 2)
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
    image = tf.image.stateless_random_crop(padded, tf.shape(image), seeds[0])
    return tf.image.stateless_random_flip_left_right(image, seeds[1])


def cifar10(split, *, batch_size, augment, normalize=True, limit=None,
            shuffle_seed=0, shuffle=None, data_dir=None, download=False):
    """CIFAR-10 as a batched `tf.data.Dataset` of (image, label).

    Reads `tfds.load("cifar10")` (tfds order, `cifar10:3.0.2`), keeps the
    first `limit` examples, caches the decoded images in memory, then per
    epoch: shuffles (full buffer), augments each example (RandomCrop 32 with
    zero padding 4 + horizontal flip, on the uint8 image), normalises with
    the paper's mean and std, batches (the last batch may be smaller) and
    prefetches. Shuffling and augmentation are deterministic given
    `shuffle_seed` and differ from epoch to epoch (each iteration of the
    dataset, also under `repeat()`).

    Args:
        split: "train" or "test" (any tfds split string).
        batch_size: batch size.
        augment: apply crop + flip.
        normalize: normalise to the paper's mean/std; False yields float32
            images in [0, 1].
        limit: keep only the first `limit` examples (None or 0: all).
        shuffle_seed: seed of the shuffling and the augmentation.
        shuffle: shuffle every epoch; None (default) shuffles when `augment`.
        data_dir: tfds data dir (default: `$TFDS_DATA_DIR`, else tfds').
        download: let tfds download and prepare the data if absent.

    Returns:
        A `tf.data.Dataset` of (float32 (B, 32, 32, 3), int64 (B,)) batches.
    """
    tfds = _tfds()
    ds = tfds.load("cifar10", split=_split(split, limit), as_supervised=True,
                   data_dir=data_dir, download=download)
    ds = ds.cache()
    shuffle = augment if shuffle is None else shuffle
    if shuffle:
        n = int(ds.cardinality())
        ds = ds.shuffle(n if n > 0 else 50000, seed=shuffle_seed,
                        reshuffle_each_iteration=True)
    if augment:
        seeds = tf.data.Dataset.random(
            seed=shuffle_seed + 1, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (_augment(xy[0], s), xy[1]),
            num_parallel_calls=tf.data.AUTOTUNE)
    if normalize:
        ds = ds.map(lambda x, y: (_normalize(x), y),
                    num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def cifar10_arrays(split, limit=None, *, normalize=True, data_dir=None,
                   download=False):
    """CIFAR-10 as NumPy arrays (no augmentation), for evaluation or calibration.

    Args:
        split: "train" or "test".
        limit: keep only the first `limit` examples (None or 0: all).
        normalize: the paper's mean/std normalisation; False gives [0, 1].
        data_dir: tfds data dir (default: `$TFDS_DATA_DIR`, else tfds').
        download: let tfds download and prepare the data if absent.

    Returns:
        `(x, y)`: float32 (N, 32, 32, 3) images and int64 (N,) labels, in
        tfds order.
    """
    tfds = _tfds()
    x, y = tfds.as_numpy(tfds.load(
        "cifar10", split=_split(split, limit), as_supervised=True,
        batch_size=-1, data_dir=data_dir, download=download))
    if normalize:
        x = ((x.astype(np.float32) / np.float32(255.0)
              - np.asarray(CIFAR10_MEAN, np.float32))
             / np.asarray(CIFAR10_STD, np.float32))
    else:
        x = x.astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32), y.astype(np.int64)


def mnist_arrays(split, limit=None, *, data_dir=None, download=False):
    """MNIST as NumPy arrays scaled to [0, 1] (the preprocessing of mnist.py).

    Args:
        split: "train" or "test".
        limit: keep only the first `limit` examples (None or 0: all).
        data_dir: tfds data dir (default: `$TFDS_DATA_DIR`, else tfds').
        download: let tfds download and prepare the data if absent.

    Returns:
        `(x, y)`: float32 (N, 28, 28, 1) images in [0, 1] and int64 labels.
    """
    tfds = _tfds()
    x, y = tfds.as_numpy(tfds.load(
        "mnist", split=_split(split, limit), as_supervised=True,
        batch_size=-1, data_dir=data_dir, download=download))
    return x.astype(np.float32) / np.float32(255.0), y.astype(np.int64)


def small_cnn():
    """The MNIST CNN of `examples/mnist.py` (`make_model`), layer for layer.

    Conv 32 3x3 -> BN -> ReLU -> MaxPool -> Conv 64 3x3 -> BN -> ReLU ->
    MaxPool -> Flatten -> Dense 10 -> BN (on the logits). BatchNormalization
    momentum 0.9 (Keras default epsilon); convs and Dense with bias.

    Returns:
        An uncompiled Functional `keras.Model` named "mnist_cnn" on
        (N, 28, 28, 1) inputs.
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


# ------------------------------------------------------------------ optimizers

def make_optimizer(name, lr, *, momentum=0.0):
    """A base optimizer by name.

    Args:
        name: "sgd" or "adam".
        lr: learning rate: a float or a `keras.optimizers.schedules`
            schedule (e.g. `step_decay(...)`).
        momentum: SGD momentum (0: plain SGD, the paper's "SGD"); must be 0
            for Adam.

    Returns:
        A `keras.optimizers.SGD` or `keras.optimizers.Adam` (epsilon 1e-8,
        PyTorch's default).

    Raises:
        ValueError: unknown name, or momentum given for Adam.
    """
    name = name.lower()
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=momentum)
    if name == "adam":
        if momentum:
            raise ValueError("momentum is an SGD option; Adam has beta_1.")
        return keras.optimizers.Adam(lr, epsilon=1e-8)
    raise ValueError(f"Unknown optimizer {name!r}; allowed: 'sgd', 'adam'.")


def step_decay(lr, steps_per_epoch, every_epochs=30, factor=0.1, *,
               max_epochs=300):
    """The paper's schedule: `lr`, multiplied by `factor` every `every_epochs`.

    Args:
        lr: initial learning rate.
        steps_per_epoch: optimizer steps per epoch (the schedule counts steps).
        every_epochs: epochs between decays.
        factor: multiplier at each decay.
        max_epochs: decays are placed up to this epoch (the rate stays
            constant after it), and at most until the rate reaches
            `lr * 1e-8`.

    Returns:
        A `keras.optimizers.schedules.PiecewiseConstantDecay` of the
        optimizer's step: `lr` for the first `every_epochs` epochs, then
        `lr * factor`, and so on.

    Raises:
        ValueError: `steps_per_epoch` or `every_epochs` below 1.
    """
    if steps_per_epoch < 1 or every_epochs < 1:
        raise ValueError("steps_per_epoch and every_epochs must be >= 1.")
    count = max(1, (max_epochs - 1) // every_epochs)
    if 0.0 < factor < 1.0:
        # No decays past lr * 1e-8 (a step of 1 epoch would otherwise give
        # hundreds of boundaries of no effect).
        count = min(count, max(1, int(math.log(1e-8) / math.log(factor) + 1e-9)))
    # The optimizer's step counter starts at 0 and PiecewiseConstantDecay
    # switches after `step > boundary`: the first step of epoch
    # `k * every_epochs + 1` (step k * every_epochs * steps_per_epoch) is the
    # first at the decayed rate.
    boundaries = [int(k * every_epochs * steps_per_epoch) - 1
                  for k in range(1, count + 1)]
    values = [float(lr * factor ** k) for k in range(count + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
