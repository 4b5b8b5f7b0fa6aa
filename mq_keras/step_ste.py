"""The plain straight-through step (`estimator="ste"`), for like-for-like comparisons."""

import tensorflow as tf

from mq_keras import distribute
from mq_keras.loss_scaling import LossScaling
from mq_keras.step_common import all_finite


def ste_step(ctx, x, y, sample_weight):
    """Keras' ordinary train step through the wrappers, skipping non-finite steps.

    Every quantized kernel `W` is used as `W_hat = Q(A(W))`, whose backward is
    the quantizer's straight-through estimator (e.g. DoReFa:
    `dL/dW = calib(W) * dL/dW_hat`; BWN: `dL/dW = alpha * dL/dW_hat * 1[|W| <= 1]`)::

        L = loss(f(x; Q(A(W)), theta))
        v <- optimizer(dL/dv)       for every trainable v (kernels W and the rest, theta)

    If the loss or a gradient is not finite, nothing is updated, BatchNorm's
    statistics are restored and the step counts in `skipped_steps`.

    Args:
        ctx: the model's `mq_keras.step_common.StepContext`.
        x, y, sample_weight: the batch.

    Returns:
        The logs of the step.
    """
    variables = ctx.base_variables
    scaling = LossScaling(ctx.optimizer)
    saved = ctx.forward_state()
    with tf.GradientTape() as tape:
        y_pred = ctx.model(x, training=True)
        loss = ctx.loss(x, y, y_pred, sample_weight)
        scaled_loss = scaling.scale(loss)
    grads = scaling.unscale(tape.gradient(scaled_loss, variables))
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    finite = distribute.all_replicas(all_finite([loss] + list(grads)))

    def apply(grads):
        scaling.optimizer.apply_gradients(zip(grads, [v for _, v in pairs]))

    ctx.guarded(finite, apply, ([g for g, _ in pairs],), saved)
    return ctx.track(x, y, y_pred, sample_weight, loss, finite)
