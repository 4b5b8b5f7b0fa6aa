"""Rewrite a float TFLite model so its quantized kernels are stored as exact integer codes.

TFLite's own weight quantization (dynamic range) rescales every kernel to a
127-step grid and runs hybrid kernels that also quantize activations on the
fly, so a k-bit kernel neither keeps its values nor its float arithmetic. This
module takes the *float* flatbuffer of a stripped model instead (its kernels
already hold `Q(A(W))`, with BatchNorm folded in by the converter) and, for
each filter of CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, TRANSPOSE_CONV and
CONV_3D, and each constant operand of BATCH_MATMUL (attention projections)
and GATHER (embedding tables):

1. finds, per output channel `c`, the smallest integer `M_c` such that every
   value is an integer multiple of `s_c = max|v_c| / M_c` (to float rounding);
   every k-bit grid we train has one: DoReFa `M = 2^k - 1`, uniform
   `M = 2^(k-1) - 1`, BWN and ternary `M = 1`; a BatchNorm folded in per
   channel only rescales `s_c`;
2. stores the codes `q = round(v / s_c)` with per-channel scales `s_c` and
   zero points 0, as int8 (the default), or, when int4 is allowed and every
   |q| <= 7, as int4 (two codes a byte, low nibble first);
3. inserts a builtin DEQUANTIZE op that turns them back into the float filter,
   so the op itself runs in float exactly as before. With constant input the
   op's output is a constant.

Why int8 by default: on CPU, LiteRT and tf.lite hand the graph to the XNNPACK
delegate, which expands the DEQUANTIZE of a constant FP16 or INT8 tensor once,
when the model loads, and then runs the float op on the expanded filter
(`Delegate::PrepareOpsToDelegate` in tensorflow/lite/delegates/xnnpack/
xnnpack_delegate.cc takes only those two input types). INT4 is not expanded:
the filter then reaches the op as a computed tensor, which XNNPACK's
convolutions do not take, so each convolution fed by int4 codes runs in
TFLite's own kernels instead. Measured (LiteRT 2.3, batch 1, one thread):
int8 codes run at float speed; int4 codes take 2.6-4.6x float latency on
the three CNNs of the README (ResNet20 7.5x in another run). Also tried for
int4, none fast: one scale per tensor instead of per channel (same
latency); 2-D codes with a RESHAPE to the filter shape after DEQUANTIZE
(same or slower); int4 filters fed to the op without DEQUANTIZE (the hybrid
kernels then quantize the activations on the fly: slow and no longer
exact). A FULLY_CONNECTED fed by int4 codes is delegated, as an op with a
run-time filter: float speed for the small classifier of the main job's
CNN, 1.7x float on a 784-1024-1024-10 MLP.

A filter that is not on such a grid (a layer left float) is left as it is,
and so is one that needs `M_c > 127`: 8-bit DoReFa's 256 odd levels
(-255..255)/255 need 9-bit codes, and TFLite's DEQUANTIZE takes per-channel
int16 nowhere ("Type 7 not supported for per-channel", TF 2.21), so such a
kernel stays float32 and the report says so.
"""

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

# Builtin op -> (index of the filter input, its output-channel axis).
_FILTER_OPS = {
    schema.BuiltinOperator.CONV_2D: (1, 0),
    schema.BuiltinOperator.DEPTHWISE_CONV_2D: (1, 3),
    schema.BuiltinOperator.FULLY_CONNECTED: (1, 0),
    schema.BuiltinOperator.TRANSPOSE_CONV: (1, 0),
}
# Ops whose constant input can be stored as codes too ("weights" mode only;
# the int8 regrid above keeps to the converter's per-channel filters). Axis -1:
# the tensor's last axis (CONV_3D filters are DHWIO, an Embedding's table is
# (vocab, features), a MatMul's right operand (in, out)).
_CODE_OPS = {
    **_FILTER_OPS,
    schema.BuiltinOperator.CONV_3D: (1, -1),
    schema.BuiltinOperator.BATCH_MATMUL: (1, -1),
    schema.BuiltinOperator.GATHER: (0, -1),
}
_MAX_M = 255
_INT_TOL = 1e-3  # |v * M / a - round(.)|: wrong M gives >= 1/255; rounding ~1e-6
_MATCH_RTOL = 1e-6


