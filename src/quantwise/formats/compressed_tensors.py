"""Export a weight-only quantized Hugging Face causal LM to the compressed-tensors format
(the format vLLM serves and transformers loads with the `compressed-tensors` package).

    export_compressed_tensors("out/llama-w4", "out/llama-w4-ct")

What maps onto what (every quantwise layer is read from quantwise.json `layers`):
- a Linear with integer weights (int4/uint4 packed two per byte, int8/uint8) and no activation
  quantization: one compressed-tensors QuantizationScheme of weights only, "pack-quantized"
  (ints packed eight or four to an int32 by compressed-tensors' own compressor):
  PerGroup(G) -> strategy "group", group_size G; PerChannel(0) -> "channel"; PerTensor ->
  "channel" with the one scale repeated (the same values). Codes are symmetric and signed
  (zero point 0, not stored), as in every quantwise weight-only preset.
- a quantized Embedding (and a head tied to it): compressed-tensors' servers keep embeddings
  float, so its dequantized weights are written as a float tensor (the same values).
- a quantized lm_head: dequantized to a float Linear named in `ignore` (vLLM keeps the head
  of a compressed-tensors model float), unless `quantized_head=True` keeps it packed.
- everything quantwise kept float (norms, float Linears such as an excluded lm_head) is copied
  as stored; float Linears are named in the config's `ignore` list.
- AWQ's scales are already folded into the stored norm weights and codes: nothing to undo.
Refused with ExportError, naming the layer: activation quantization (w8a8 static or dynamic),
float/fp8 weights, affine or unsigned codes (compressed-tensors 0.20.1 writes their packed zero
points, but its loading path in transformers builds unpacked ones and the load fails),
per-channel along another axis, convolutions and GPT-2's Conv1D (not an nn.Linear),
SmoothQuant's prescaled inputs and folded batch norms.

Scales are stored in the model's dtype (config.json "dtype"/"torch_dtype", float32 when
unset), as compressed-tensors itself creates them. The output is written into a temporary
sibling folder and renamed into place; the input folder is never modified.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from quantwise.errors import CheckpointError, ExportError, OutputPathError
from quantwise.fileio import atomic_write_text, current_umask, swap_in
from quantwise.formats.metadata import read_quantwise_json
from quantwise.formats.shards import ShardedCheckpoint, shard_file_names, write_index
from quantwise.models.hf import hf_files
from quantwise.numerics import dequantize, unpack_int4
from quantwise.spec import Format, PerChannel, PerGroup, PerTensor, QuantSpec


SHARD_BYTES = 4 * 2 ** 30
EXTRA_FILES = ("chat_template.jinja", "chat_template.json")
SUPPORTED = ("weight-only symmetric int4/int8 Linears, group-wise, per output channel or "
             "per tensor (quantwise configs w4, w4-gptq, w4-awq, w8 and their variants)")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_QUANTWISE_BUFFERS = ("weight", "weight_scale", "weight_zero_point", "bias", "input_scale",
                      "input_zero_point", "output_scale", "output_zero_point")


def export_compressed_tensors(folder: str | os.PathLike, out: str | os.PathLike,
                              overwrite: bool = False, *, quantized_head: bool = False) -> Path:
    """Write the quantwise checkpoint `folder` (a Hugging Face causal LM, weight-only int4 or
    int8) as a compressed-tensors folder `out`; returns `out`. See the module docstring.

    `quantized_head`: keep a quantized lm_head packed (transformers loads it; vLLM keeps its
    head float and cannot). By default its dequantized weights are written as a float Linear,
    named in `ignore`, as compressed-tensors checkpoints for vLLM do."""
    folder, out = Path(folder), Path(out)
    meta = _read_metadata(folder)
    config = _read_config(folder)
    _check_output(out, folder, overwrite)
    import compressed_tensors  # noqa: F401  (a clear ImportError before any work)

    dtype = _model_dtype(config)
    skeleton = _skeleton(config, folder)
    plan = _plan(meta, skeleton, quantized_head)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o777 & ~current_umask())
    try:
        checkpoint = ShardedCheckpoint.open(folder, allow_non_float=True)
        try:
            _write_weights(checkpoint, meta, plan, dtype, staging)
        finally:
            checkpoint.close()
        _write_config(folder, config, staging, plan, skeleton)
        _copy_tokenizer(folder, staging)
        swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# -- checks -----------------------------------------------------------------------------------
def _read_metadata(folder: Path) -> dict[str, Any]:
    return read_quantwise_json(folder, "pass a folder written by quantwise.save or the "
                                       "streaming quantizer")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ExportError(f"{folder} has no config.json: only checkpoints of Hugging Face causal "
                          "LMs (saved from a Hugging Face folder) can be exported to compressed-tensors")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = config.get("architectures") or []
    if (folder / "modules.json").is_file() or not archs or archs[0] not in causal:
        raise ExportError(f"{folder} holds a {archs[0] if archs else config.get('model_type')!r} "
                          "model, not a causal LM: compressed-tensors export supports Hugging Face "
                          "causal LMs (architectures such as LlamaForCausalLM)")
    return config


def _check_output(out: Path, folder: Path, overwrite: bool) -> None:
    resolved, source = out.resolve(), folder.resolve()
    if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
        raise OutputPathError(f"output {out} is, contains or lies inside the input {folder}: "
                              "choose another output folder")
    if out.exists():
        if not out.is_dir():
            raise OutputPathError(f"output {out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise OutputPathError(f"output folder {out} already exists: pass overwrite=True "
                                  "(--overwrite) or choose another folder")
    parent = resolved
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write under {parent}: choose a writable output folder")


def _model_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    return _DTYPES.get(str(name).removeprefix("torch."), torch.float32) if name else torch.float32


def _skeleton(config: dict[str, Any], folder: Path) -> torch.nn.Module:
    """The model built from config.json with its parameters on the meta device (no memory):
    which modules are nn.Linear, and the names compressed-tensors will match."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except (KeyError, ValueError, TypeError) as exc:
        raise ExportError(f"{folder / 'config.json'}: transformers cannot build it as a causal LM "
                          f"({exc})") from None


