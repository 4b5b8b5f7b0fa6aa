"""Mixed precision: float16/bfloat16 layers, float32 quantizers and meta step."""

import numpy as np
import keras
import pytest

import mq_keras as mqk

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
CASES = [("multifc", "code"), ("lstmfc", "paper"), ("ste", "code")]


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 8, 8, 1)).astype("float32"),
            rng.integers(0, 3, size=n))


def _model():
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(3, name="fc")(x)
    # Logits in float32, as the Keras mixed precision guide recommends.
    out = keras.layers.Activation("linear", dtype="float32", name="logits")(x)
    return keras.Model(inp, out, name="cnn")


def _quantized(meta, semantics, optimizer=None, seed=3):
    keras.utils.set_random_seed(seed)
    ste = meta == "ste"
    q = mqk.quantize_model(
        _model(), meta_network=None if ste else meta, semantics=semantics,
        estimator="ste" if ste else "metaquant", verbose=False,
    )
    q.compile(optimizer=optimizer or keras.optimizers.SGD(0.1),
              meta_optimizer=None if ste else mqk.PaperAdam(1e-3), loss=LOSS)
    return q


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("meta,semantics", CASES)
def test_trains_with_low_precision_layers_and_float32_meta_step(policy, meta, semantics):
    x, y = _data()
    q = _quantized(meta, semantics)
    low = policy.split("_")[1]
    inner = q.quantized_model.get_layer("quant_c1").layer
    assert inner.compute_dtype == low
    if meta != "ste":
        assert q.meta_network.compute_dtype == "float32"
    # Under mixed_float16 compile() adds dynamic loss scaling, which the
    # MetaQuant step applies by hand.
    assert isinstance(q.optimizer, keras.optimizers.LossScaleOptimizer) == (
        policy == "mixed_float16")
    hist = q.fit(x, y, batch_size=16, epochs=3, verbose=0)
    losses = hist.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    for v in q.variables:
        assert v.dtype in ("float32", "int64"), v.path
        assert np.all(np.isfinite(np.asarray(v))), v.path
    for wrapper in mqk.models.wrappers_of(q.quantized_model):
        for kernel in wrapper.quantized_kernels().values():
            assert kernel.dtype == np.float32
    assert q.predict(x[:4], verbose=0).dtype == np.float32


def test_float16_step_matches_float32_step():
    """One MetaQuant step in mixed_float16 is the float32 step up to fp16 noise."""
    x, y = _data(32)
    results = {}
    for name in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(name)
        try:
            q = _quantized("multifc", "code")
            q.fit(x, y, batch_size=32, epochs=3, verbose=0)
            results[name] = [(v.path, np.asarray(v)) for v in q.variables]
        finally:
            keras.mixed_precision.set_global_policy("float32")
    compared = 0
    for (path, a), (_, b) in zip(results["float32"], results["mixed_float16"]):
        if path.endswith(("kernel_prev_grad", "kernel_prev_update", "/kernel")):
            rel = np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12)
            assert rel < 5e-3, (path, rel)
            compared += 1
    assert compared == 6


@pytest.mark.parametrize("meta", ["multifc", "ste"])
def test_dynamic_loss_scale_grows_and_halves_on_overflow(meta):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        opt = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.05), initial_scale=8.0, dynamic_growth_steps=2
        )
        q = _quantized(meta, "code", optimizer=opt)
        x, y = _data(32)
        q.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 4 finite steps
        assert int(q.skipped_steps.numpy()) == 0
        assert float(opt.dynamic_scale.numpy()) == 8.0 * 2 * 2
        before = [np.asarray(v) for v in q.quantized_model.trainable_variables]
        bad = x[:8].copy()
        bad[0, 0, 0, 0] = np.inf
        q.fit(bad, y[:8], batch_size=8, epochs=1, verbose=0)
        assert int(q.skipped_steps.numpy()) == 1
        assert float(opt.dynamic_scale.numpy()) == 16.0
        for v, b in zip(q.quantized_model.trainable_variables, before):
            np.testing.assert_array_equal(np.asarray(v), b)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_meta_network_refuses_a_low_precision_dtype():
    with pytest.raises(ValueError, match="float32"):
        mqk.meta_networks.MultiFC(dtype="mixed_float16")
