"""Structure-aware hypothesis strategies over the files quantwise reads (issue 17, fuzzing).

Each strategy mutates a valid file the way a bad conversion, a truncated download or a hostile
upload would: JSON trees edited at a random depth (wrong types, missing / extra keys, huge or
negative numbers, unknown names), safetensors headers (dtype, shape, data_offsets that overlap or
point past the end, the length prefix), truncation and byte flips, .npy headers that claim more
than the file holds, ONNX initializers whose external data points outside the folder.
"""

from __future__ import annotations

import copy
import io
import json
import re
import struct

import numpy as np
from hypothesis import strategies as st

HUGE = [2 ** 31, 2 ** 32 + 1, 2 ** 40, 2 ** 60, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 10 ** 30]
NAMES = ["int8", "uint8", "int4", "uint4", "fp8_e4m3", "fp16", "bf16", "fp32", "int3", "INT8", "",
         "per_tensor", "per_channel", "per_group", "per_token", "linear", "conv", "conv_transpose",
         "embedding", "lstm", "F32", "I8", "U8", "BF16", "F8_E4M3", "F4", "C64", "max", "mse",
         "percentile", "gptq", "awq", "rtn", "smoothquant", "llama", "bert", "quantwise", "fc1",
         "conv", "bn", "fc2", "*", "[", "../x", "/etc/passwd", "fuzz_seeds:tiny_model", "é\x00"]
KEYS = ["kind", "weight_spec", "act_spec", "dynamic", "weight_shape", "scale_shape", "bias_size",
        "layer_args", "tied_to", "output_qparams", "format", "symmetric", "narrow_range",
        "granularity", "type", "size", "axis", "stride", "padding", "groups", "transposed",
        "name", "module_type", "code_limit", "default", "rules", "exclude", "preset", "method",
        "method_args", "pattern", "types", "weight", "activation", "calibrator", "calibrator_args",
        "hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
        "num_key_value_heads", "head_dim", "model_type", "architectures", "torch_dtype",
        "weight_map", "dtype", "shape", "data_offsets", "__metadata__", "x"]

small_ints = st.one_of(st.integers(-3, 300), st.sampled_from(HUGE), st.sampled_from([-2 ** 31, -2 ** 63]))
granularity = st.fixed_dictionaries({"type": st.sampled_from(NAMES[11:15] + ["per_block", 3])},
                                    optional={"size": small_ints | st.text(max_size=3), "axis": small_ints,
                                              "x": st.none()})
