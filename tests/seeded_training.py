"""A short seeded training run that prints a hash of its whole state (not a test module).

Run by `tests/test_determinism.py` in child processes:

    python tests/seeded_training.py SEED [SEED ...]

For each seed in the order given, and for each case of `CASES`, it seeds
everything with `keras.utils.set_random_seed(seed)`, builds and trains
`tiny_models.tiny_cnn` quantized to 1-bit DoReFa with `model.fit` on a
shuffled `tf.data` pipeline (no explicit shuffle seed: as a user writes it,
relying on the global seed), and prints one JSON line
`{"case", "seed", "sha256", "variables", "steps"}`. The hash covers every
variable the run owns, in a fixed order: the model's (kernels, biases,
BatchNormalization statistics, MetaQuant state, the meta network and LSTMFC's
carried (h, c), step counters) and those of every optimizer it holds (base
and meta). Several seeds in one process also check that one run leaves
nothing behind that changes the next.
"""

import hashlib
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import mq_keras as mqk  # noqa: E402
from tiny_models import tiny_cnn  # noqa: E402

# The STE (Keras' own step) and two meta networks: MultiFC (stateless) and
# LSTMFC, whose (h, c) is carried from step to step.
CASES = {
    "ste": dict(estimator="ste"),
    "multifc": dict(meta_network="multifc"),
    "lstmfc": dict(meta_network="lstmfc"),
}
N, BATCH, EPOCHS = 64, 8, 4  # 32 steps


def _data():
    # Fixed data: only the seed under test may change a run.
    rng = np.random.default_rng(0)
    return (rng.normal(size=(N, 8, 8, 1)).astype("float32"),
            rng.integers(0, 3, size=N))


def train(case, seed):
    """Trains one case from `seed`; returns the model."""
    keras.utils.set_random_seed(seed)
    q = mqk.quantize_model(tiny_cnn(), kernel_quantizer="dorefa", num_bits=1,
                           verbose=False, **CASES[case])
    q.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
              meta_optimizer=mqk.PaperAdam(1e-3)
              if q.estimator == "metaquant" else None,
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    # Reshuffled every epoch from the global seed set above.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(N).batch(BATCH)
    q.fit(dataset, epochs=EPOCHS, verbose=0)
    return q


def state_variables(q):
    """Every variable of the run: the model's, then each optimizer's by attribute name."""
    variables = list(q.variables)
    optimizers = sorted((k, v) for k, v in vars(q).items()
                        if isinstance(v, keras.optimizers.Optimizer))
    for _, optimizer in optimizers:
        variables += optimizer.variables
    return variables


def state_hash(variables):
    """SHA-256 of the variables' dtypes, shapes and bytes, in the given order.

    Paths are left out: a second model in one process gets uniquified layer
    names, and names are not state.
    """
    digest = hashlib.sha256()
    for v in variables:
        value = np.ascontiguousarray(v.numpy())
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def main(seeds):
    for seed in seeds:
        for case in CASES:
            q = train(case, seed)
            variables = state_variables(q)
            print(json.dumps({
                "case": case, "seed": seed, "sha256": state_hash(variables),
                "variables": [v.path for v in variables],
                "steps": int(q.optimizer.iterations.numpy()),
            }), flush=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]])