def _plan(meta: dict[str, Any], skeleton: torch.nn.Module, quantized_head: bool
          ) -> dict[str, tuple[str, Any]]:
    """Per quantwise layer: ("ct", QuantizationArgs) or ("float", None) (dequantized)."""
    from compressed_tensors.quantization import QuantizationArgs

    if meta.get("prescaled"):
        raise ExportError(f"layers {sorted(meta['prescaled'])[:3]} divide their inputs by "
                          "SmoothQuant scales, which compressed-tensors cannot express; supported: "
                          f"{SUPPORTED}")
    if meta.get("folded"):
        raise ExportError(f"folded batch norms {meta['folded'][:2]}: not a causal LM checkpoint; "
                          f"supported: {SUPPORTED}")
    modules = dict(skeleton.named_modules())
    head = skeleton.get_output_embeddings()
    plan: dict[str, tuple[str, Any]] = {}
    for name, layer in meta["layers"].items():
        spec = QuantSpec.from_dict(layer["weight_spec"])
        fmt, gran = spec.format, spec.granularity
        what = f"layer {name!r} ({layer['kind']}, weights {fmt.value} {gran.to_dict()['type']}"
        what += ", activations " + (layer["act_spec"]["format"] if layer["act_spec"] else "float") + ")"
        if name not in modules:
            raise ExportError(f"{what} does not exist in the model its config.json describes")
        if layer["act_spec"] is not None:
            kind = "dynamic" if layer["dynamic"] else "static"
            raise ExportError(f"{what}: {kind} activation quantization is not exported; supported: "
                              f"{SUPPORTED}")
        if not fmt.is_integer:
            raise ExportError(f"{what}: {fmt.value} weights are not exported; supported: {SUPPORTED}")
        if layer["kind"] == "embedding":
            plan[name] = ("float", None)
            continue
        if layer["kind"] != "linear" or type(modules[name]) is not torch.nn.Linear:
            raise ExportError(f"{what} is a {type(modules[name]).__name__}, not an nn.Linear; "
                              f"supported: {SUPPORTED}")
        if layer.get("tied_to") or (modules[name] is head and not quantized_head):
            # a head sharing a quantized embedding's weights, or one vLLM would keep float
            plan[name] = ("float", None)
            continue
        if isinstance(gran, PerGroup):
            strategy, group = "group", gran.size
            if layer["weight_shape"][1] % group:
                raise ExportError(f"{what}: in_features {layer['weight_shape'][1]} is not a "
                                  f"multiple of the group size {group}")
        elif isinstance(gran, PerTensor) or (isinstance(gran, PerChannel) and gran.axis % 2 == 0):
            strategy, group = "channel", None
        else:
            raise ExportError(f"{what}: scales along axis {getattr(gran, 'axis', '?')} (input "
                              f"channels) cannot be expressed; supported: {SUPPORTED}")
        if not (spec.symmetric and fmt.is_signed):
            raise ExportError(f"{what}: {'unsigned' if spec.symmetric else 'affine'} weight codes "
                              "need zero points, which compressed-tensors 0.20.1 packs but cannot "
                              f"load back in transformers; supported: {SUPPORTED}")
        plan[name] = ("ct", QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=True,
                                             strategy=strategy, group_size=group, dynamic=False))
    if not any(kind == "ct" for kind, _ in plan.values()):
        raise ExportError(f"no Linear of the checkpoint is quantized; supported: {SUPPORTED}")
    return plan