_FILE_IDENTIFIER = b"TFL3"  # bytes 4..8 of every TFLite flatbuffer


def check_flatbuffer(data, name="flatbuffer"):
    """Returns `data` as bytes, or raises a clear error if it is no TFLite model.

    Raises:
        TypeError: `data` is not bytes-like (a path, a string, None).
        ValueError: `data` lacks TFLite's file identifier.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(
            f"{name} must be the bytes of a TFLite model (what "
            "convert_to_tflite returns, or open(path, 'rb').read()), got "
            f"{type(data).__name__} {data!r:.60}."
        )
    if len(data) < 8 or data[4:8] != _FILE_IDENTIFIER:
        raise ValueError(
            f"{name} is not a TFLite model ({len(data)} bytes without the "
            f"{_FILE_IDENTIFIER.decode()!r} file identifier); pass the bytes "
            "that convert_to_tflite returns or a .tflite file's contents."
        )
    return data


def _read_model(flatbuffer, name="flatbuffer"):
    data = check_flatbuffer(flatbuffer, name)
    return flatbuffer_utils.read_model_from_bytearray(bytearray(data))


def _op_code(model, op):
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def grid_codes(values, axis):
    """Returns `(codes, scales, max_code)` with `values ~= scales * codes`, or None.

    Args:
        values: float32 array, a filter tensor.
        axis: its output-channel axis.

    Returns:
        `codes` (int32, same shape), `scales` (float32, one per channel) and the
        largest |code|, or None when some channel is on no grid with M <= 255.
    """
    v = np.moveaxis(np.asarray(values, np.float32), axis, 0)
    flat = v.reshape(v.shape[0], -1).astype(np.float64)
    amax = np.abs(flat).max(axis=1)
    m = np.zeros(len(flat), np.int64)
    m[amax == 0] = 1
    safe = np.where(amax > 0, amax, 1.0)[:, None]
    for cand in range(1, _MAX_M + 1):
        todo = m == 0
        if not todo.any():
            break
        r = flat[todo] * cand / safe[todo]
        ok = np.abs(r - np.round(r)).max(axis=1) <= _INT_TOL
        m[np.flatnonzero(todo)[ok]] = cand
    if (m == 0).any():
        return None
    scales = np.where(amax > 0, amax / m, 1.0).astype(np.float32)
    codes = np.round(flat / scales[:, None].astype(np.float64)).astype(np.int32)
    decoded = codes * scales[:, None]
    if not np.allclose(decoded, flat, rtol=_MATCH_RTOL, atol=0):
        return None
    codes = np.moveaxis(codes.reshape(v.shape), 0, axis)
    return codes, scales, int(m.max())


def _add_buffer(model, data):
    buf = schema.BufferT()
    buf.data = np.frombuffer(data, np.uint8)
    model.buffers.append(buf)
    return len(model.buffers) - 1


def _dequantize_opcode(model):
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.DEQUANTIZE:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = schema.BuiltinOperator.DEQUANTIZE
    code.deprecatedBuiltinCode = schema.BuiltinOperator.DEQUANTIZE
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _pack_int4(codes):
    flat = codes.astype(np.int16).ravel()
    if len(flat) % 2:
        flat = np.append(flat, 0)
    lo, hi = flat[0::2] & 0xF, flat[1::2] & 0xF
    return ((hi << 4) | lo).astype(np.uint8).tobytes()


def _unpack_int4(data, count):
    b = np.frombuffer(data, np.uint8).astype(np.int16)
    nib = np.stack([b & 0xF, b >> 4], axis=1).ravel()[:count]
    return np.where(nib > 7, nib - 16, nib).astype(np.int8)


def op_names(flatbuffer):
    """Names of the operators of every subgraph, in execution order."""
    model = _read_model(flatbuffer)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items()
             if not k.startswith("_")}
    out = []
    for sg in model.subgraphs:
        for op in sg.operators:
            code = model.operatorCodes[op.opcodeIndex]
            builtin = _op_code(model, op)
            if builtin == schema.BuiltinOperator.CUSTOM:
                custom = code.customCode
                out.append(custom.decode() if isinstance(custom, bytes) else str(custom))
            else:
                out.append(names[builtin])
    return out


def store_kernels_as_codes(flatbuffer, *, allow_int4=False):
    """Returns `(new_flatbuffer, report)` with grid kernels stored as int codes.

    Args:
        flatbuffer: bytes of a float TFLite model.
        allow_int4: store kernels whose codes fit in [-7, 7] as int4 (about
            half the bytes of int8, but convolutions fed by int4 codes leave
            the XNNPACK delegate and run several times slower; see the module
            docstring). Default: int8 codes everywhere.

    Returns:
        The rewritten model as bytes, and a list with one dict per filter:
        `name`, `op`, `shape`, `dtype` ("int4", "int8", or "float32..." when left
        float), `max_code` (largest |code|, None when on no grid), `channels`.
    """
    model = _read_model(flatbuffer)
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items()
                if not k.startswith("_")}
    report = []
    for sg in model.subgraphs:
        done = {}
        new_ops = []
        for op in sg.operators:
            spec = _CODE_OPS.get(_op_code(model, op))
            if spec is None:
                continue
            idx, axis = spec
            t_index = int(op.inputs[idx])
            if t_index < 0:
                continue
            if t_index in done:
                op.inputs[idx] = done[t_index]
                continue
            tensor = sg.tensors[t_index]
            if tensor.shape is None or len(tensor.shape) == 0:
                continue
            axis %= len(tensor.shape)
            buf = model.buffers[tensor.buffer]
            name = tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name
            entry = {"name": name, "op": op_names[_op_code(model, op)],
                     "shape": [int(d) for d in tensor.shape], "dtype": "float32",
                     "max_code": None, "channels": int(tensor.shape[axis])}
            report.append(entry)
            if tensor.type != schema.TensorType.FLOAT32 or buf.data is None:
                continue
            values = np.frombuffer(bytes(buf.data), np.float32).reshape(tensor.shape)
            found = grid_codes(values, axis)
            if found is None:
                continue
            codes, scales, max_code = found
            entry["max_code"] = max_code
            if max_code > 127:
                entry["dtype"] = "float32 (needs 9-bit codes)"
                continue
            int4 = allow_int4 and max_code <= 7
            qt = schema.TensorT()
            qt.shape = np.array(tensor.shape, np.int32)
            qt.type = schema.TensorType.INT4 if int4 else schema.TensorType.INT8
            qt.name = (name + "/codes").encode()
            qt.buffer = _add_buffer(
                model, _pack_int4(codes) if int4 else codes.astype(np.int8).tobytes()
            )
            q = schema.QuantizationParametersT()
            q.scale = scales.astype(np.float32)
            q.zeroPoint = np.zeros(len(scales), np.int64)
            q.quantizedDimension = axis
            qt.quantization = q
            sg.tensors.append(qt)
            q_index = len(sg.tensors) - 1
            # The float tensor keeps its index and consumers; it now comes from
            # DEQUANTIZE instead of a constant buffer.
            buf.data = None
            deq = schema.OperatorT()
            deq.opcodeIndex = _dequantize_opcode(model)
            deq.inputs = np.array([q_index], np.int32)
            deq.outputs = np.array([t_index], np.int32)
            new_ops.append(deq)
            done[t_index] = t_index
            entry["dtype"] = "int4" if int4 else "int8"
        # DEQUANTIZE ops go first so every consumer finds its float filter.
        sg.operators = new_ops + list(sg.operators)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), report


def filter_values(flatbuffer):
    """Returns `{tensor name: (codes, scales, axis)}` for every stored code tensor.

    Reads the file as a phone would: integer codes and per-channel scales.
    """
    model = _read_model(flatbuffer)
    out = {}
    for sg in model.subgraphs:
        for t in sg.tensors:
            if t.type not in (schema.TensorType.INT8, schema.TensorType.INT4):
                continue
            buf = model.buffers[t.buffer]
            if buf.data is None or t.quantization is None or t.quantization.scale is None:
                continue
            count = int(np.prod(t.shape))
            if t.type == schema.TensorType.INT4:
                codes = _unpack_int4(bytes(buf.data), count).reshape(t.shape)
            else:
                codes = np.frombuffer(bytes(buf.data), np.int8).reshape(t.shape)
            name = t.name.decode() if isinstance(t.name, bytes) else t.name
            out[name] = (codes, np.asarray(t.quantization.scale, np.float32),
                         int(t.quantization.quantizedDimension))
    return out


def _filter_tensors(model):
    """Yields `(subgraph, op, filter index, axis)` for every filter op."""
    for sg in model.subgraphs:
        for op in sg.operators:
            spec = _FILTER_OPS.get(_op_code(model, op))
            if spec is not None and int(op.inputs[spec[0]]) >= 0:
                yield sg, op, int(op.inputs[spec[0]]), spec[1]


def _name(tensor):
    return tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name


def _float_constant(model, sg, op, position):
    """The float32 constant at input `position` of `op`, or None."""
    if len(op.inputs) <= position or int(op.inputs[position]) < 0:
        return None
    t = sg.tensors[int(op.inputs[position])]
    data = model.buffers[t.buffer].data
    if t.type != schema.TensorType.FLOAT32 or data is None:
        return None
    return np.frombuffer(bytes(data), np.float32).astype(np.float64)


def regrid_int8_filters(int8_flatbuffer, float_flatbuffer):
    """Puts a full-integer model's int8 filters on the kernels' exact grids.

    The converter quantizes every filter with scale `max|v| / 127`, which
    lands 2^k-level grids between int8 codes (a 2-bit level 1/3 becomes
    42/127). Per output channel with grid `v = s * L`, |L| <= M, this stores
    `codes = L * f` and `scale = s / f` with `f = floor(127 / M)` (the most
    int8 resolution an exact grid allows), and requantizes the int32 bias, whose
    scale must stay input_scale * filter_scale, from the float file's bias. Filters are matched to the
    float model's by tensor name; one on no grid is left as converted.

    Returns:
        `(new_int8_flatbuffer, number of filters put on their grid)`.
    """
    exact, float_bias = {}, {}
    fmodel = _read_model(float_flatbuffer, "float_flatbuffer")
    for sg, op, t_index, axis in _filter_tensors(fmodel):
        t = sg.tensors[t_index]
        buf = fmodel.buffers[t.buffer]
        if t.type == schema.TensorType.FLOAT32 and buf.data is not None:
            exact[_name(t)] = np.frombuffer(bytes(buf.data), np.float32).reshape(t.shape)
            bias = _float_constant(fmodel, sg, op, 2)
            if bias is not None:
                float_bias[_name(t)] = bias
    model = _read_model(int8_flatbuffer, "int8_flatbuffer")
    changed = 0
    seen = set()
    for sg, op, t_index, axis in _filter_tensors(model):
        t = sg.tensors[t_index]
        if (id(sg), t_index) in seen or t.type != schema.TensorType.INT8:
            continue
        seen.add((id(sg), t_index))
        values = exact.get(_name(t))
        if values is None or values.shape != tuple(t.shape):
            continue
        found = grid_codes(values, axis)
        if found is None or found[2] > 127:
            continue
        codes, scales, _ = found
        moved = np.moveaxis(codes, axis, 0)
        m = np.maximum(np.abs(moved.reshape(len(moved), -1)).max(axis=1), 1)
        f = 127 // m
        shape = [1] * codes.ndim
        shape[axis] = -1
        new_codes = (codes * f.reshape(shape)).astype(np.int8)
        new_scales = (scales / f).astype(np.float32)
        old_scales = np.asarray(t.quantization.scale, np.float32)
        model.buffers[t.buffer].data = np.frombuffer(new_codes.tobytes(), np.uint8)
        t.quantization.scale = new_scales
        t.quantization.zeroPoint = np.zeros(len(new_scales), np.int64)
        t.quantization.quantizedDimension = axis
        bias_index = int(op.inputs[2]) if len(op.inputs) > 2 else -1
        if bias_index >= 0:
            bias = sg.tensors[bias_index]
            bbuf = model.buffers[bias.buffer]
            if bias.type == schema.TensorType.INT32 and bbuf.data is not None:
                ratio = old_scales.astype(np.float64) / new_scales.astype(np.float64)
                new_scale = (np.asarray(bias.quantization.scale, np.float64) / ratio
                             ).astype(np.float32)
                # Rounded once, from the float bias where the float file has
                # it: rescaling the converter's rounded int32 would round twice
                # (up to one int32 step off instead of half).
                b = float_bias.get(_name(t))
                if b is not None and b.shape == new_scale.shape:
                    b = b / new_scale.astype(np.float64)
                else:
                    b = np.frombuffer(bytes(bbuf.data), np.int32) * ratio
                new_b = np.clip(np.round(b), -2**31, 2**31 - 1).astype(np.int32)
                bbuf.data = np.frombuffer(new_b.tobytes(), np.uint8)
                bias.quantization.scale = new_scale
        changed += 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), changed


def _scale(tensor, shape=None):
    """A tensor's float32 quantization scale (broadcast to `shape`), or None."""
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    scale = np.asarray(q.scale, np.float32)
    return np.array(np.broadcast_to(scale, shape)) if shape is not None else scale[0]


