"""tf.distribute: mirrored replicas and multi-worker training equal one device.

The training runs in child processes (tests/distributed_worker.py) because
logical CPU devices and MultiWorkerMirroredStrategy must be configured before
TensorFlow does anything else in a process.
"""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parents[1]
# meta network : semantics : BN (synchronised) or not [: meta_chunk_size].
# LSTMFC carries (h, c), so its state must be the same on every replica too;
# chunked, it is scattered into the mirrored state variables chunk by chunk.
CONFIGS = ["multifc:code:bn", "lstmfc:code:nobn", "lstmfc:paper:bn:100",
           "fc_grad:paper:nobn", "ste:code:bn"]
MULTI_WORKER_CONFIG = "lstmfc:code:bn"
# The bound; two replicas sum gradients in another order than one.
ATOL = 1e-5


def _states(npz, key):
    n = sum(1 for k in npz.files if k.startswith(key + "/") and not k.endswith("loss"))
    return [npz[f"{key}/{i}"] for i in range(n)], npz[f"{key}/loss"]


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory, child_env):
    out = tmp_path_factory.mktemp("mirrored") / "r.npz"
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--mode", "mirrored", "--out", str(out)]
        + CONFIGS + ([MULTI_WORKER_CONFIG] if MULTI_WORKER_CONFIG not in CONFIGS else []),
        env=child_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return np.load(out)


def _assert_same(reference, other, what):
    (ref, ref_loss), (got, got_loss) = reference, other
    assert len(ref) == len(got), what
    assert len(ref) > 10, what  # weights, MetaQuant state, optimizer slots
    for i, (a, b) in enumerate(zip(ref, got)):
        np.testing.assert_allclose(b, a, rtol=0, atol=ATOL,
                                   err_msg=f"{what}: state array {i}")
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_mirrored_two_devices_equal_one(mirrored, config):
    one = _states(mirrored, f"{config}/one")
    two = _states(mirrored, f"{config}/two")
    _assert_same(one, two, config)
    # Training moved the weights: the comparison is not between two inits.
    assert any(np.abs(a).max() > 0 for a in one[0])


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_two_processes_equal_one_device(mirrored, tmp_path, child_env):
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = child_env(TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        ))
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "--mode", "multiworker",
             "--out", str(tmp_path / f"w{index}.npz"), MULTI_WORKER_CONFIG],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-worker training did not finish in 300 s")
        assert p.returncode == 0, err[-4000:]
    reference = _states(mirrored, f"{MULTI_WORKER_CONFIG}/one")
    for index in range(2):
        got = _states(np.load(tmp_path / f"w{index}.npz"),
                      f"{MULTI_WORKER_CONFIG}/worker{index}")
        _assert_same(reference, got, f"worker {index}")


def test_mirrored_mixed_float16_skips_non_finite_steps(tmp_path, child_env):
    """Two replicas, mixed_float16 loss scaling, per-replica BN, NaN inputs."""
    out = tmp_path / "mixed.npz"
    configs = ["multifc:code:bn", "lstmfc:paper:bn:100", "ste:code:bn"]
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--mode", "mirrored_mixed", "--out", str(out)]
        + configs, env=child_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = np.load(out)
    for config in configs:
        # The two steps holding a NaN sample are skipped in both epochs, on
        # every replica; the loss scale halves each time (2^15 -> 2^11); no
        # non-finite value lands in a variable.
        assert int(r[f"{config}/skipped"]) == 4, config
        assert float(r[f"{config}/scale"]) == 2.0 ** 11, config
        assert bool(r[f"{config}/finite"]), config
