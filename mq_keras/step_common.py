"""What the train steps of `MetaQuantModel` share (`step_ste`, `step_code`, `step_paper`).

* `KernelSlots`: every quantized kernel as one (N, 1) column, the layout in
  which the meta network sees them (flatten, split back, cotangents, and which
  kernels this step trains).
* `StepContext`: a `MetaQuantModel` as its steps see it: its optimizers, meta
  network and counters, and the pieces every step runs the same way: the
  look-ahead forward and its gradients, the guard that skips a non-finite
  step, the record of MetaQuant's state and the logs.
* Small tensor helpers: `global_norm`, `safe_divide`, `all_finite`,
  `regularization_grads`.
"""

import functools

import numpy as np
import tensorflow as tf
from keras import ops

from mq_keras import distribute
from mq_keras.layers import training_context
from mq_keras.loss_scaling import LossScaling
from mq_keras.meta_apply import MetaApplication


def global_norm(tensors):
    """`sqrt(sum ||t||^2)` over `tensors`."""
    return ops.sqrt(sum(ops.sum(ops.square(t)) for t in tensors))


def safe_divide(x, lr):
    """`x / lr`, and 0 where `lr = 0` (no step was taken: keep r = 0, not 0/0)."""
    return ops.where(lr > 0, x / ops.where(lr > 0, lr, 1.0), ops.zeros_like(x))


def all_finite(tensors):
    """True if every element of every tensor (None skipped) is finite."""
    checks = [ops.all(ops.isfinite(t)) for t in tensors if t is not None]
    return functools.reduce(ops.logical_and, checks, ops.convert_to_tensor(True))


def regularization_grads(kernels):
    """Gradient of each kernel's own regularizer (not seen through V), or None."""
    grads = []
    for v in kernels:
        reg = getattr(v, "regularizer", None)
        if reg is None:
            grads.append(None)
            continue
        with tf.GradientTape() as tape:
            r = reg(v)
        grads.append(tape.gradient(r, v))
    return grads


class KernelSlots:
    """The quantized kernels of some wrappers, as one (N, 1) column.

    Args:
        wrappers: the `MetaQuantWrapper`s, in model order.

    Attributes:
        wrappers: as given.
        slots: `(wrapper, KernelSlot)` of every kernel, in column order.
        sizes: number of weights of each kernel.
        segment_ids: kernel index of every row of the column.
        num_weights: N, the column's length.
    """

    def __init__(self, wrappers):
        self.wrappers = wrappers
        self.slots = [(w, s) for w in wrappers for s in w.slots]
        self.sizes = [int(np.prod(s.variable.shape)) for _, s in self.slots]
        self.segment_ids = np.repeat(
            np.arange(len(self.sizes), dtype="int32"), self.sizes
        )
        self.num_weights = sum(self.sizes)

    def flat(self, tensors):
        """One tensor shaped like each kernel -> (N, 1)."""
        return ops.concatenate([ops.reshape(t, (-1, 1)) for t in tensors], axis=0)

    def split(self, flat):
        """(N, 1) over all kernels -> one tensor shaped like each kernel."""
        parts = tf.split(flat, self.sizes, axis=0)
        return [ops.reshape(p, s.variable.shape) for p, (_, s) in zip(parts, self.slots)]

    def cotangent(self, active, per_kernel):
        """(N, 1) cotangent of m: `per_kernel[j]` for active slot j, else 0."""
        full = [ops.zeros_like(s.variable) for _, s in self.slots]
        for i, c in zip(active, per_kernel):
            full[i] = c
        return self.flat(full)

    def meta_inputs(self, network, w_tildes):
        """The weight input `network` reads, per kernel (`weight_input`).

        `W_tilde` itself, or for "residual" networks `x - x_q` computed by
        each kernel's own quantizer (bit widths and domains may differ per
        kernel, so only the quantizer knows its grid).
        """
        if network.weight_input != "residual":
            return w_tildes
        return [s.quantizer.residual(w, s.channel_axes)
                for (_, s), w in zip(self.slots, w_tildes)]

    def partition(self, base_variables):
        """Splits what a step trains: active kernel slots, others, biases.

        A slot whose kernel is not trainable (a frozen layer) keeps V = W and
        is neither updated nor given a look-ahead; `trainable` is read when the
        step is traced, as Keras does (recompile after changing it).

        Returns:
            `(active, others, bias_slots)`: indices into `slots` of the
            kernels among `base_variables`; the other base variables; the
            `BiasSlot`s among them (every float bias of a leaf with quantized
            kernels: a Dense's own, an attention projection's, a recurrent
            cell's).
        """
        base_ids = {id(v) for v in base_variables}
        active = [i for i, (_, s) in enumerate(self.slots)
                  if id(s.variable) in base_ids]
        kernel_ids = {id(self.slots[i][1].variable) for i in active}
        others = [v for v in base_variables if id(v) not in kernel_ids]
        bias_slots = [b for w in self.wrappers for b in w.bias_slots
                      if b.prev_update is not None and id(b.variable) in base_ids]
        return active, others, bias_slots


