"""The MetaQuant step of the paper (`semantics="paper"`, Eq. 6 and 8).

Unlike the official code (`mq_keras.step_code`), the look-ahead is this
step's real update, and phi's gradient takes the meta network's own output as
`dL/dW_tilde` instead of the STE's.
"""

import tensorflow as tf
from keras import ops

from mq_keras import distribute
from mq_keras.loss_scaling import LossScaling
from mq_keras.step_common import all_finite, global_norm, regularization_grads


def paper_step(ctx, x, y, sample_weight):
    """One MetaQuant step as the paper writes it (Eq. 6 and 8).

    For each trainable quantized kernel `W` with state `g' = dL/dW_hat` and
    `w' = W_tilde` from the previous step, and `lr` the base optimizer's
    learning rate at the start of the step::

        m = M_phi(g', w')                          (one call for all kernels)
        V = W <- optimizer(calib(W) * stop_gradient(m) + dR(W)/dW)
        L = loss(f(x; Q(A(V)), theta))             (theta: every other variable)
        m_now = M_phi(dL/dW_hat, W_tilde)          (from the state m left, if
                                                    carried; else the zero state)
        dL/dphi = (dm/dphi)^T (-lr * calib(W) * calib(V) * m_now)
        phi    <- meta_optimizer(dL/dphi)
        (h, c) <- the state m leaves               (LSTMFC with carried state)
        theta  <- rest_optimizer(dL/dtheta)
        g' = dL/dW_hat;  w' = A(V)

    `W` is the kernel before the update, `V` after it. That is Eq. 8's
    `dL/dphi = sum(calib(V) * m_now * dV/dphi)`, the meta output at the new
    kernels standing in for `dL/dV`, with `dV/dm = -lr * calib(W)` as for SGD
    (the optimizer's own transform is not differentiated). `R` is the
    kernel's own regularizer, if any. `theta` (biases, BatchNorm, ...) is
    updated by a twin of the base optimizer, so that each optimizer counts
    one step per step. The first step (`meta_step = 0`) only records `g'`
    and `w'` and updates nothing.

    A non-finite `m` never reaches the kernels. If the loss, a gradient or
    the new meta state is not finite, phi, theta and the state are left as
    they are (the kernels, updated before the forward pass, keep their
    update) and the step counts in `skipped_steps`. Under tf.distribute
    `g'` is summed over replicas, so every replica computes the same
    `dL/dphi` and keeps the same state.

    Args:
        ctx: the model's `mq_keras.step_common.StepContext`.
        x, y, sample_weight: the batch.

    Returns:
        The logs of the step.
    """
    scaling = LossScaling(ctx.optimizer)
    lr = ops.cast(ctx.optimizer.learning_rate, "float32")
    first = ops.equal(ctx.meta_step, 0)
    active, others, _ = ctx.kernels.partition(ctx.base_variables)
    slots = [ctx.kernels.slots[i] for i in active]
    kernels = [s.variable for _, s in slots]
    phi = ctx.meta_network.trainable_variables
    reg = regularization_grads(kernels)
    saved = ctx.forward_state()

    # The real update of the kernels, from the last step's state.
    app = ctx.meta_application()
    m_all = ctx.kernels.split(app.m)
    ms = [m_all[i] for i in active]
    calibs = [
        s.quantizer.calibration(ops.convert_to_tensor(s.variable), s.channel_axes)
        for _, s in slots
    ]
    g_kernel = [
        c * ops.stop_gradient(m) + (0.0 if r is None else r)
        for c, m, r in zip(calibs, ms, reg)
    ]

    def step_kernels(g_kernel):
        scaling.optimizer.apply_gradients(zip(g_kernel, kernels))

    # A non-finite meta output never reaches the kernels (m, hence
    # finite_m, is the same on every replica).
    finite_m = all_finite(g_kernel)
    distribute.cond(ops.logical_and(finite_m, ops.logical_not(first)),
                    step_kernels, distribute.noop,
                    args=(distribute.for_optimizer(g_kernel),))
    # The look-ahead is the kernel after the real update,
    # V = W - lr * calib * m, so dV/dm = -lr * calib (used for g_phi below).
    looks = [ops.convert_to_tensor(v) + 0.0 for v in kernels]

    latents = {id(v): V for v, V in zip(kernels, looks)}
    with tf.GradientTape() as tape:
        tape.watch(looks)
        y_pred, loss, records = ctx.forward_loss(x, y, sample_weight, latents)
        scaled_loss = scaling.scale(loss)
    w_tildes, g_what, g_look, g_other = ctx.look_ahead_grads(
        tape, scaled_loss, scaling, records, looks, others)

    # Eq. 8: the meta network's output at this step's (dL/dW_hat, W_tilde)
    # stands in for the STE as dL/dW_tilde when differentiating w.r.t. phi.
    # (At the state this step leaves, or the zero state when it is reset.)
    if ctx.carries_state:
        m_now = app.then_apply(ctx.kernels.flat(g_what), ctx.kernels.flat(
            ctx.kernels.meta_inputs(ctx.meta_network, w_tildes)))
    else:
        m_now = ctx.meta_application(g_what, w_tildes, fresh=True).m
    m_now = ctx.kernels.split(m_now)
    # dL/dV := calib(V) * m_now, and dV/dm = -lr * calib(W).
    cotangent = ctx.kernels.cotangent(active, [
        -lr * c * s.quantizer.calibration(V, s.channel_axes) * m_now[i]
        for i, c, (_, s), V in zip(active, calibs, slots, looks)
    ])
    # Built from all-reduced dL/dW_hat: the same on every replica.
    g_phi = app.vjp(cotangent)
    other_pairs = [(g, v) for g, v in zip(g_other, others) if g is not None]

    def update(g_phi, g_other, new_state):
        if ctx.carries_state:  # before phi moves (see mq_keras.step_code)
            app.write_state(ctx.meta_state, new_state)
        ctx.meta_optimizer.apply_gradients(zip(g_phi, phi))
        if other_pairs:
            ctx.rest_optimizer.apply_gradients(
                zip(g_other, [v for _, v in other_pairs])
            )

    finite = ops.logical_and(finite_m, distribute.all_replicas(all_finite(
        [loss] + g_phi + list(g_other) + g_what + g_look + app.state_checks()
    )))
    distribute.cond(
        ops.logical_and(finite, ops.logical_not(first)), update, distribute.noop,
        args=(distribute.for_optimizer(g_phi), [g for g, _ in other_pairs],
              app.new_state or ()),
    )
    ctx.guarded(finite, ctx.record_state, (g_what, w_tildes), saved)
    return ctx.track(x, y, y_pred, sample_weight, loss, finite,
                     global_norm(g_kernel), global_norm(g_look))
