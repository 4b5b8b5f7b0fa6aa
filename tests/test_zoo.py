"""Tests of examples/zoo.py: ResNet20 and its pretrained weights, data, schedules."""

import ast
import json
import os
import pathlib
import sys

import keras
import numpy as np
import pytest

import mq_keras

_REPO = pathlib.Path(__file__).resolve().parents[1]
_EXAMPLES = _REPO / "examples"
if str(_EXAMPLES) not in sys.path:
    sys.path.insert(0, str(_EXAMPLES))

import zoo  # noqa: E402


@pytest.fixture
def pretrained_npz():
    path = zoo.default_pretrained_path()
    if path is None:
        pytest.skip("../shared/pretrained/resnet20_cifar10_fp.npz is not present")
    return path


@pytest.fixture
def cifar10_available():
    path = os.environ.get("TFDS_DATA_DIR")
    if not path or not (pathlib.Path(path) / "cifar10").is_dir():
        pytest.skip("prepared CIFAR-10 (TFDS_DATA_DIR) is not present")
    return path


def _as_pytorch_npz(model, path, *, drop=(), extra=None, reshape=None):
    """Writes `model`'s weights as a PyTorch-named, PyTorch-layout npz."""
    arrays = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = layer.name.replace("_", ".")
        # Names with digits: layer2_0_conv1 -> layer2.0.conv1 (exact for resnet20).
        w = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            for suffix, value in zip(("weight", "bias", "running_mean", "running_var"), w):
                arrays[f"{prefix}.{suffix}"] = value
        elif isinstance(layer, keras.layers.Conv2D):
            arrays[f"{prefix}.weight"] = np.transpose(w[0], (3, 2, 0, 1))
        else:
            arrays[f"{prefix}.weight"] = w[0].T
            arrays[f"{prefix}.bias"] = w[1]
    for key in drop:
        del arrays[key]
    arrays.update(extra or {})
    for key, shape in (reshape or {}).items():
        arrays[key] = np.zeros(shape, np.float32)
    np.savez(path, **arrays)
    return arrays


# ----------------------------------------------------------------- architecture

def test_resnet20_structure():
    model = zoo.resnet20()
    assert model.count_params() == 274042  # the checkpoint's 274,042 values
    assert model.output.shape == (None, 10)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 21
    assert sum(l.kernel_size == (3, 3) for l in convs) == 19
    assert sum(l.kernel_size == (1, 1) for l in convs) == 2
    assert not any(l.use_bias for l in convs)
    # PyTorch padding=1 on the two stride-2 3x3 convs: explicit padding + valid.
    strided = sorted(l.name for l in convs if l.strides == (2, 2))
    assert strided == ["layer2_0_conv1", "layer2_0_downsample_0",
                       "layer3_0_conv1", "layer3_0_downsample_0"]
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 21
    assert all(l.epsilon == 1e-5 and l.momentum == 0.9 for l in bns)


def test_resnet20_layer_names_match_checkpoint_description(shared_dir):
    path = shared_dir / "pretrained" / "resnet20_cifar10_fp.json"
    if not path.exists():
        pytest.skip("resnet20_cifar10_fp.json is not present")
    expected = {k["keras_layer"] for k in json.loads(path.read_text())["keys"]}
    model = zoo.resnet20()
    assert {l.name for l in model.layers if l.weights} == expected


def test_quantize_resnet20_wraps_all_convs_and_fc():
    qmodel = mq_keras.quantize_model(zoo.resnet20(), verbose=False)
    wrappers = qmodel.wrappers
    assert len(wrappers) == 22  # 1 stem + 18 block convs + 2 downsample + fc
    inner = [w.layer for w in wrappers]
    assert sum(isinstance(l, keras.layers.Dense) for l in inner) == 1
    assert sum(isinstance(l, keras.layers.Conv2D) and l.kernel_size == (3, 3)
               for l in inner) == 19
    assert sum(isinstance(l, keras.layers.Conv2D) and l.kernel_size == (1, 1)
               for l in inner) == 2
    left_float = [l for l in qmodel.quantized_model.layers
                  if l.weights and not isinstance(l, mq_keras.MetaQuantWrapper)]
    assert len(left_float) == 21
    assert all(isinstance(l, keras.layers.BatchNormalization) for l in left_float)