class StepContext:
    """A `MetaQuantModel` as its train steps see it; built for each traced step.

    Args:
        model: the `MetaQuantModel` (its forward pass, variables, optimizers,
            meta network, counters and metrics).
        kernels: its `KernelSlots`.
        compute_loss: `(x, y, y_pred, sample_weight) -> loss` of a training
            forward pass.
        loss_tracker: the metric that averages the loss over an epoch.
        rest_optimizer: the twin of the base optimizer that updates the
            variables other than kernels under `semantics="paper"`, else None.

    Attributes:
        model, kernels, rest_optimizer: as given.
        optimizer: the base optimizer (possibly a LossScaleOptimizer).
        meta_optimizer, meta_network, meta_state, meta_step: the model's.
        base_variables: what the base optimizer may update.
        carries_state: whether the meta network's (h, c) is carried from one
            step to the next (recurrent network, no `reset_meta_state`).
    """

    def __init__(self, model, *, kernels, compute_loss, loss_tracker,
                 rest_optimizer=None):
        self.model = model
        self.kernels = kernels
        self.rest_optimizer = rest_optimizer
        self._compute_loss = compute_loss
        self._loss_tracker = loss_tracker
        self.optimizer = model.optimizer
        self.meta_optimizer = model.meta_optimizer
        self.meta_network = model.meta_network
        self.meta_state = model.meta_state
        self.meta_step = model.meta_step
        self.base_variables = model.base_variables
        self.carries_state = bool(model.meta_state) and not model.reset_meta_state

    def loss(self, x, y, y_pred, sample_weight):
        """The compiled loss of a training forward pass."""
        return self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)

    def meta_application(self, grads=None, w_tildes=None, fresh=False):
        """The meta network applied to all kernels (`mq_keras.meta_apply`).

        Defaults to the stored (dL/dW_hat, W_tilde) of the last step and the
        carried state; `fresh=True` uses the zero state.
        """
        kernels = self.kernels
        if grads is None:
            grads = [s.prev_grad for _, s in kernels.slots]
            w_tildes = [s.prev_w_tilde for _, s in kernels.slots]
        state = self.meta_state if (self.carries_state and not fresh) else ()
        w_inputs = kernels.meta_inputs(self.meta_network, w_tildes)
        return MetaApplication(
            self.meta_network, kernels.flat(grads), kernels.flat(w_inputs), state,
            chunk_size=self.model.meta_chunk_size,
            segment_ids=ops.convert_to_tensor(kernels.segment_ids),
            num_segments=len(kernels.sizes),
        )

    def forward_state(self):
        """Copies of the variables a training forward pass writes (BN statistics).

        MetaQuant's own state is written only after the step is known to be
        finite, so it is left out (it is large: three floats per weight).
        """
        own = {id(v) for w in self.kernels.wrappers for v in w.state_variables}
        variables = [v for v in self.model.quantized_model.non_trainable_variables
                     if id(v) not in own]
        return variables, [ops.convert_to_tensor(v) + 0 for v in variables]

    def forward_loss(self, x, y, sample_weight, latents):
        """The training forward pass with `latents` quantized in place of variables.

        Returns:
            `(y_pred, loss, records)`, `records` mapping id(kernel variable) to
            its `(W_tilde, W_hat)` (`mq_keras.layers.training_context`).
        """
        with training_context(latents) as context:
            y_pred = self.model(x, training=True)
        loss = self.loss(x, y, y_pred, sample_weight)
        return y_pred, loss, context.records

    def look_ahead_grads(self, tape, scaled_loss, scaling, records, looks, others):
        """Gradients of the look-ahead forward (both semantics).

        Returns `(w_tildes, g_what, g_look, g_other)`: W_tilde of every slot;
        dL/dW_hat of every slot and dL/dV of every look-ahead, summed over
        replicas (in one all-reduce) as they become MetaQuant state; and the
        per-replica gradients of the other variables (None where unused).
        """
        slots = self.kernels.slots
        w_tildes = [records[id(s.variable)][0] for _, s in slots]
        w_hats = [records[id(s.variable)][1] for _, s in slots]
        grads = scaling.unscale(tape.gradient(scaled_loss, w_hats + looks + others))
        n_s, n_k = len(w_hats), len(looks)
        reduced = distribute.all_reduce_sum(
            [ops.zeros_like(t) if g is None else g
             for g, t in zip(grads[:n_s + n_k], w_hats + looks)]
        )
        return w_tildes, reduced[:n_s], reduced[n_s:], grads[n_s + n_k:]

    def record_state(self, g_what, w_tildes):
        """Stores this step's dL/dW_hat and W_tilde for the next meta step."""
        for (_, s), g, wt in zip(self.kernels.slots, g_what, w_tildes):
            s.prev_grad.assign(g)
            s.prev_w_tilde.assign(ops.cast(wt, "float32"))
        self.meta_step.assign_add(1)

    def guarded(self, finite, step, args, saved):
        """Runs `step(*args)` if `finite`; else restores `saved` and counts a skip.

        `finite` must agree on all replicas; `args` carries every per-replica
        tensor `step` needs (see `mq_keras.distribute.cond`); `saved` is what
        `forward_state` returned before the forward pass.
        """
        variables, values = saved
        scaling = LossScaling(self.optimizer)
        skipped_steps = self.model.skipped_steps

        def run(args, values):
            del values
            step(*args)
            scaling.on_finite()

        def skip(args, values):
            del args
            # The forward already moved BN's statistics towards NaN: undo it.
            for v, value in zip(variables, values):
                v.assign(value)
            skipped_steps.assign_add(1)
            scaling.on_skip()

        distribute.cond(finite, run, skip, args=(tuple(args), tuple(values)))

    def track(self, x, y, y_pred, sample_weight, loss, finite,
              meta_norm=None, ste_norm=None):
        """Updates the metrics and returns the step's logs.

        `meta_norm / ste_norm` (the norms of the meta gradient and of the
        STE's) is averaged as `meta_grad_ratio` where given.
        """
        model = self.model
        # A skipped step does not enter the epoch averages (weight 0, value 0:
        # a NaN times 0 would still poison a Mean).
        batch = ops.cast(tf.shape(tf.nest.flatten(x)[0])[0], "float32")
        weight = ops.where(finite, 1.0, 0.0)
        safe_loss = ops.where(finite, distribute.unscale_loss(loss), 0.0)
        self._loss_tracker.update_state(safe_loss, sample_weight=batch * weight)
        if meta_norm is not None:
            model.meta_loss_tracker.update_state(safe_loss, sample_weight=weight)
            ratio = meta_norm / ops.maximum(ste_norm, 1e-30)
            model.grad_ratio_tracker.update_state(
                ops.where(finite, ratio, 0.0), sample_weight=weight
            )
        logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs = dict(logs)
        # An epoch whose every step was skipped has no loss to average: say
        # NaN (which TerminateOnNaN and any finiteness check see), not the
        # empty Mean's 0.0, which reads as a perfect fit.
        trackers = [("loss", self._loss_tracker)]
        if meta_norm is not None:
            trackers += [("meta_loss", model.meta_loss_tracker),
                         ("meta_grad_ratio", model.grad_ratio_tracker)]
        for key, tracker in trackers:
            if key in logs:
                logs[key] = ops.where(tracker.count > 0, logs[key], float("nan"))
        logs["skipped_steps"] = model.skipped_steps
        return logs