JSON_ODD = st.one_of(
    st.none(), st.booleans(), small_ints, st.integers(-2 ** 70, 2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.sampled_from(NAMES),
    st.lists(small_ints, max_size=4), st.lists(st.text(max_size=3), max_size=3), granularity,
    st.just({}), st.just([]), st.just([[]]), st.just({"type": "per_group"}),
    st.dictionaries(st.sampled_from(KEYS), st.none() | small_ints | st.sampled_from(NAMES), max_size=3))


def _children(node):
    return list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []


def _edit(draw, node, values, depth=0):
    """One edit somewhere below `node`: usually deeper (so shrinking keeps the edit specific)."""
    kids = _children(node)
    if kids and depth < 10 and draw(st.integers(0, 3)) != 3:
        key = draw(st.sampled_from(kids))
        node[key] = _edit(draw, node[key], values, depth + 1)
        return node
    op = draw(st.sampled_from(["replace", "delete", "add", "retype"] if kids else ["replace", "retype"]))
    if op == "replace":  # a copy: st.just({}) hands out one object, edits must not leak into it
        return copy.deepcopy(draw(values))
    if op == "retype":  # the same value, another JSON type: 3 -> "3" / [3] / {"v": 3}
        return draw(st.sampled_from([str(node), [node], {"value": node}, None]))
    if op == "delete":
        del node[draw(st.sampled_from(kids))]
        return node
    if isinstance(node, dict):
        node[draw(st.sampled_from(KEYS) | st.text(max_size=4))] = copy.deepcopy(draw(values))
    else:
        node.insert(draw(st.integers(0, len(node))), copy.deepcopy(draw(values | st.sampled_from(node))))
    return node


@st.composite
def mutated_tree(draw, tree, values=JSON_ODD, max_edits=3):
    tree = copy.deepcopy(tree)
    for _ in range(draw(st.integers(1, max_edits))):
        tree = _edit(draw, tree, values)
    return tree


NESTED = [b"[" * 200_000, b'{"a":' * 100_000, b"[" * 50 + b"]" * 50, b"\xff\xfe{}", b"\xef\xbb\xbf{}",
          b"{", b"", b"null", b"1" * 5000, b'"\\ud800"', b"NaN", b"{}" * 3, b'{"a": 1, "a": 2}']


@st.composite
def bytes_mutation(draw, data: bytes):
    """Byte-level damage: truncation, flips, insertions, junk appended."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "append"]))
        at = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] = draw(st.integers(0, 255) | st.just(data[at] ^ 0x80))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        else:
            data += draw(st.binary(max_size=16))
    return bytes(data)


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header, body: bytes, prefix: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if prefix is None else prefix % 2 ** 64) + raw + body


st_dtype = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "BOOL", "U16",
                            "F8_E4M3", "F8_E5M2", "F4", "C64", "f32", "", 4, None, ["F32"]])
st_shape = st.one_of(st.lists(st.integers(0, 64), max_size=4),
                     st.lists(small_ints | st.booleans() | st.floats(allow_nan=True), max_size=4),
                     st.sampled_from([[2 ** 40, 2 ** 40], [2 ** 64], [-1], [0], "16", None, {}]))


@st.composite
def safetensors_bytes(draw, seed: bytes):
    """A safetensors file with its header or bytes damaged (see the module doc)."""
    header, body = split_safetensors(seed)
    names = [k for k in header if k != "__metadata__"]
    prefix = None
    kind = draw(st.sampled_from(["entry", "entry", "offsets", "tree", "prefix", "raw", "bytes"]))
    if kind == "entry" and names:  # one field of one tensor's entry
        entry = header[draw(st.sampled_from(names))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "drop"]))
        if field == "dtype":
            entry["dtype"] = draw(st_dtype)
        elif field == "shape":
            entry["shape"] = draw(st_shape)
        elif field == "data_offsets":
            entry["data_offsets"] = draw(st.lists(small_ints | st.floats() | st.none(), max_size=3))
        elif field == "extra":
            entry[draw(st.sampled_from(KEYS))] = draw(JSON_ODD)
        else:
            del entry[draw(st.sampled_from(sorted(entry)))]
    elif kind == "offsets" and names:  # consistent sizes, impossible layout
        a, b = draw(st.sampled_from(names)), draw(st.sampled_from(names))
        how = draw(st.sampled_from(["swap", "overlap", "shift", "huge", "gap"]))
        lo, hi = header[a]["data_offsets"]
        if how == "swap":
            header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], [lo, hi]
        elif how == "overlap":
            blo = header[b]["data_offsets"][0]
            header[a]["data_offsets"] = [blo, blo + hi - lo]
        elif how == "shift":
            k = draw(st.integers(-8, 8))
            header[a]["data_offsets"] = [lo + k, hi + k]
        elif how == "huge":
            big = draw(st.sampled_from(HUGE))
            header[a]["data_offsets"] = [lo + big, hi + big]
        else:
            for entry in header.values():
                if isinstance(entry, dict) and entry.get("data_offsets", [0])[0] >= hi:
                    entry["data_offsets"] = [x + 4 for x in entry["data_offsets"]]
            body = body[:hi] + b"\0" * 4 + body[hi:]
    elif kind == "tree":
        header = draw(mutated_tree(header, JSON_ODD | st_shape | st_dtype))
    elif kind == "prefix":
        n = len(json.dumps(header))
        prefix = draw(st.sampled_from([0, 1, 7, n - 1, n + 1, n + len(body), n + len(body) + 9])
                      | st.sampled_from(HUGE) | st.integers(0, 2 ** 64 - 1))
    elif kind == "raw":
        header = draw(st.sampled_from(NESTED) | st.binary(max_size=24))
    out = join_safetensors(header, body, prefix)
    if kind == "bytes" or draw(st.integers(0, 4)) == 0:
        out = draw(bytes_mutation(out))
    return out


@st.composite
def json_bytes(draw, tree, values=JSON_ODD):
    """A JSON file mutated as a tree (mostly) or as bytes."""
    how = draw(st.sampled_from(["tree", "tree", "tree", "bytes", "raw"]))
    if how == "raw":
        return draw(st.sampled_from(NESTED) | st.binary(max_size=32))
    text = json.dumps(tree if how == "bytes" else draw(mutated_tree(tree, values))).encode()
    return draw(bytes_mutation(text)) if how == "bytes" else text


YAML_ODD = [b"a: &x [1, 2]\nb: *x\n", b"!!python/object:os.system {}\n", b"? [1, 2]\n: 3\n",
            b"1: 2\n", b"default: !!set {a, b}\n", b"name: !!binary aGk=\n", b"exclude: 2024-01-01\n",
            b"rules:\n- pattern: [a]\n", b"- - - - [" * 2000, b"{" * 5000, b"\t: x", b"%YAML 9.9\n---\n",
            b"a: b\n---\nc: d\n", b"default: {weight: {format: int8, granularity: {type: per_group, size: .nan}}}",
            b"default: {weight: {granularity: {type: per_group, size: 1e400}}}", b"\x00\xff"]


@st.composite
def config_file(draw, seeds):
    """(suffix, bytes) of a config file: a mutated preset / custom config as JSON or YAML."""
    import yaml

    suffix = draw(st.sampled_from([".json", ".yaml", ".yml"]))
    tree = draw(st.sampled_from(seeds))
    how = draw(st.sampled_from(["tree", "tree", "tree", "bytes", "yaml-odd"]))
    if how == "yaml-odd":
        return ".yaml", draw(st.sampled_from(YAML_ODD))
    if how == "tree":
        tree = draw(mutated_tree(tree))
    text = (json.dumps(tree) if suffix == ".json" else yaml.safe_dump(tree)).encode()
    return suffix, draw(bytes_mutation(text)) if how == "bytes" else text


# -- calibration data ------------------------------------------------------------------------------
NPY_DTYPES = ["<f4", ">f4", "<f8", "<f2", "i1", "u1", "<u2", "<i8", ">i4", "?", np.longdouble, "<c8",
              "U3", "S2", "<M8[s]", "<m8[s]", "V4", [("a", "<f4"), ("b", "i1")], "O"]
NPY_SHAPES = ["()", "(0,)", "(1099511627776,)", "(4611686018427387904, 4)", "(-1,)", "(2, -3)",
              "(3,4)", "[2]", "(2**40,)", "'x'", "(1.5,)", "(9223372036854775807, 9223372036854775807)"]


@st.composite
def npy_bytes(draw):
    """A .npy file: odd dtypes, shapes, NaN / inf, or a header claiming more than the file has."""
    from hypothesis.extra import numpy as hnp

    dtype = np.dtype(draw(st.sampled_from(NPY_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    if dtype.kind in "biuf" and dtype.itemsize <= 8:
        array = draw(hnp.arrays(dtype, shape, elements=None if dtype.kind != "f" else
                                st.floats(allow_nan=True, allow_infinity=True, width=8 * min(dtype.itemsize, 4))))
    else:
        array = np.zeros(shape, dtype)
    if draw(st.booleans()) and array.ndim > 1:
        array = np.asfortranarray(array)
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    data = buf.getvalue()
    how = draw(st.sampled_from(["ok", "ok", "shape", "descr", "fortran", "bytes"]))
    if how in ("shape", "descr", "fortran"):
        text = data[10:10 + struct.unpack("<H", data[8:10])[0]].decode("latin1")
        if how == "shape":
            text = re.sub(r"'shape': \([^)]*\)", "'shape': " + draw(st.sampled_from(NPY_SHAPES)), text)
        elif how == "descr":
            text = re.sub(r"'descr': '[^']*'", "'descr': " + draw(st.sampled_from(
                ["'<f4'", "'|O'", "'<f16'", "'x'", "3", "[('a', '<f4', (2**40,))]", "'<U1099511627776'"])), text)
        else:
            text = text.replace("False", "'yes'").replace("True", "'no'")
        raw = text.strip().encode("latin1")
        raw += b" " * (-(10 + len(raw) + 1) % 64) + b"\n"
        data = data[:8] + struct.pack("<H", len(raw)) + raw + data[10 + struct.unpack("<H", data[8:10])[0]:]
    elif how == "bytes":
        data = draw(bytes_mutation(data))
    return data


TORCH_DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", "uint8", "int64", "int32", "bool",
                "float8_e4m3fn", "uint16", "complex64"]


@st.composite
def tensor_safetensors_bytes(draw):
    """A safetensors calibration file: 0-3 tensors of odd dtypes / shapes, maybe damaged."""
    import torch
    from safetensors.torch import save

    tensors = {}
    n_tensors = draw(st.integers(0, 3))
    for name in draw(st.lists(st.sampled_from(["input_ids", "attention_mask", "x", "pixel_values", "_"]),
                              min_size=n_tensors, max_size=n_tensors, unique=True)):
        shape = draw(st.lists(st.integers(0, 4), max_size=4))
        dtype = getattr(torch, draw(st.sampled_from(TORCH_DTYPES)))
        fill = draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -3.0]))
        tensors[name] = torch.full(shape, fill).to(dtype) if dtype.is_floating_point or dtype.is_complex \
            else torch.zeros(shape, dtype=dtype)
    try:
        data = save(tensors)
    except Exception:  # noqa: BLE001 - a dtype this safetensors cannot write: plain float32
        data = save({"x": torch.zeros(2, 3)})
    if draw(st.integers(0, 3)) == 0 and tensors:
        data = draw(safetensors_bytes(data))
    return data


@st.composite
def calibration_folder(draw):
    """{name: bytes} of a calibration folder: .npy, .safetensors, a pickle, a text file."""
    import torch

    files = {}
    for i in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["npy", "npy", "safetensors", "safetensors", "pt", "txt", "bin"]))
        if kind == "npy":
            data = draw(npy_bytes())
        elif kind == "safetensors":
            data = draw(tensor_safetensors_bytes())
        elif kind == "pt":
            buf = io.BytesIO()
            torch.save(draw(st.sampled_from([torch.zeros(2, 8), {"x": torch.ones(2)}, [torch.zeros(1)], 3, "s"])), buf)
            data = buf.getvalue() if draw(st.booleans()) else draw(bytes_mutation(buf.getvalue()))
        else:
            data = draw(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
        files[f"{i}.{kind}"] = data
    return files


# -- ONNX ----------------------------------------------------------------------------------------
LOCATIONS = ["weights.bin", "../outside.bin", "/etc/passwd", "", "sub/../weights.bin", "sub/w.bin",
             "link.bin", "dirlink/weights.bin", "a\\..\\b", "weights.bin\x00x", ".", "/", "~/x",
             "missing.bin", "..", "sub"]
OFFSETS = ["0", "4", "-1", "abc", "1e3", "99999999999999999999", "", " 4", "0x10", "128"]


@st.composite
def onnx_case(draw, models, weights: bytes):
    """{name: bytes | ("symlink", target)} of a folder with model.onnx, mutated as bytes or as a
    protobuf (external-data locations, offsets, dims, types, ops, opsets, metadata)."""
    import onnx

    seed = models[draw(st.sampled_from(sorted(models)))]
    files = {"weights.bin": weights if draw(st.integers(0, 3)) else draw(bytes_mutation(weights))}
    for name in draw(st.lists(st.sampled_from(["link.bin", "dirlink", "sub"]), unique=True, max_size=2)):
        files[name] = ("symlink", draw(st.sampled_from(["/etc/passwd", "../outside.bin", "weights.bin", "/etc", ".."])))
    how = draw(st.sampled_from(["proto", "proto", "proto", "bytes"]))
    if how == "bytes":
        files["model.onnx"] = draw(bytes_mutation(seed))
        return files
    model = onnx.load_from_string(seed)
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["external", "external", "dims", "dtype", "op", "opset", "meta", "io"]))
        init = model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]
        if what == "external":
            init.data_location = draw(st.sampled_from([1, 1, 0]))
            del init.external_data[:]
            for key in draw(st.lists(st.sampled_from(["location", "offset", "length", "checksum", "x"]),
                                     unique=True, max_size=4)):
                entry = init.external_data.add()
                entry.key = key
                entry.value = draw(st.sampled_from(LOCATIONS if key == "location" else OFFSETS))
        elif what == "dims":
            init.dims[:] = draw(st.lists(st.integers(-2, 2 ** 40) | st.sampled_from(HUGE[:5]), max_size=3))
        elif what == "dtype":
            init.data_type = draw(st.integers(0, 40))
        elif what == "op":
            node = model.graph.node[draw(st.integers(0, len(model.graph.node) - 1))]
            node.op_type = draw(st.sampled_from(["MatMul", "Foo", "QuantizeLinear", "If", "Loop", "", "Add"]))
            if draw(st.booleans()):
                node.input.append(draw(st.sampled_from(["", "W", "nope", "Y"])))
        elif what == "opset":
            model.opset_import[0].version = draw(st.sampled_from([1, 7, 13, 21, 99, -1, 2 ** 62]))
            model.ir_version = draw(st.sampled_from([8, 3, 0, 99, -1]))
        elif what == "meta":
            prop = model.metadata_props.add()
            prop.key = draw(st.sampled_from(["quantwise.layer_outputs", "x"]))
            prop.value = draw(st.sampled_from(['{"fc": "H"}', "[1]", "{", '{"fc": 3}', '{"a": "nope"}']))
        else:
            dim = model.graph.input[0].type.tensor_type.shape.dim[1]
            dim.dim_value = draw(st.sampled_from([0, 1, 8, 2 ** 40]))
    files["model.onnx"] = model.SerializeToString()
    return files
