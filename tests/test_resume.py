"""Interrupted training resumes exactly where it stopped.

An interrupted-then-resumed run (keras.callbacks.BackupAndRestore, or a
`.keras` file saved mid-training and loaded) must end with the same state as
an uninterrupted one, to 1e-6: weights, BatchNormalization statistics, the
MetaQuant state of every kernel (dL/dW_hat, W_tilde, last update direction),
the LSTM meta network's (h, c), the step counters, the meta network, and the
state of every optimizer the model owns (base, meta, and the "paper"
semantics' twin of the base optimizer).

The resumed model is always a *new* object built with a different seed, so
only the restore can make it equal to the reference.
"""

import functools
import json
import os

import numpy as np
import keras
import pytest

import mq_keras as mqk

from tiny_models import tiny_cnn

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 8
N = 32
STEPS = N // BATCH  # steps per epoch
EPOCHS = 4
STOP_EPOCH = 2  # interrupted after this many full epochs
RTOL, ATOL = 1e-6, 1e-7


def _sgd():
    return keras.optimizers.SGD(0.05, momentum=0.9)


def _adam():
    return keras.optimizers.Adam(1e-2)


# name -> (quantize_model kwargs, base optimizer factory)
# FC-Grad and GainMLP hold the same kinds of state as MultiFC (their
# .keras round trip is in test_models.py); kept out to save test time.
CASES = {
    "multifc": (dict(meta_network="multifc"), _adam),
    "lstmfc": (dict(meta_network="lstmfc"), _adam),  # (h, c) carried
    "ste": (dict(estimator="ste"), _adam),
    "paper_multifc": (dict(meta_network="multifc", semantics="paper"), _sgd),
}


def _data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(N, 8, 8, 1)).astype("float32"),
            rng.integers(0, 3, size=N))


X, Y = _data()


def _build(case, seed):
    kwargs, optimizer = CASES[case]
    keras.utils.set_random_seed(seed)
    q = mqk.quantize_model(tiny_cnn(), verbose=False, **kwargs)
    q.compile(optimizer=optimizer(),
              meta_optimizer=mqk.PaperAdam(1e-3) if q.estimator == "metaquant" else None,
              loss=LOSS)  # no compiled metrics: each costs tracing time
    return q


def _fit(q, x=X, y=Y, **kwargs):
    kwargs.setdefault("epochs", EPOCHS)
    return q.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, **kwargs)


def _optimizers(q):
    """Every optimizer the model holds (base, meta, paper's twin), by attribute."""
    return sorted((k, v) for k, v in vars(q).items()
                  if isinstance(v, keras.optimizers.Optimizer))


def _snapshot(q):
    """All of the model's training state: `(label, value)` in a fixed order."""
    out = [(f"model:{v.path}", np.array(v.numpy())) for v in q.variables]
    for name, opt in _optimizers(q):
        out += [(f"{name}:{v.path}", np.array(v.numpy())) for v in opt.variables]
    counters = {"meta_step": int(q.meta_step.numpy()),
                "optimizer.iterations": int(q.optimizer.iterations.numpy())}
    if q.meta_optimizer is not None:
        counters["meta_optimizer.iterations"] = int(q.meta_optimizer.iterations.numpy())
    return {"state": out, "counters": counters,
            "optimizers": [name for name, _ in _optimizers(q)]}


@functools.lru_cache(maxsize=None)
def _reference(case):
    """The uninterrupted run: EPOCHS epochs in one `fit`."""
    q = _build(case, seed=0)
    _fit(q)
    snap = _snapshot(q)
    if q.estimator == "metaquant":
        # Every step counts in meta_step; the first only records, so both
        # optimizers start counting at the second step.
        assert snap["counters"]["meta_step"] == EPOCHS * STEPS
        assert snap["counters"]["meta_optimizer.iterations"] == EPOCHS * STEPS - 1
        assert {"optimizer", "meta_optimizer"} <= set(snap["optimizers"])
    return snap


def _assert_same_state(q, ref):
    got = _snapshot(q)
    # The step counters first, for a readable failure.
    assert got["counters"] == ref["counters"]
    assert got["optimizers"] == ref["optimizers"]
    assert len(got["state"]) == len(ref["state"]), (
        [k for k, _ in got["state"]], [k for k, _ in ref["state"]])
    for (label, a), (ref_label, b) in zip(got["state"], ref["state"]):
        assert a.shape == b.shape, (label, ref_label)
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL,
                                   err_msg=f"{label} (reference {ref_label})")


class _Interrupt(Exception):
    pass


class _InterruptAfterEpoch(keras.callbacks.Callback):
    """Saves a `.keras` file and raises at the end of epoch `stop` (1-based).

    Listed after BackupAndRestore, so the backup of that epoch is written first
    (CallbackList calls callbacks in list order).
    """

    def __init__(self, stop, keras_path):
        super().__init__()
        self.stop, self.keras_path = stop, keras_path

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.stop:
            self.model.save(self.keras_path)
            raise _Interrupt(f"interrupted after epoch {self.stop}")