def add_ops(flatbuffer):
    """The quantization of a full-integer file's ADD ops, in op order.

    Returns:
        A list with one dict per ADD with quantized inputs and output:
        `inputs` (`(scale, zero_point)` of each input, scale float32),
        `output` (the same for its output) and `activation` (fused
        `ActivationFunctionType`).
    """
    model = _read_model(flatbuffer)
    found = []
    for sg in model.subgraphs:
        for op in sg.operators:
            if _op_code(model, op) != schema.BuiltinOperator.ADD:
                continue
            tensors = [sg.tensors[int(i)] for i in list(op.inputs) + list(op.outputs)]
            params = [(_scale(t), t.quantization) for t in tensors]
            if any(scale is None for scale, _ in params):
                continue
            pairs = [(scale, int(np.asarray(q.zeroPoint)[0])) for scale, q in params]
            found.append(dict(inputs=pairs[:-1], output=pairs[-1], activation=int(
                getattr(op.builtinOptions, "fusedActivationFunction", 0) or 0)))
    return found


def filter_biases(flatbuffer):
    """The int32 biases of a full-integer file's filter ops, in op order.

    Returns:
        A list with one dict per CONV_2D / DEPTHWISE_CONV_2D /
        FULLY_CONNECTED / TRANSPOSE_CONV op that has an int32 bias:
        `codes` (int64 array, one per output channel), `scales` (float64,
        the bias scale `input_scale * filter_scale` per channel),
        `output_scale` (float, the op's output quantization step),
        `output_zero_point` (int), `input_scale` (float32, None if the
        input is not quantized), `filter_scales` (float32 per output
        channel, None if the filter is not quantized) and `activation` (the
        op's fused `ActivationFunctionType`: 0 none, 1 RELU, 3 RELU6, ...).
    """
    model = _read_model(flatbuffer)
    found = []
    for sg, op, _, _ in _filter_tensors(model):
        bias_index = 3 if _op_code(model, op) == schema.BuiltinOperator.TRANSPOSE_CONV else 2
        if len(op.inputs) <= bias_index or int(op.inputs[bias_index]) < 0:
            continue
        bias = sg.tensors[int(op.inputs[bias_index])]
        data = model.buffers[bias.buffer].data
        out = sg.tensors[int(op.outputs[0])]
        if bias.type != schema.TensorType.INT32 or data is None or out.quantization is None:
            continue
        codes = np.frombuffer(bytes(data), np.int32).astype(np.int64)
        scales = np.broadcast_to(np.asarray(bias.quantization.scale, np.float64), codes.shape)
        inp = sg.tensors[int(op.inputs[bias_index - 1 if bias_index == 3 else 0])]
        filt = sg.tensors[int(op.inputs[1])]
        found.append(dict(
            codes=codes, scales=np.array(scales),
            output_scale=float(np.asarray(out.quantization.scale)[0]),
            output_zero_point=int(np.asarray(out.quantization.zeroPoint)[0]),
            input_scale=_scale(inp), filter_scales=_scale(filt, codes.shape),
            activation=int(getattr(op.builtinOptions, "fusedActivationFunction", 0) or 0)))
    return found
