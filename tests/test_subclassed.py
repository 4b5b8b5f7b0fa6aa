"""Subclassed models, per-layer quantizers, and the README's example of both."""

import pathlib
import re

import keras
import numpy as np
import pytest

import mq_keras as mqk
from mq_keras import tflite_weights

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_example():
    text = README.read_text()
    match = re.search(r"<!-- test: subclassed example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its subclassed example"
    return match.group(1)


def test_readme_subclassed_example_runs(tmp_path):
    code = _readme_example().replace("/tmp/small_cnn.keras", str(tmp_path / "m.keras"))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (our own README)
    q, model, x = scope["qmodel"], scope["model"], scope["x"]
    (wrapper,) = q.wrappers  # the whole subclassed model is one unit
    bits = {s.key: s.quantizer.num_bits for s in wrapper.slots}
    assert len(bits) == 4  # stem, two blocks, logits: nothing missed
    assert bits["stem_kernel"] == 8 and bits["logits_kernel"] == 8
    assert sorted(bits.values()) == [2, 2, 8, 8]
    stats = mqk.summary(q, print_fn=None)
    assert stats["quantized_fraction"] == 1.0
    assert stats["layers"][0]["bits"] == "2/8"
    # The caller's model is untouched: its kernels are still float.
    assert len(np.unique(model.stem.kernel.numpy())) > 100
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), q.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    blob = scope["tflite_bytes"]
    report = mqk.verify_tflite(q, blob, x)
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    # 2-bit kernels as integer codes; 8-bit DoReFa needs 9-bit codes (float32).
    stored = sorted(int(np.abs(c).max()) for c, _, _ in tflite_weights.filter_values(blob).values())
    assert stored == [3, 3]  # the two 2-bit block kernels: codes in {-3, -1, 1, 3}


def test_subclassed_training_moves_kernels_and_bn_statistics():
    scope = {}
    exec(compile(_readme_example().split("x = np.random")[0], "README.md", "exec"), scope)
    model = scope["SmallCNN"](classes=3)
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, size=32)
    model(x[:1])
    model.set_weights([w * 1.0 for w in model.get_weights()])
    q = mqk.quantize_model(model, meta_network="gain_mlp", verbose=False)
    np.testing.assert_allclose(q.predict(x, verbose=0),
                               mqk.strip_model(q).predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    q.compile(optimizer=keras.optimizers.SGD(0.05), meta_optimizer=mqk.PaperAdam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    inner = q.wrappers[0].layer
    before = [s.variable.numpy().copy() for s in q.wrappers[0].slots]
    q.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert all(not np.array_equal(s.variable.numpy(), b)
               for s, b in zip(q.wrappers[0].slots, before))
    assert not np.allclose(inner.norm.moving_mean.numpy(), 0.0)


def test_subclassed_model_needs_a_build_and_a_config():
    scope = {}
    exec(compile(_readme_example().split("x = np.random")[0], "README.md", "exec"), scope)
    with pytest.raises(ValueError, match="built"):
        mqk.quantize_model(scope["SmallCNN"]())

    class NoConfig(keras.Model):
        def __init__(self, units):  # no **kwargs: Keras cannot rebuild it
            super().__init__()
            self.dense = keras.layers.Dense(units)

        def call(self, x):
            return self.dense(x)

    m = NoConfig(3)
    m(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="from_config"):
        mqk.quantize_model(m)


def test_layer_quantizers_mapping_callable_and_errors():
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, name="first")(inp)
    h = keras.layers.Conv2D(4, 3, name="middle")(h)
    out = keras.layers.Dense(3, name="last")(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)

    def bits(q):
        return {w.layer.name: [s.quantizer.num_bits for s in w.slots] for w in q.wrappers}

    q = mqk.quantize_model(model, num_bits=2, layer_quantizers={"first": 8, "last": None},
                           verbose=False)
    assert bits(q) == {"first": [8], "middle": [2]}
    q = mqk.quantize_model(model, num_bits=2, verbose=False,
                           layer_quantizers=lambda layer: 4 if layer.name == "last" else 2)
    assert bits(q) == {"first": [2], "middle": [2], "last": [4]}
    q = mqk.quantize_model(model, kernel_quantizer="uniform", num_bits=4, verbose=False,
                           meta_network="gain_mlp", layer_quantizers={"middle": mqk.Ternary()})
    assert [s.quantizer.name for w in q.wrappers for s in w.slots] == [
        "uniform", "ternary", "uniform"]
    # The meta step calibrates each kernel with its own quantizer.
    q.compile(optimizer=keras.optimizers.SGD(0.01), meta_optimizer=mqk.PaperAdam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")
    q.fit(x, np.arange(16) % 3, batch_size=8, epochs=1, verbose=0)
    assert all(np.isfinite(s.variable.numpy()).all() for w in q.wrappers for s in w.slots)
    with pytest.raises(ValueError, match="not in model"):
        mqk.quantize_model(model, layer_quantizers={"nope": 8})
    with pytest.raises(ValueError, match="bit width"):
        mqk.quantize_model(model, layer_quantizers={"first": 2.5})
    with pytest.raises(ValueError, match="num_bits"):
        mqk.quantize_model(model, layer_quantizers={"first": 99})


def test_per_layer_quantizer_drives_the_meta_step_as_a_global_one_does():
    """The look-ahead and meta gradient calibrate each kernel with its own quantizer."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(3, 3, name="conv")(inp)
    model = keras.Model(inp, keras.layers.Dense(2, name="fc")(keras.layers.Flatten()(h)))
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 1)).astype("float32")
    y = np.arange(16) % 2

    def train(**options):
        keras.utils.set_random_seed(7)
        q = mqk.quantize_model(model, meta_network="fc_grad", verbose=False, **options)
        q.compile(optimizer=keras.optimizers.SGD(0.1), meta_optimizer=mqk.PaperAdam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for _ in range(3):
            q.train_on_batch(x, y)
        return [s.variable.numpy() for w in q.wrappers for s in w.slots]

    direct = train(kernel_quantizer="dorefa", num_bits=2)
    per_layer = train(kernel_quantizer="uniform", num_bits=4,
                      layer_quantizers=lambda layer: mqk.DoReFa(num_bits=2))
    other = train(kernel_quantizer="uniform", num_bits=4)
    for a, b in zip(direct, per_layer):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not all(np.allclose(a, b) for a, b in zip(direct, other))