class _InterruptAtStep(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            raise _Interrupt(f"interrupted after step {self.step}")


def _metadata(backup_dir):
    with open(os.path.join(backup_dir, "training_metadata.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module", params=list(CASES))
def interrupted(request, tmp_path_factory):
    """Trains a model for EPOCHS epochs and interrupts it after STOP_EPOCH.

    Returns `(case, backup_dir, keras_path)`: BackupAndRestore's directory and
    the `.keras` file written at the same point.
    """
    case = request.param
    root = tmp_path_factory.mktemp(f"resume_{case}")
    backup_dir, keras_path = str(root / "backup"), str(root / "stopped.keras")
    q = _build(case, seed=0)
    with pytest.raises(_Interrupt):
        _fit(q, callbacks=[keras.callbacks.BackupAndRestore(backup_dir),
                           _InterruptAfterEpoch(STOP_EPOCH, keras_path)])
    assert _metadata(backup_dir)["epoch"] == STOP_EPOCH
    assert int(q.meta_step.numpy()) == (STOP_EPOCH * STEPS if q.estimator == "metaquant" else 0)
    return case, backup_dir, keras_path


def test_backup_and_restore_resumes_exactly(interrupted):
    case, backup_dir, _ = interrupted
    ref = _reference(case)
    q = _build(case, seed=99)  # a new object, other initial weights
    assert int(q.meta_step.numpy()) == 0
    hist = _fit(q, callbacks=[keras.callbacks.BackupAndRestore(backup_dir)])
    assert len(hist.history["loss"]) == EPOCHS - STOP_EPOCH  # resumed at epoch 2
    assert int(q.meta_step.numpy()) == ref["counters"]["meta_step"]
    if q.meta_optimizer is not None:
        assert (int(q.meta_optimizer.iterations.numpy())
                == ref["counters"]["meta_optimizer.iterations"])
    _assert_same_state(q, ref)


def test_keras_file_resumes_exactly(interrupted):
    case, _, keras_path = interrupted
    ref = _reference(case)
    keras.utils.set_random_seed(99)
    q = keras.models.load_model(keras_path)
    assert isinstance(q, mqk.MetaQuantModel)
    if q.estimator == "metaquant":
        assert int(q.meta_step.numpy()) == STOP_EPOCH * STEPS
        assert int(q.meta_optimizer.iterations.numpy()) == STOP_EPOCH * STEPS - 1
    _fit(q, epochs=EPOCHS - STOP_EPOCH)
    assert int(q.meta_step.numpy()) == ref["counters"]["meta_step"]
    if q.meta_optimizer is not None:
        assert (int(q.meta_optimizer.iterations.numpy())
                == ref["counters"]["meta_optimizer.iterations"])
    _assert_same_state(q, ref)


# ------------------------------------------------------------- mid-epoch backup
# BackupAndRestore(save_freq=k) writes a backup every k batches and records
# {"epoch", "batch"}, but Keras 3.15 restores only the epoch
# (keras/src/callbacks/backup_and_restore.py, _load_model: sets
# model._initial_epoch and ignores "batch"): a run interrupted mid-epoch
# restarts that epoch from its first batch with the mid-epoch state, replaying
# the batches it had already trained on. What mq_keras must guarantee is that
# the mid-epoch backup holds the whole state, i.e. the resumed run equals an
# uninterrupted run on the same sequence of batches.
MID_CASE = "lstmfc"
SAVE_FREQ = 2
MID_STEP = STOP_EPOCH * STEPS + SAVE_FREQ  # epoch 2 (0-based), after batch 1


@pytest.fixture(scope="module")
def resumed_mid_epoch(tmp_path_factory):
    backup_dir = str(tmp_path_factory.mktemp("resume_mid") / "backup")
    q = _build(MID_CASE, seed=0)
    with pytest.raises(_Interrupt):
        _fit(q, callbacks=[keras.callbacks.BackupAndRestore(backup_dir, save_freq=SAVE_FREQ),
                           _InterruptAtStep(MID_STEP)])
    assert _metadata(backup_dir) == {"epoch": STOP_EPOCH, "batch": SAVE_FREQ - 1}
    q = _build(MID_CASE, seed=99)
    hist = _fit(q, callbacks=[keras.callbacks.BackupAndRestore(backup_dir,
                                                               save_freq=SAVE_FREQ)])
    assert len(hist.history["loss"]) == EPOCHS - STOP_EPOCH
    return q


def test_mid_epoch_backup_restores_whole_state(resumed_mid_epoch):
    # The same batches without interruption: STOP_EPOCH epochs, the first
    # SAVE_FREQ batches of the next one, then (as Keras replays) that epoch and
    # the rest in full.
    q = _build(MID_CASE, seed=0)
    _fit(q, epochs=STOP_EPOCH)
    _fit(q, X[:SAVE_FREQ * BATCH], Y[:SAVE_FREQ * BATCH], epochs=1)
    _fit(q, initial_epoch=STOP_EPOCH)
    replay = _snapshot(q)
    assert replay["counters"]["meta_step"] == EPOCHS * STEPS + SAVE_FREQ
    _assert_same_state(resumed_mid_epoch, replay)


@pytest.mark.xfail(strict=True, reason=(
    "Keras 3.15 BackupAndRestore restores only the epoch of a mid-epoch backup "
    "(backup_and_restore.py _load_model ignores the saved 'batch'), so the "
    "interrupted epoch's first batches are trained twice; not an mq_keras bug"))
def test_mid_epoch_backup_equals_uninterrupted_run(resumed_mid_epoch):
    _assert_same_state(resumed_mid_epoch, _reference(MID_CASE))
