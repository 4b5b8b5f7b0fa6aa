"""tf.distribute plumbing for `MetaQuantModel`'s train steps.

A MetaQuant step has three kinds of values:

* per-replica partial gradients (of each replica's share of the loss, which
  Keras already scales by `1 / num_replicas`): they sum to the global
  gradient;
* replica-identical values computed from mirrored variables (the meta
  network's output `m`, hence `calib(W) * m`);
* state the step writes (dL/dW_hat, W_tilde, r, the LSTM state), which must
  be the *global* values so that every replica keeps the same state.

Keras optimizers sum what they are given across replicas, so a
replica-identical gradient is handed over divided by the number of replicas.
And a `tf.cond` whose branch synchronises replicas (an optimizer update, an
assignment to a mirrored variable) must run in cross-replica context, which is
what `cond` below does.
"""

import tensorflow as tf
from keras import ops


def num_replicas():
    """Replicas training in sync (1 without a strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def _replica_context():
    ctx = tf.distribute.get_replica_context()
    if ctx is None or num_replicas() == 1:
        return None
    return ctx


def all_reduce_sum(tensors):
    """Sums each tensor over replicas (identity on one replica); keeps `None`s."""
    ctx = _replica_context()
    if ctx is None:
        return list(tensors)
    present = [t for t in tensors if t is not None]
    if not present:
        return list(tensors)
    reduced = iter(ctx.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if t is None else next(reduced) for t in tensors]


def all_replicas(flag):
    """True where `flag` holds on every replica (the same answer on each)."""
    ctx = _replica_context()
    if ctx is None:
        return flag
    failures = ctx.all_reduce(
        tf.distribute.ReduceOp.SUM, ops.cast(ops.logical_not(flag), "float32")
    )
    return ops.equal(failures, 0.0)


def unscale_loss(loss):
    """Undoes Keras' `1 / num_replicas` loss scaling, for logging the global loss."""
    if _replica_context() is None:
        return loss
    return loss * ops.cast(num_replicas(), loss.dtype)


def for_optimizer(replica_identical_grads):
    """Scales replica-identical gradients so that the optimizer's sum restores them.

    With 2 (any power of two) replicas this is exact in floating point.
    """
    n = num_replicas()
    if n == 1:
        return list(replica_identical_grads)
    return [None if g is None else g / n for g in replica_identical_grads]


def cond(pred, true_fn, false_fn, args=()):
    """`true_fn(*args)` if `pred` else `false_fn(*args)`, for any strategy.

    `pred` must be the same on every replica. The branches may apply
    optimizers and assign mirrored variables. Everything a branch reads that
    differs between replicas must come in through `args` (a nest of tensors),
    not a closure: under a merge-call strategy (MirroredStrategy,
    MultiWorkerMirroredStrategy) the branch runs once per replica from
    cross-replica context, which is where TensorFlow allows such a `cond`.
    """
    def branch(fn):
        def run(*a):
            fn(*a)
            return ops.zeros((), "int32")
        return run

    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        ops.cond(pred, lambda: branch(true_fn)(*args),
                 lambda: branch(false_fn)(*args))
        return

    def merge_fn(distribution, pred, args):
        # `pred` agrees on all replicas; take the first replica's.
        local = distribution.experimental_local_results(pred)[0]

        def each(fn):
            def run():
                distribution.extended.call_for_each_replica(branch(fn), args=args)
                return ops.zeros((), "int32")
            return run

        ops.cond(local, each(true_fn), each(false_fn))

    tf.distribute.get_replica_context().merge_call(merge_fn, args=(pred, args))


def is_multi_worker(strategy=None):
    """True under a MultiWorkerMirroredStrategy spanning several workers."""
    strategy = strategy or tf.distribute.get_strategy()
    extended = strategy.extended
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and getattr(extended, "_in_multi_worker_mode", lambda: False)())


def first_local_values(strategy, batch):
    """Replaces each distributed value of `batch` by its first local replica's."""
    def first(v):
        if isinstance(v, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(v)[0]
        return v
    return tf.nest.map_structure(first, batch)


def as_multi_worker_logs(logs):
    """Gives scalar logs a leading axis of 1 under multi-worker training.

    Keras 3.15's `fit` reduces each replica's logs with
    `strategy.reduce("MEAN", v, axis=0)` under MultiWorkerMirroredStrategy,
    which fails for scalars; with shape (1,) it returns the scalar mean.
    """
    if not is_multi_worker():
        return logs
    return {k: ops.reshape(v, (1,)) if len(ops.shape(v)) == 0 else v
            for k, v in logs.items()}


def noop(*args):
    """A branch that does nothing."""
    del args
