"""GGUF export of a quantwise checkpoint of a Hugging Face LlamaForCausalLM (llama.cpp's format).

    info = export_gguf("out/stdlib-lm-w8", "out/stdlib-lm-q8_0.gguf", qtype="Q8_0")

Weights: every 2-D weight matrix (embedding, projections, lm_head) is written in `qtype`
(Q8_0 or Q4_0: GGUF's blocks of 32 values along a row, one fp16 scale per block). A quantwise
weight is stored *exactly* (its own integer codes) when GGUF's layout can hold it: symmetric
integer codes whose scale is constant over each block of 32 (per-tensor, per-channel along the
output rows, or groups that are multiples of 32), and every scale an fp16 number (Q8_0: int8
codes in [-127, 127]; Q4_0: int4 codes in [-8, 7]). Otherwise (fp32 per-channel scales,
affine weights, group 128 scales that are not fp16, float weights) it is dequantized to float32
and re-quantized with gguf's own quantizer (`gguf.quants.quantize`); the returned dict lists
which. `keep_codes=True` (the default) keeps the codes of such weights too when only their scales are not
fp16 numbers (the scales are then rounded to fp16: "rounded"). Norm weights and any row length
that is not a multiple of 32 are written F32.

Names and layout follow llama.cpp's converter for the llama architecture (gguf's tensor-name
map); q_proj / k_proj rows are permuted per head from Hugging Face's rotate-half RoPE layout to
llama.cpp's interleaved one (`permute_qk`; `unpermute_qk` undoes it). A row permutation keeps
whole rows, so blocks of 32 along a row and their codes are unchanged by it.

Tokenizer (formats/gguf_vocab.py): quantwise's byte-level vocabulary (stdlib-lm's: ids 0..255
the bytes, then BOS/EOS/PAD) is written as llama.cpp's SentencePiece model ("llama") made of
byte pieces: ids 0..255 are the BYTE pieces "<0x00>".."<0xFF>" (what SPM's byte fallback emits
for every byte with no piece of its own: every byte then maps to its own id, invalid UTF-8
included), except id 32, the piece "\u2581" (SPM writes spaces as U+2581 before looking pieces
up, so the space byte needs that piece), with add_space_prefix off. The one inexact case: a
literal U+2581 in a text becomes id 32 too (SPM cannot tell it from a space). Byte-level BPE
("gpt2") would be exact but needs a merges list: llama.cpp refuses a file without one and gguf
refuses to write an empty one, and any real merge would add a token the 259-row embedding does
not have. Hugging Face tokenizers: a SentencePiece tokenizer.model or a GPT-2-style byte-level
BPE tokenizer.json, through the gguf package's own vocabulary classes.
The file is written to a temporary sibling and renamed: never half a file, the input untouched.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantwise.fileio import current_umask, record_output
from quantwise.errors import CheckpointError, ExportError, ModelLoadError, OutputPathError
from quantwise.formats.gguf_vocab import read_vocab, write_vocab
from quantwise.formats.metadata import read_quantwise_json
from quantwise.numerics import dequantize, unpack_int4
from quantwise.spec import Format, PerChannel, PerGroup, PerTensor, QuantSpec

QTYPES = ("Q8_0", "Q4_0")
ARCHITECTURES = ("LlamaForCausalLM",)
BLOCK = 32
_PACKED = (Format.INT4, Format.UINT4)


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover
        raise ExportError("GGUF export needs the gguf package: pip install gguf==0.19.0") from None
    return gguf


# -- the checkpoint ----------------------------------------------------------------------------
def _read_metadata(folder: Path) -> dict[str, Any]:
    return read_quantwise_json(folder, "pass a folder written by quantwise.save of a Llama causal "
                                       "LM", error=ExportError)


def _read_config(folder: Path, meta: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """config.json of the folder, else of the Hugging Face folder the checkpoint came from."""
    candidates = [folder]
    source = meta.get("source")
    if isinstance(source, str) and source:
        candidates.append(Path(source))
    for place in candidates:
        path = place / "config.json"
        if path.is_file():
            try:
                return json.loads(path.read_text()), place
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
                raise ExportError(f"{path} is not valid JSON ({exc})") from None
    raise ExportError(
        f"{folder} has no config.json (nor does its recorded source {source!r}): GGUF export "
        f"supports quantwise checkpoints of Hugging Face causal LMs ({', '.join(ARCHITECTURES)}, "
        "model_type 'llama'), saved with their config.json")


def _check_config(config: dict[str, Any], folder: Path) -> None:
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" or not set(archs) & set(ARCHITECTURES):
        raise ExportError(
            f"{folder}: model_type {config.get('model_type')!r}, architectures {archs}: GGUF export "
            f"supports the llama architecture only ({', '.join(ARCHITECTURES)}, model_type 'llama')")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size"):
        if not isinstance(config.get(key), int):
            raise ExportError(f"{folder}/config.json has no integer {key!r}: not a complete Llama config")


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from quantwise.formats.shards import ShardedCheckpoint
    try:
        checkpoint = ShardedCheckpoint.open(folder, allow_non_float=True)
        tensors = {name: checkpoint.read(name, dtype=None).clone() for name in checkpoint.tensors}
        checkpoint.close()
    except (ModelLoadError, CheckpointError) as exc:
        raise ExportError(f"{folder}: cannot read its weights ({exc})") from None
    return tensors


def _layer_values(name: str, lm: dict[str, Any], tensors: dict[str, torch.Tensor],
                  layers: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, QuantSpec]:
    """(unpacked codes, scale, zero point, spec) of a saved QuantizedLayer."""
    owner = name
    while layers[owner].get("tied_to"):
        owner = layers[owner]["tied_to"]
    spec = QuantSpec.from_dict(lm["weight_spec"])
    shape = tuple(lm["weight_shape"])
    try:
        weight = tensors[f"{owner}.weight"]
        scale = tensors[f"{owner}.weight_scale"].float()
    except KeyError as exc:
        raise ExportError(f"checkpoint tensor {exc} is missing: is the folder complete?") from None
    zp = tensors.get(f"{owner}.weight_zero_point")
    zp = torch.zeros(scale.shape, dtype=torch.int32) if zp is None else zp
    if spec.format in _PACKED:
        codes = unpack_int4(weight, math.prod(shape[1:]), spec.format.is_signed).reshape(shape)
    else:
        codes = weight.reshape(shape)
    return codes, scale, zp, spec


# -- layout ------------------------------------------------------------------------------------
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from Hugging Face's rotate-half layout to llama.cpp's."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_qk (a GGUF q/k weight back to Hugging Face's layout)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _exact_blocks(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec,
                  qtype: str, round_scales: bool = False) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(int codes [rows, K], fp16 block scales [rows, K/32], exact) when GGUF `qtype` holds the
    codes; the scales must be fp16 numbers unless `round_scales` (then exact says if they were)."""
    if codes.dim() != 2 or codes.shape[1] % BLOCK or not spec.format.is_integer:
        return None
    if not spec.symmetric or bool((zp != 0).any()) or not spec.format.is_signed:
        return None
    rows, k = codes.shape
    g = spec.granularity
    if isinstance(g, PerTensor) or scale.dim() == 0:
        block_scale = scale.reshape(1, 1).expand(rows, k // BLOCK)
    elif isinstance(g, PerChannel) and g.axis % 2 == 0 and scale.numel() == rows:
        block_scale = scale.reshape(rows, 1).expand(rows, k // BLOCK)
    elif isinstance(g, PerGroup) and g.size % BLOCK == 0:
        block_scale = scale.reshape(rows, -1).repeat_interleave(g.size // BLOCK, dim=1)
    else:
        return None
    half = block_scale.to(torch.float16)
    exact = torch.equal(half.float(), block_scale)
    if not torch.isfinite(half).all() or not (exact or round_scales):
        return None
    c = codes.to(torch.int32)
    lo, hi = (-127, 127) if qtype == "Q8_0" else (-8, 7)
    if c.min() < lo or c.max() > hi:
        return None
    return c.numpy(), half.numpy(), exact


def _pack_blocks(codes: np.ndarray, scales: np.ndarray, qtype: str) -> np.ndarray:
    """GGUF's byte layout (as uint8 [rows, bytes]) of the given codes and fp16 block scales."""
    rows, k = codes.shape
    nb = k // BLOCK
    d = scales.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)  # 2 bytes, little-endian
    blocks = codes.reshape(rows, nb, BLOCK)
    if qtype == "Q8_0":
        qs = blocks.astype(np.int8).view(np.uint8)
    else:  # Q4_0: value = (nibble - 8) * d; element j in the low nibble of byte j, j+16 in the high
        u = (blocks + 8).astype(np.uint8)
        qs = u[..., :BLOCK // 2] | (u[..., BLOCK // 2:] << 4)
    return np.concatenate([d.reshape(rows, nb, 2), qs], axis=-1).reshape(rows, -1)


# -- export ------------------------------------------------------------------------------------
def export_gguf(folder: str | os.PathLike, out: str | os.PathLike, qtype: str = "Q8_0",
                overwrite: bool = False, *, keep_codes: bool = True) -> dict[str, Any]:
    """Write the quantwise checkpoint `folder` (a LlamaForCausalLM) as the GGUF file `out`.

    Returns {"path", "qtype", "bytes", "exact": [...], "requantized": [...], "float": [...],
    "tensors": {gguf name: {"source", "type", "shape", "how"}}, "tokenizer"}: "exact" are the
    weights whose quantwise codes and scales are stored as they are, "requantized" those
    dequantized and re-quantized into `qtype`'s blocks, "float" the F32 tensors (norms).
    `keep_codes=True`: a weight whose codes fit `qtype` but whose scales are not fp16 numbers
    (fp32 per-channel or group-128 scales) keeps its codes, with its scales rounded to fp16
    (relative change <= 2**-11 per scale), listed in "rounded", instead of being re-quantized
    by gguf's quantizer (stdlib-lm w4 -> Q4_0: +0.01% perplexity instead of +0.4%)."""
    gguf = _gguf()
    folder, out = Path(folder), Path(out)
    if not isinstance(qtype, str) or qtype.upper() not in QTYPES:
        raise ExportError(f"unsupported GGUF qtype {qtype!r}: supported are {', '.join(QTYPES)}")
    qtype = qtype.upper()
    meta = _read_metadata(folder)
    config, config_dir = _read_config(folder, meta)
    _check_config(config, folder)
    if meta.get("prescaled"):
        raise ExportError(f"{folder} divides some layers' inputs explicitly (SmoothQuant's "
                          f"prescaled modules {sorted(meta['prescaled'])[:3]}): llama.cpp's graph has no such "
                          "step; GGUF export supports weight-only checkpoints (w8, w4, GPTQ, AWQ, ...)")
    if out.exists() and not overwrite:
        raise OutputPathError(f"{out} already exists: pass overwrite=True or choose another file")
    if out.exists() and out.is_dir():
        raise OutputPathError(f"{out} is a folder: give a .gguf file path")
    if out.resolve().is_relative_to(folder.resolve()):
        raise OutputPathError(f"{out} is inside the input checkpoint {folder}: write it elsewhere")

    vocab = read_vocab(config, [folder, config_dir])

    layers = meta["layers"]
    tensors = _read_tensors(folder)
    n_layer = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ExportError(f"rope type {rope_type!r}: GGUF export supports the default RoPE only")
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ExportError("biased attention / MLP projections: GGUF export supports bias-free Llama only")

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    ggml_type = getattr(gguf.GGMLQuantizationType, qtype)
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}")
    hf_names = sorted({n[:-len(".weight")] for n in tensors if n.endswith(".weight")} | set(layers))
    report: dict[str, Any] = {"path": str(out), "qtype": qtype, "exact": [], "rounded": [],
                              "requantized": [], "float": [], "tensors": {}}
    planned = []
    for hf in hf_names:
        gname = names.get_name(f"{hf}.weight", try_suffixes=(".weight",))
        if gname is None:
            raise ExportError(f"checkpoint tensor {hf!r} has no llama GGUF name: not a plain "
                              "LlamaForCausalLM checkpoint")
        planned.append((hf, gname))

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(Path(folder).name)
        writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab)
        writer.add_string("quantwise.weight_specs", json.dumps(
            sorted({json.dumps(l["weight_spec"], sort_keys=True) for l in layers.values()})))

        for hf, gname in planned:
            data, how, dtype = _convert(hf, tensors, layers, qtype, ggml_type, n_head, n_kv, gguf,
                                      keep_codes)
            if dtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(gname, data)
            else:
                writer.add_tensor(gname, data, raw_dtype=dtype)
            shape = list(tensors[f"{hf}.weight"].shape) if hf not in layers else layers[hf]["weight_shape"]
            report["tensors"][gname] = {"source": hf, "type": dtype.name, "shape": shape, "how": how}
            report[how].append(gname)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, out)
        record_output(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report["bytes"] = out.stat().st_size
    report["tokenizer"] = {"model": vocab["model"], "pre": vocab["pre"], "pieces": vocab["source"],
                           "vocab_size": len(vocab["tokens"])}
    return report


def _convert(hf: str, tensors: dict[str, torch.Tensor], layers: dict[str, Any], qtype: str,
             ggml_type, n_head: int, n_kv: int, gguf, keep_codes: bool = False
             ) -> tuple[np.ndarray, str, Any]:
    """(data, how, ggml type) of one tensor: how is "exact", "rounded", "requantized" or "float"."""
    perm = n_head if hf.endswith("self_attn.q_proj") else n_kv if hf.endswith("self_attn.k_proj") else None
    if hf in layers:
        codes, scale, zp, spec = _layer_values(hf, layers[hf], tensors, layers)
        kept = _exact_blocks(codes, scale, zp, spec, qtype, keep_codes) if codes.dim() == 2 else None
        if kept is not None:
            c, d, exact = kept
            if perm:
                c, d = permute_qk(c, perm), permute_qk(d, perm)
            return _pack_blocks(c, d, qtype), "exact" if exact else "rounded", ggml_type
        values = dequantize(codes, scale, zp, spec).numpy().astype(np.float32)
    else:
        values = tensors[f"{hf}.weight"].float().numpy()
    if perm:
        values = permute_qk(values, perm)
    if values.ndim == 2 and values.shape[1] % BLOCK == 0:
        return gguf.quants.quantize(np.ascontiguousarray(values), ggml_type), "requantized", ggml_type
    return np.ascontiguousarray(values, dtype=np.float32), "float", gguf.GGMLQuantizationType.F32
