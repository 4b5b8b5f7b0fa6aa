"""meta_chunk_size: the meta network applied in chunks trains exactly as whole."""

import numpy as np
import keras
import pytest

import mq_keras as mqk
from mq_keras.meta_apply import MetaApplication

from tiny_models import tiny_cnn

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _train(chunk, meta, semantics, reset=False, epochs=2):
    keras.utils.set_random_seed(5)
    q = mqk.quantize_model(tiny_cnn(), meta_network=meta, semantics=semantics,
                           reset_meta_state=reset, meta_chunk_size=chunk,
                           verbose=False)
    q.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
              meta_optimizer=mqk.PaperAdam(1e-3), loss=LOSS)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=32)
    q.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return q


@pytest.mark.parametrize("meta,semantics,reset", [
    ("multifc", "paper", False),
    # Per-kernel normalisation computed over all rows, the MLP chunk by chunk.
    ("gain_mlp", "code", False),
    ("lstmfc", "code", False),
    ("lstmfc", "paper", False),
    ("lstmfc", "paper", True),
])
def test_chunked_training_equals_whole(meta, semantics, reset):
    whole = _train(None, meta, semantics, reset)
    # 36 + 432 kernel weights: 50 rows per chunk leaves a ragged last chunk,
    # and the first chunk straddles the two kernels.
    chunked = _train(50, meta, semantics, reset)
    assert chunked.meta_step.numpy() == whole.meta_step.numpy() == 8
    for a, b in zip(whole.variables, chunked.variables):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5,
                                   atol=1e-6, err_msg=a.path)
    for a, b in zip(whole.meta_optimizer.variables, chunked.meta_optimizer.variables):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5,
                                   atol=1e-6, err_msg=a.path)
    if meta == "lstmfc" and not reset:
        assert np.abs(np.asarray(chunked.meta_state[0])).max() > 0


def test_application_vjp_and_state_match_numpy_chunks():
    """m, dL/dphi and the written state of LSTMFC, chunked vs whole."""
    net = mqk.meta_networks.LSTMFC(hidden_size=5, seed=1)
    net.build()
    rng = np.random.default_rng(0)
    n = 23
    g = rng.normal(size=(n, 1)).astype("float32")
    w = rng.uniform(size=(n, 1)).astype("float32")
    cot = rng.normal(size=(n, 1)).astype("float32")
    results = []
    for chunk in (None, 4, 22, 23, 100):
        state = [keras.Variable(rng.normal(size=(n, 5)).astype("float32") * 0 + 0.3)
                 for _ in range(2)]
        app = MetaApplication(net, g, w, state, chunk_size=chunk)
        grads = app.vjp(cot)
        app.write_state(state)
        results.append((np.asarray(app.m), [np.asarray(x) for x in grads],
                        [np.asarray(v) for v in state]))
    m0, g0, s0 = results[0]
    assert np.abs(s0[0] - 0.3).max() > 1e-3  # the state was written
    for m, grads, state in results[1:]:
        np.testing.assert_allclose(m, m0, rtol=1e-6, atol=1e-7)
        for a, b in zip(grads, g0):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(state, s0):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_chunk_size_round_trips_through_keras_file(tmp_path):
    q = _train(64, "lstmfc", "code", epochs=1)
    path = tmp_path / "m.keras"
    q.save(path)
    assert keras.models.load_model(path).meta_chunk_size == 64


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "1024"])
def test_bad_chunk_size_is_refused(bad):
    with pytest.raises(ValueError, match="meta_chunk_size must be a positive int"):
        mqk.quantize_model(tiny_cnn(), meta_network="lstmfc", meta_chunk_size=bad,
                           verbose=False)

