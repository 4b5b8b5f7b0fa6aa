"""The MetaQuant step of the official code (`semantics="code"`, the default).

The step that produced the published tables (METAQUANT.md section 2): the
look-ahead re-applies the previous update, and the fresh meta output enters it
only through a zero-valued term, which is what gives phi its gradient.
"""

import tensorflow as tf
from keras import ops

from mq_keras import distribute
from mq_keras.loss_scaling import LossScaling
from mq_keras.step_common import all_finite, global_norm, regularization_grads, safe_divide


def code_step(ctx, x, y, sample_weight):
    """One MetaQuant step as the official code runs it.

    For each trainable quantized kernel `W` with state `g' = dL/dW_hat`,
    `w' = W_tilde` and `r'` (last update direction) from the previous step,
    `r'_b` for the bias `b` of its layer, and `lr` the base optimizer's
    *current* learning rate::

        m = M_phi(g', w')                          (one call for all kernels)
        u = calib(W) * m
        V = W - lr * (u + stop_gradient(r' - u))   (numerically W - lr * r')
        b_V = b - lr * stop_gradient(r'_b)         (biases of quantized layers)
        L = loss(f(x; Q(A(V)), b_V, theta))        (theta: every other variable)
        dL/dphi = (dm/dphi)^T (-lr * calib(W) * dL/dV)
        phi    <- meta_optimizer(dL/dphi)
        (h, c) <- the state M_phi leaves           (LSTMFC with carried state)
        W      <- optimizer(calib(W) * stop_gradient(m) + dR(W)/dW)
        b      <- optimizer(dL/db_V);  theta <- optimizer(dL/dtheta)
        r = (W_before - W_after) / lr;  r_b likewise (0 where lr = 0)
        g' = dL/dW_hat;  w' = A(V)

    `R` is the kernel's own regularizer, if any (not seen through V); `dL/dV`
    reaches V through the quantizer's STE. The first step (`meta_step = 0`)
    only records `g'`, `w'`, `r' = dL/dV` and `r'_b = dL/db_V` (the raw STE
    gradients) and updates nothing, as the reference does; both optimizers'
    counters therefore start at the second step.

    If the loss, a gradient, `m` or the new meta state is not finite, nothing
    is written and the step counts in `skipped_steps`. Under tf.distribute
    `g'`, `dL/dV` and `dL/db_V` are summed over replicas, so every replica
    computes the same `dL/dphi` and keeps the same state.

    Args:
        ctx: the model's `mq_keras.step_common.StepContext`.
        x, y, sample_weight: the batch.

    Returns:
        The logs of the step.
    """
    scaling = LossScaling(ctx.optimizer)
    lr = ops.cast(ctx.optimizer.learning_rate, "float32")
    first = ops.equal(ctx.meta_step, 0)
    active, others, bias_slots = ctx.kernels.partition(ctx.base_variables)
    slots = [ctx.kernels.slots[i] for i in active]
    kernels = [s.variable for _, s in slots]
    phi = ctx.meta_network.trainable_variables
    saved = ctx.forward_state()
    app = ctx.meta_application()
    m_all = ctx.kernels.split(app.m)
    ms = [m_all[i] for i in active]

    # The look-ahead forward: V for every kernel, b_V for every bias.
    with tf.GradientTape() as tape:
        latents, looks, calibs = {}, [], []
        for (w, s), m in zip(slots, ms):
            W = ops.convert_to_tensor(s.variable)
            calib = s.quantizer.calibration(W, s.channel_axes)
            u = calib * m
            V = W - lr * (u + ops.stop_gradient(s.prev_update - u))
            latents[id(s.variable)] = V
            looks.append(V)
            calibs.append(calib)
        for bs in bias_slots:
            b = ops.convert_to_tensor(bs.variable)
            latents[id(bs.variable)] = b - lr * ops.stop_gradient(bs.prev_update)
        y_pred, loss, records = ctx.forward_loss(x, y, sample_weight, latents)
        scaled_loss = scaling.scale(loss)

    w_tildes, g_what, g_look, g_other = ctx.look_ahead_grads(
        tape, scaled_loss, scaling, records, looks, others)
    n_k = len(kernels)
    # dL/dphi through V = W - lr * calib * m: dL/dm = -lr * calib * dL/dV.
    # Built from all-reduced dL/dV, so the same on every replica.
    g_phi = app.vjp(ctx.kernels.cotangent(
        active, [-lr * c * g for c, g in zip(calibs, g_look)]))
    reg = regularization_grads(kernels)
    g_kernel = [
        c * ops.stop_gradient(m) + (0.0 if r is None else r)
        for c, m, r in zip(calibs, ms, reg)
    ]
    bias_vars = [bs.variable for bs in bias_slots]
    bias_ids = {id(b): i for i, b in enumerate(bias_vars)}
    g_bias = [ops.zeros_like(b) for b in bias_vars]
    for v, g in zip(others, g_other):
        if id(v) in bias_ids and g is not None:
            g_bias[bias_ids[id(v)]] = g
    g_bias = distribute.all_reduce_sum(g_bias)
    # Per-replica partial gradients (the optimizers sum them over replicas).
    other_pairs = [(g, v) for g, v in zip(g_other, others) if g is not None]

    def record_first_step(g_look, g_bias):
        # Iteration 0 updates nothing; its raw STE gradients become r'.
        for (_, s), g in zip(slots, g_look):
            s.prev_update.assign(g)
        for bs, g in zip(bias_slots, g_bias):
            bs.prev_update.assign(g)

    def update(g_phi, g_kernel, g_other, new_state):
        # The state first: chunked, it is recomputed, and must see the
        # phi that produced this step's m.
        if ctx.carries_state:
            app.write_state(ctx.meta_state, new_state)
        ctx.meta_optimizer.apply_gradients(zip(g_phi, phi))
        tracked = kernels + bias_vars
        before = [ops.convert_to_tensor(v) + 0.0 for v in tracked]
        scaling.optimizer.apply_gradients(
            list(zip(g_kernel, kernels))
            + list(zip(g_other, [v for _, v in other_pairs]))
        )
        updates = [safe_divide(b - ops.convert_to_tensor(v), lr)
                   for b, v in zip(before, tracked)]
        for (_, s), r in zip(slots, updates[:n_k]):
            s.prev_update.assign(r)
        for bs, r in zip(bias_slots, updates[n_k:]):
            bs.prev_update.assign(r)

    finite = distribute.all_replicas(all_finite(
        [loss] + g_phi + g_kernel + list(g_other) + g_what + g_look
        + app.state_checks()
    ))
    # Three guarded pieces rather than nested conds: a cond whose branch
    # synchronises replicas must be entered from cross-replica context.
    distribute.cond(ops.logical_and(finite, first), record_first_step,
                    distribute.noop, args=(g_look, g_bias))
    distribute.cond(
        ops.logical_and(finite, ops.logical_not(first)), update, distribute.noop,
        args=(distribute.for_optimizer(g_phi), distribute.for_optimizer(g_kernel),
              [g for g, _ in other_pairs], app.new_state or ()),
    )
    ctx.guarded(finite, ctx.record_state, (g_what, w_tildes), saved)
    return ctx.track(x, y, y_pred, sample_weight, loss, finite,
                     global_norm(g_kernel), global_norm(g_look))
