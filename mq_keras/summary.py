"""Per-layer report of what is quantized and what it costs to store."""

import math

import keras

from mq_keras.layers import MetaQuantWrapper
from mq_keras.models import MetaQuantModel, iter_layers


def _count(weights):
    return sum(math.prod(w.shape) for w in weights)


def _kernel_count(weights):
    # "Kernel weights": every variable of rank >= 2 (dense/conv kernels,
    # embeddings, recurrent kernels); biases and BN vectors are rank 1.
    # A bias is a bias even where it is 2-D (MultiHeadAttention's per-head
    # biases, GRU's input and recurrent biases).
    return _count([w for w in weights if len(w.shape) >= 2
                   and not w.name.endswith("bias")])


def summary(model, *, print_fn=print):
    """Prints and returns a per-layer table: quantizer, bits, weights, memory.

    Memory counts what a deployed model stores: quantized kernels at their
    bit width plus their float32 scales; everything else (biases, BN
    parameters and statistics, float layers) at 32 bits. MetaQuant's training
    state is not counted.

    Args:
        model: a `MetaQuantModel` (or a model containing `MetaQuantWrapper`s).
        print_fn: where to print lines (`None` prints nothing).

    Returns:
        A dict with `layers` (one dict per layer with weights) and the totals
        `params`, `quantized_params`, `kernel_params` (weights of rank >= 2:
        kernels, embeddings), `quantized_fraction` (quantized_params /
        kernel_params), `float32_bytes`, `bytes` and `compression`
        (float32 bytes / bytes).
    """
    inner = model.quantized_model if isinstance(model, MetaQuantModel) else model
    if not isinstance(inner, keras.Model):
        raise ValueError(
            f"summary expects a MetaQuantModel (from mq_keras.quantize_model) "
            f"or a keras.Model containing MetaQuantWrapper layers, got "
            f"{type(model).__name__}."
        )
    if not inner.built:
        raise ValueError(
            f"Model {inner.name!r} is not built; give it an Input (or call it "
            "on data) before summary."
        )
    rows = []
    for layer in iter_layers(inner):
        if hasattr(layer, "layers") and not isinstance(layer, MetaQuantWrapper):
            continue  # nested model: its layers are listed themselves
        if isinstance(layer, MetaQuantWrapper):
            slots = layer.slots
            kernel_ids = {id(s.variable) for s in slots}
            rest = [w for w in layer.layer.weights if id(w) not in kernel_ids]
            n_q = _count([s.variable for s in slots])
            scales = sum(s.quantizer.num_scales(s.variable.shape, s.channel_axes)
                         for s in slots)
            n_f = _count(rest)
            code_bits = sum(math.prod(s.variable.shape) * s.quantizer.bits_per_weight
                            for s in slots)
            nbytes = math.ceil(code_bits / 8) + 4 * (scales + n_f)
            kinds = sorted({(s.quantizer.name, s.quantizer.num_bits) for s in slots})
            rows.append({
                "name": layer.name, "type": type(layer.layer).__name__,
                # Per-layer quantizers can mix kinds inside one wrapper.
                "quantizer": kinds[0][0] if len(kinds) == 1 else "mixed",
                "bits": (kinds[0][1] if len(kinds) == 1
                         else "/".join(str(b) for b in sorted({k[1] for k in kinds}))),
                "params": n_q + n_f, "quantized_params": n_q,
                "kernel_params": n_q + _kernel_count(rest),
                "float32_bytes": 4 * (n_q + n_f), "bytes": nbytes,
            })
        elif layer.weights:
            n = _count(layer.weights)
            rows.append({
                "name": layer.name, "type": type(layer).__name__,
                "quantizer": "float", "bits": 32, "params": n,
                "quantized_params": 0, "kernel_params": _kernel_count(layer.weights),
                "float32_bytes": 4 * n, "bytes": 4 * n,
            })
    totals = {k: sum(r[k] for r in rows)
              for k in ("params", "quantized_params", "kernel_params",
                        "float32_bytes", "bytes")}
    totals["compression"] = totals["float32_bytes"] / max(totals["bytes"], 1)
    totals["quantized_fraction"] = (
        totals["quantized_params"] / totals["kernel_params"]
        if totals["kernel_params"] else 1.0)
    if print_fn is not None:
        header = f"{'layer':<28}{'type':<20} {'quantizer':<10}{'bits':>5}{'params':>11}{'bytes':>12}"
        print_fn(header)
        print_fn("-" * len(header))
        for r in rows:
            print_fn(f"{r['name']:<28}{r['type']:<20} {r['quantizer']:<10}"
                     f"{str(r['bits']):>5}{r['params']:>11,}{r['bytes']:>12,}")
        print_fn("-" * len(header))
        print_fn(f"total params {totals['params']:,} ({totals['quantized_params']:,} "
                 f"quantized); {totals['bytes']:,} bytes vs {totals['float32_bytes']:,} "
                 f"float32: {totals['compression']:.2f}x smaller")
        print_fn(f"kernel weights quantized: {100 * totals['quantized_fraction']:.1f}%")
    return {"layers": rows, **totals}