# -- weights ----------------------------------------------------------------------------------
def _codes(checkpoint: ShardedCheckpoint, name: str, layer: dict[str, Any], spec: QuantSpec
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes as stored, unpacked, int32; scale float32; zero point int32) of a quantwise layer."""
    source = layer.get("tied_to") or name
    shape = tuple(layer["weight_shape"])
    raw = checkpoint.read(f"{source}.weight", dtype=None)
    if spec.format in (Format.INT4, Format.UINT4):
        raw = unpack_int4(raw, shape[-1], spec.format.is_signed)
    codes = raw.reshape(shape).to(torch.int32)
    scale = checkpoint.read(f"{source}.weight_scale", dtype=torch.float32)
    zp_name = f"{source}.weight_zero_point"
    zero = (checkpoint.read(zp_name, dtype=None).to(torch.int32) if zp_name in checkpoint.tensors
            else torch.zeros(scale.shape, dtype=torch.int32))
    return codes, scale, zero


def _compress_linear(codes: torch.Tensor, scale: torch.Tensor, args: Any, dtype: torch.dtype,
                     name: str) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one Linear (symmetric signed codes), made by its own
    compressor from the dequantized weights, which it quantizes back to exactly the quantwise
    codes (checked)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationScheme

    if args.strategy == "channel":  # (out,) or a per-tensor () scale -> (out, 1)
        scale = scale.reshape(-1, 1).expand(codes.shape[0], 1).contiguous()
    scale = scale.to(dtype)
    groups = args.group_size or codes.shape[1]
    weight = codes.float() * scale.float().repeat_interleave(groups, dim=1)
    state = {"weight": weight, "weight_scale": scale}
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    fmt = infer_module_format(torch.nn.Linear, scheme)
    compressed = BaseCompressor.get_value_from_registry(fmt.value).compress(state, scheme)
    packed = compressed["weight_packed"]
    if not torch.equal(unpack_from_int32(packed, args.num_bits, codes.shape).to(torch.int32), codes):
        raise ExportError(f"layer {name!r}: compressed-tensors' packing did not reproduce the "
                          "quantwise codes (a scale rounded in the model's dtype?)")
    return compressed


def _write_weights(checkpoint: ShardedCheckpoint, meta: dict[str, Any],
                   plan: dict[str, tuple[str, Any]], dtype: torch.dtype, staging: Path) -> None:
    layers = meta["layers"]
    writer = _ShardWriter(staging)
    owned = {f"{name}.{buf}" for name in layers for buf in _QUANTWISE_BUFFERS}
    for name, (kind, args) in plan.items():
        layer = layers[name]
        spec = QuantSpec.from_dict(layer["weight_spec"])
        codes, scale, zero = _codes(checkpoint, name, layer, spec)
        if kind == "ct":
            tensors = _compress_linear(codes, scale, args, dtype, name)
        elif layer.get("tied_to"):
            tensors = {}  # a tied head: transformers re-ties it to the embedding written below
        else:
            tensors = {"weight": dequantize(codes, scale, zero, spec).to(dtype)}
        if f"{name}.bias" in checkpoint.tensors:
            tensors["bias"] = checkpoint.read(f"{name}.bias", dtype=dtype)
        for key, tensor in tensors.items():
            writer.add(f"{name}.{key}", tensor)
    for key, info in checkpoint.tensors.items():
        if key in owned:
            continue
        if info.dtype not in ("F32", "F16", "BF16"):
            raise ExportError(f"tensor {key!r} is {info.dtype} but belongs to no quantized layer "
                              "of quantwise.json: the checkpoint is inconsistent")
        writer.add(key, checkpoint.read(key, dtype=None))
    writer.close()


class _ShardWriter:
    """Tensors into shards of at most ~SHARD_BYTES (one model.safetensors when they fit);
    a shard is written as soon as it is full, so the whole model is never held."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.files, self.weight_map = folder, [], {}
        self.pending: dict[str, torch.Tensor] = {}
        self.size = self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > SHARD_BYTES:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".part-{len(self.files)}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        names = ["model.safetensors"] if len(self.files) == 1 else shard_file_names(len(self.files))
        for (path, tensors), final in zip(self.files, names):
            os.replace(path, self.folder / final)
            (self.folder / final).chmod(0o666 & ~current_umask())
            self.weight_map.update({t: final for t in tensors})
        if len(self.files) > 1:
            write_index(self.folder, self.weight_map, self.total)


