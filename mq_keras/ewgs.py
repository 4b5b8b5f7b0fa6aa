"""EWGS' Hessian-based delta (Lee, Kim & Ham, CVPR 2021), per quantized kernel.

The paper sets each layer's `delta` from the curvature of the loss in the
discretizer's domain:

    delta = max(0, (Tr(H_q) / N) / (3 * std(g_q)))

with `H_q` the Hessian of the loss with respect to the quantized values
`x_q`, `g_q = dL/dx_q` and `N` the kernel's size; the trace is Hutchinson's
estimate `E[v^T H_q v]` over Rademacher vectors `v`. Since
`W_hat = a * x_q + b` (`a = quantizer.discretizer_step`: 2 for DoReFa, the
step `s` for Uniform), `g_q = a * dL/dW_hat` and `v^T H_q v =
(a v)^T H_W_hat (a v)`; both come from a forward pass at the current
weights with double back-propagation through `W_hat`.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mq_keras.layers import training_context
from mq_keras.models import MetaQuantModel


def hessian_deltas(model, x, y, *, loss, samples=16, seed=0):
    """Returns `{(wrapper name, kernel key): delta}` for every quantized kernel.

    Args:
        model: a `MetaQuantModel` whose quantizers define an EWGS domain
            (DoReFa, Uniform).
        x, y: one batch (the paper averages three).
        loss: `loss(y_true, y_pred) -> scalar`, e.g. the compiled loss.
        samples: Rademacher vectors of Hutchinson's estimate.
        seed: their seed.

    The forward pass runs in training mode, as the paper's; variables it
    writes (BatchNormalization statistics) are restored afterwards.
    """
    if not isinstance(model, MetaQuantModel):
        raise ValueError(
            f"hessian_deltas expects a MetaQuantModel, got {type(model).__name__}.")
    slots = [(w, s) for w in model.wrappers for s in w.slots]
    state = model.quantized_model.non_trainable_variables
    saved = [v.numpy() for v in state]
    try:
        with tf.GradientTape(persistent=True) as outer:
            with training_context({}) as ctx:
                with tf.GradientTape() as inner:
                    value = loss(y, model.quantized_model(x, training=True))
            w_hats = [ctx.records[id(s.variable)][1] for _, s in slots]
            grads = inner.gradient(value, w_hats)
        steps = [s.quantizer.discretizer_step(ctx.records[id(s.variable)][0],
                                              s.channel_axes) for _, s in slots]
        rng = np.random.default_rng(seed)
        traces = np.zeros(len(slots))
        for _ in range(samples):
            vs = [ops.convert_to_tensor(a) * tf.constant(
                rng.choice([-1.0, 1.0], size=tuple(g.shape)).astype("float32"))
                for a, g in zip(steps, grads)]
            with outer:
                gv = tf.add_n([ops.sum(g * v) for g, v in zip(grads, vs)])
            hvs = outer.gradient(gv, w_hats)
            traces += [float(ops.sum(h * v)) for h, v in zip(hvs, vs)]
        del outer
    finally:
        for v, value in zip(state, saved):
            v.assign(value)
    out = {}
    for (w, s), g, a, tr in zip(slots, grads, steps, traces / samples):
        g_q = ops.convert_to_numpy(ops.convert_to_tensor(a) * g)
        n = g_q.size
        out[(w.name, s.key)] = max(0.0, (tr / n) / (3.0 * float(np.std(g_q)) + 1e-30))
    return out