def test_small_cnn_is_the_mnist_example_model():
    source = (_EXAMPLES / "mnist.py").read_text()
    fn = next(node for node in ast.parse(source).body
              if isinstance(node, ast.FunctionDef) and node.name == "make_model")
    namespace = {"keras": keras}
    exec(compile(ast.Module([fn], []), "mnist.py", "exec"), namespace)
    ref, ours = namespace["make_model"](), zoo.small_cnn()

    def describe(model):
        out = []
        for layer in model.layers:
            config = dict(layer.get_config())
            config.pop("name")  # auto names (re_lu_3, ...) depend on a counter
            out.append((type(layer).__name__, tuple(layer.output.shape), config))
        return out

    assert describe(ours) == describe(ref)
    assert ours.name == ref.name
    assert [l.name for l in ours.layers if l.weights] == \
        [l.name for l in ref.layers if l.weights]


# ------------------------------------------------------------- pretrained load

def test_pretrained_resnet20_accuracy(pretrained_npz, cifar10_available):
    model = zoo.load_pretrained_resnet20(zoo.resnet20(), pretrained_npz)
    x, y = zoo.cifar10_arrays("test", 2000)
    assert x.shape == (2000, 32, 32, 3) and x.dtype == np.float32
    logits = model.predict(x, batch_size=500, verbose=0)
    acc = float(np.mean(logits.argmax(-1) == y))
    # 91.55% on these 2000 images; 91.50% (9150 / 10000) on the full test set.
    assert acc >= 0.90, acc


def test_load_round_trip(tmp_path):
    source = zoo.resnet20()
    # Non-trivial BN statistics, so that a swapped order would show.
    for layer in source.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([np.random.uniform(0.5, 2.0, w.shape).astype("float32")
                               for w in layer.get_weights()])
    path = tmp_path / "ok.npz"
    _as_pytorch_npz(source, path)
    target = zoo.load_pretrained_resnet20(zoo.resnet20(), path)
    for a, b in zip(source.get_weights(), target.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case, message", [
    ("missing", "missing"),
    ("missing_layer", "no weights for layers"),
    ("extra", "not layers with weights"),
    ("extra_param", "unexpected keys"),
    ("shape", "shape mismatch"),
])
def test_load_rejects_wrong_npz(tmp_path, case, message):
    model = zoo.resnet20()
    path = tmp_path / f"{case}.npz"
    kwargs = {
        "missing": {"drop": ["fc.bias"]},
        "missing_layer": {"drop": [f"layer3.2.bn2.{s}" for s in
                                   ("weight", "bias", "running_mean", "running_var")]},
        "extra": {"extra": {"layer4.0.conv1.weight": np.zeros((1,), np.float32)}},
        "extra_param": {"extra": {"conv1.bias": np.zeros((16,), np.float32)}},
        "shape": {"reshape": {"layer2.0.downsample.0.weight": (32, 16, 3, 3)}},
    }[case]
    _as_pytorch_npz(model, path, **kwargs)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=message):
        zoo.load_pretrained_resnet20(model, path)
    # Nothing was assigned.
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_load_ignores_num_batches_tracked(tmp_path):
    model = zoo.resnet20()
    path = tmp_path / "tracked.npz"
    _as_pytorch_npz(model, path, extra={"bn1.num_batches_tracked": np.array(7)})
    zoo.load_pretrained_resnet20(zoo.resnet20(), path)


# ------------------------------------------------------------------------- data