# -- config, tokenizer, publication -----------------------------------------------------------
def _write_config(folder: Path, config: dict[str, Any], staging: Path,
                  plan: dict[str, tuple[str, Any]], skeleton: torch.nn.Module) -> None:
    """config.json without quantwise's entry, then compressed-tensors' own quantization_config
    (QuantizationConfig.from_pretrained on the skeleton carrying each layer's scheme: it
    makes the config groups and the ignore list of float Linears; ModelCompressor writes it)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus

    quantized = {name: args for name, (kind, args) in plan.items() if kind == "ct"}
    distinct: list[Any] = []
    for args in quantized.values():
        if args not in distinct:
            distinct.append(args)
    modules = dict(skeleton.named_modules())
    for args in distinct:
        names = [n for n, a in quantized.items() if a == args]
        # one scheme targets every Linear (float ones are ignored); several name their layers
        scheme = QuantizationScheme(targets=["Linear"] if len(distinct) == 1 else names, weights=args)
        scheme.format = infer_module_format(torch.nn.Linear, scheme)
        for name in names:
            modules[name].quantization_scheme = scheme
            modules[name].quantization_status = QuantizationStatus.COMPRESSED
    compressor = ModelCompressor.from_pretrained_model(skeleton)
    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    atomic_write_text(staging / "config.json", json.dumps(clean, indent=2, sort_keys=True) + "\n")
    compressor.update_config(str(staging))
    (staging / "config.json").chmod(0o666 & ~current_umask())


def _copy_tokenizer(folder: Path, staging: Path) -> None:
    files = [p for p in hf_files(folder) if p != folder / "config.json"]
    files += [folder / n for n in EXTRA_FILES if (folder / n).is_file()]
    for path in files:
        target = staging / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
