"""Applies a meta network to every quantized weight, whole or in chunks.

A train step needs three things from the meta network `M_phi` over all N
weight elements (rows):

* `m = M_phi(g, w_tilde; s)`, shape (N, 1);
* `dL/dphi = sum_rows (dm/dphi)^T c` for a cotangent `c = dL/dm`, shape (N, 1);
* for recurrent networks, the new state `s'` (N x hidden per state tensor),
  written into the state variables once the step is known to be finite.

Whole (`chunk_size=None`): one call under a tape; the tape keeps every
intermediate, about 16 * N * hidden floats for LSTMFC (measured; 11M weights and
hidden 100: ~70 GB).

Chunked: rows are processed `chunk_size` at a time, one chunk after the other
(each chunk's inputs wait on the previous chunk's result), and the
intermediates of a chunk are dropped as soon as it is done. `dL/dphi` is
recomputed chunk by chunk (forward again, then backward), and the new state
is recomputed and scattered into the state variables chunk by chunk, so the
extra memory is O(chunk_size * hidden) on top of the state variables
themselves (2 * N * hidden floats for LSTMFC). The price is computing the
meta network three times instead of once. The state is read by gathering
rows, never as a whole tensor, so that writing it does not force a copy of
a buffer that a pending read still holds.

What couples rows (GainMLP's per-kernel normalisation) has no trainable
weights: `MetaNetwork.row_inputs` computes it once over all rows, and
`MetaNetwork.call_rows` maps rows of its result independently, chunk by chunk.
"""

import tensorflow as tf
from keras import ops


class MetaApplication:
    """The meta network applied once in a step; see the module docstring.

    Args:
        network: a built `MetaNetwork`.
        grad, w_tilde: (N, 1) inputs.
        state_vars: the state variables (N x hidden each), or `()` for the
            zero state (stateless networks, or `reset_meta_state`).
        chunk_size: rows per chunk, or None for one whole call.

    Attributes:
        m: the network's output (N, 1).
        new_state: the new state tensors (whole), or None (chunked).
        segment_ids, num_segments: kernel of each row (whole calls only).
    """

    def __init__(self, network, grad, w_tilde, state_vars=(), *, chunk_size=None,
                 segment_ids=None, num_segments=1):
        self.network = network
        self.grad = grad
        self.w_tilde = w_tilde
        self.state_vars = tuple(state_vars)
        self.num_rows = int(grad.shape[0])
        self.chunk_size = chunk_size if chunk_size and chunk_size < self.num_rows else None
        self._segments = dict(segment_ids=segment_ids, num_segments=num_segments)
        self._phi = network.trainable_variables
        if self.chunk_size is None:
            state = tuple(ops.convert_to_tensor(v) for v in self.state_vars)
            # The only trainable variables the call reads are phi.
            with tf.GradientTape() as tape:
                self.m, new_state = network.call(
                    grad, w_tilde, state, **self._segments
                )
            self._tape = tape
            self.new_state = tuple(new_state)
        else:
            self.new_state = None
            self._inputs = network.row_inputs(grad, w_tilde, **self._segments)
            self.m = self._chunked_map(
                lambda *rows: network.call_rows(rows[:-1], rows[-1])[0], *self._inputs
            )

    # ------------------------------------------------------------ chunking
    def _bounds(self):
        n, c = self.num_rows, self.chunk_size
        return [(start, min(start + c, n)) for start in range(0, n, c)]

    def _rows(self, start, end, tensors, after):
        """Rows [start, end) of `tensors` and of the state, after `after` ran."""
        with tf.control_dependencies(after):
            rows = [t[start:end] for t in tensors]
            index = tf.range(start, end)
            # A gather (ResourceGather on a plain variable) reads just the rows.
            state = tuple(tf.gather(v.value, index) for v in self.state_vars)
        return rows, state

    def _chunked_map(self, fn, *tensors):
        outs, after = [], []
        for start, end in self._bounds():
            rows, state = self._rows(start, end, tensors, after)
            out = fn(*rows, state)
            outs.append(out)
            after = [out]
        return ops.concatenate(outs, axis=0)

    # ------------------------------------------------------------ results
    def vjp(self, cotangent):
        """`dL/dphi` for `dL/dm = cotangent` (N, 1); zeros where phi is unused."""
        if self.chunk_size is None:
            grads = self._tape.gradient(self.m, self._phi, output_gradients=cotangent)
        else:
            grads = [ops.zeros_like(p) for p in self._phi]
            after = []
            for start, end in self._bounds():
                (*rows, c), state = self._rows(
                    start, end, (*self._inputs, cotangent), after
                )
                with tf.GradientTape() as tape:
                    m, _ = self.network.call_rows(rows, state)
                part = tape.gradient(m, self._phi, output_gradients=c)
                grads = [a if p is None else a + p for a, p in zip(grads, part)]
                after = grads[:1]
        return [ops.zeros_like(p) if g is None else g for g, p in zip(grads, self._phi)]

    def state_checks(self):
        """Tensors whose finiteness the step must check besides `m`.

        Whole: the new state. Chunked: none, as materialising the state is
        what chunking avoids; a NaN in (h, c) reaches `m` (h = o * tanh(c)),
        and |c| grows by at most 1 per step, so it cannot reach inf alone.
        """
        return list(self.new_state) if self.chunk_size is None else []

    def then_apply(self, grad, w_tilde):
        """`M_phi(grad, w_tilde; s')`: the network at the state this step leaves.

        Used by paper semantics; chunked, `s'` is recomputed per chunk.
        """
        if self.chunk_size is None:
            m, _ = self.network.call(grad, w_tilde, self.new_state, **self._segments)
            return m

        now = self.network.row_inputs(grad, w_tilde, **self._segments)
        k = len(self._inputs)

        def fn(*rows):
            *rows, state = rows
            _, new = self.network.call_rows(rows[:k], state)
            return self.network.call_rows(rows[k:], new)[0]

        return self._chunked_map(fn, *self._inputs, *now)

    def write_state(self, state_vars, new_state=None):
        """Assigns the new state to `state_vars`.

        Whole: assigns `new_state` (defaults to `self.new_state`; a train step
        passes it explicitly so that each replica writes its own copy).
        Chunked: recomputes and scatters it chunk by chunk.
        """
        if self.chunk_size is None:
            new_state = self.new_state if new_state is None else new_state
            for var, value in zip(state_vars, new_state):
                var.assign(value)
            return
        after = []
        for start, end in self._bounds():
            rows, state = self._rows(start, end, self._inputs, after)
            _, new = self.network.call_rows(rows, state)
            index = tf.range(start, end)
            after = [var.value.scatter_update(tf.IndexedSlices(value, index))
                     for var, value in zip(state_vars, new)]