def test_augment_is_a_seeded_crop_and_flip():
    image = np.random.default_rng(0).integers(1, 256, (32, 32, 3)).astype("uint8")
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    outs = {}
    for seed in range(12):
        a = zoo._augment(image, np.array([seed, 7], "int64")).numpy()
        b = zoo._augment(image, np.array([seed, 7], "int64")).numpy()
        np.testing.assert_array_equal(a, b)  # deterministic for a seed
        # A 32x32 window of the zero-padded image, possibly mirrored.
        windows = [padded[i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        assert any(np.array_equal(a, w) or np.array_equal(a, w[:, ::-1])
                   for w in windows)
        outs[seed] = a
    changed = [not np.array_equal(a, image) for a in outs.values()]
    assert sum(changed) >= 10
    assert len({a.tobytes() for a in outs.values()}) >= 10


def test_cifar10_pipeline(cifar10_available):
    def first_batches(ds, n):
        return [x.numpy() for x, _ in ds.take(n)]

    kw = dict(batch_size=16, augment=True, limit=64)
    a = zoo.cifar10("train", shuffle_seed=3, **kw)
    b = zoo.cifar10("train", shuffle_seed=3, **kw)
    c = zoo.cifar10("train", shuffle_seed=4, **kw)
    epoch1 = first_batches(a, 4)
    for x, y in zip(epoch1, first_batches(b, 4)):
        np.testing.assert_array_equal(x, y)  # same seed: same batches
    assert not np.array_equal(epoch1[0], first_batches(c, 1)[0])
    epoch2 = first_batches(a, 4)  # a new epoch: new order and augmentation
    assert not np.array_equal(epoch1[0], epoch2[0])

    # Augmentation changes the images; labels and order kept without shuffle.
    plain_x, plain_y = next(iter(zoo.cifar10("train", batch_size=64,
                                             augment=False, limit=64)))
    aug_x, aug_y = next(iter(zoo.cifar10("train", batch_size=64, augment=True,
                                         shuffle=False, limit=64)))
    np.testing.assert_array_equal(plain_y.numpy(), aug_y.numpy())
    changed = [not np.array_equal(p, q) for p, q in zip(plain_x.numpy(), aug_x.numpy())]
    assert np.mean(changed) > 0.8

    # The same normalised images as the arrays.
    x, y = zoo.cifar10_arrays("train", 64)
    np.testing.assert_array_equal(x, plain_x.numpy())
    np.testing.assert_array_equal(y, plain_y.numpy())
    raw, _ = zoo.cifar10_arrays("train", 64, normalize=False)
    assert raw.min() >= 0.0 and raw.max() <= 1.0
    np.testing.assert_allclose(
        x, (raw - np.array(zoo.CIFAR10_MEAN)) / np.array(zoo.CIFAR10_STD),
        atol=1e-5)


def test_mnist_arrays(mnist_available):
    x, y = zoo.mnist_arrays("test", 100)
    assert x.shape == (100, 28, 28, 1) and x.dtype == np.float32
    assert y.shape == (100,) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9


# ------------------------------------------------------------------- optimizers

def test_make_optimizer():
    sgd = zoo.make_optimizer("sgd", 0.1, momentum=0.9)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.9
    adam = zoo.make_optimizer("Adam", 1e-3)
    assert isinstance(adam, keras.optimizers.Adam)
    with pytest.raises(ValueError):
        zoo.make_optimizer("rmsprop", 1e-3)
    with pytest.raises(ValueError):
        zoo.make_optimizer("adam", 1e-3, momentum=0.9)


def test_step_decay():
    schedule = zoo.step_decay(1e-3, steps_per_epoch=10)
    lr = lambda step: float(schedule(step))  # noqa: E731
    # Epochs 1-30 (steps 0-299) at 1e-3, epochs 31-60 at 1e-4, then 1e-5.
    assert lr(0) == pytest.approx(1e-3)
    assert lr(299) == pytest.approx(1e-3)
    assert lr(300) == pytest.approx(1e-4)
    assert lr(599) == pytest.approx(1e-4)
    assert lr(600) == pytest.approx(1e-5)
    assert lr(900) == pytest.approx(1e-6)
    # Drives an optimizer.
    opt = zoo.make_optimizer("sgd", schedule)
    assert float(opt.learning_rate) == pytest.approx(1e-3)
