"""Dynamic loss scaling for the MetaQuant train steps (`mixed_float16`).

Under `mixed_float16`, `compile` wraps the base optimizer in a
`keras.optimizers.LossScaleOptimizer`. Its `apply` expects gradients of the
scaled loss, but a MetaQuant step hands the optimizer `calib(W) * m`, which
comes from the meta network, not from the loss. So the steps do the scaling
by hand, with the same rule as Keras:

* gradients are taken of `loss * S` (float16 activations keep small
  gradients above underflow) and divided by `S` in float32;
* a step whose gradients are all finite counts towards growth: after
  `dynamic_growth_steps` such steps in a row, `S <- 2 S`;
* a non-finite step is skipped (as every non-finite step is) and `S <- S / 2`.

The updates themselves go to the inner optimizer.
"""

import keras
from keras import ops


class LossScaling:
    """Loss scaling of `optimizer` if it is a LossScaleOptimizer, else a no-op.

    Attributes:
        optimizer: the optimizer that applies updates (the inner one).
        active: whether a LossScaleOptimizer is present.
    """

    def __init__(self, optimizer):
        self._outer = (optimizer if isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer) else None)
        self.optimizer = optimizer.inner_optimizer if self._outer else optimizer
        self.active = self._outer is not None

    def scale(self, loss):
        """`loss * S`."""
        if not self.active:
            return loss
        return loss * ops.cast(self._outer.dynamic_scale, loss.dtype)

    def unscale(self, grads):
        """`g / S` for each gradient (None stays None)."""
        if not self.active:
            return list(grads)
        scale = ops.cast(self._outer.dynamic_scale, "float32")
        return [None if g is None else ops.cast(g, "float32") / scale for g in grads]

    def on_finite(self):
        """Counts a finite step; doubles S after `dynamic_growth_steps` of them."""
        if not self.active:
            return
        outer = self._outer
        grow = ops.equal(outer.step_counter, outer.dynamic_growth_steps - 1)
        outer.step_counter.assign(ops.where(grow, 0, outer.step_counter + 1))
        outer.dynamic_scale.assign(
            ops.where(grow, outer.dynamic_scale * 2.0, outer.dynamic_scale)
        )

    def on_skip(self):
        """A non-finite step: S <- S / 2, and growth starts over."""
        if not self.active:
            return
        self._outer.step_counter.assign(0)
        self._outer.dynamic_scale.assign(self._outer.dynamic_scale * 0.5)
