"""GGUF export (formats/gguf_export.py) of stdlib-lm: read back with gguf's own reader and
dequantizer, put into a float LlamaForCausalLM, compared with quantwise.load's perplexity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import quantwise  # noqa: E402
from quantwise.errors import OutputPathError, QuantwiseError  # noqa: E402
from quantwise.formats.gguf_export import ExportError, export_gguf, unpermute_qk  # noqa: E402
from quantwise.models.stdlib_lm import WEIGHTS_DIR, lm_batches, load_stdlib_lm  # noqa: E402

CONFIG = json.loads((WEIGHTS_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    calib = quantwise.data.load_calibration_data("stdlib-code")[:4]
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for preset in ("w8", "w4"):
        q = quantwise.quantize(load_stdlib_lm(), preset, calib, progress=False, source=str(WEIGHTS_DIR))
        quantwise.save(q, root / preset)
        out[preset] = root / preset
    return out


@pytest.fixture(scope="module")
def heldout():
    return list(lm_batches("heldout", 16, batch_size=8))


def _ppl(model, batches) -> float:
    return quantwise.evaluate(model, batches, "perplexity").value


def _field(reader, key):
    return reader.fields[key].contents()


def model_from_gguf(path) -> torch.nn.Module:
    """A float LlamaForCausalLM with the GGUF file's dequantized tensors (names and q/k
    permutation undone)."""
    reader = gguf.GGUFReader(path)
    n_layer = CONFIG["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        k: v for k, v in CONFIG.items() if k not in ("architectures", "transformers_version")}))
    hf_of = {}
    for hf in model.state_dict():
        hf_of[names.get_name(hf, try_suffixes=(".weight",))] = hf
    state = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        values = np.asarray(values, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        hf = hf_of[t.name]
        if hf.endswith("q_proj.weight"):
            values = unpermute_qk(values, CONFIG["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            values = unpermute_qk(values, CONFIG["num_key_value_heads"])
        state[hf] = torch.from_numpy(values.copy())
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return model.eval()


@pytest.mark.parametrize("preset,qtype", [("w8", "Q8_0"), ("w4", "Q4_0"), ("w8", "Q4_0")])
def test_roundtrip_perplexity(checkpoints, heldout, tmp_path, preset, qtype):
    folder = checkpoints[preset]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / f"{preset}-{qtype}.gguf"
    info = export_gguf(folder, out, qtype=qtype)
    assert out.is_file() and info["bytes"] == out.stat().st_size
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # input untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    n_mat = 2 + 7 * CONFIG["num_hidden_layers"]
    assert len(info["exact"]) + len(info["rounded"]) + len(info["requantized"]) == n_mat
    assert len(info["float"]) == 1 + 2 * CONFIG["num_hidden_layers"]
    ref = _ppl(quantwise.load(folder), heldout)
    got = _ppl(model_from_gguf(out), heldout)
    print(f"{preset}->{qtype}: quantwise {ref:.4f} gguf {got:.4f}")
    if qtype == "Q8_0" or preset == "w4":
        assert abs(got - ref) / ref < 0.005, (ref, got)
    else:  # int8 per channel -> 4-bit blocks of 32: another quantization, a bounded change
        assert abs(got - ref) / ref < 0.05, (ref, got)


def test_metadata_and_tokenizer(checkpoints, tmp_path):
    out = tmp_path / "m.gguf"
    info = export_gguf(checkpoints["w8"], out, qtype="Q8_0")
    reader = gguf.GGUFReader(out)
    arch = "llama"
    expect = {"general.architecture": "llama", f"{arch}.context_length": 256,
              f"{arch}.embedding_length": 256, f"{arch}.feed_forward_length": 640,
              f"{arch}.block_count": 4, f"{arch}.attention.head_count": 4,
              f"{arch}.attention.head_count_kv": 4, f"{arch}.rope.dimension_count": 64,
              "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
              "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 256,
              "tokenizer.ggml.eos_token_id": 257, "tokenizer.ggml.padding_token_id": 258}
    for key, value in expect.items():
        assert _field(reader, key) == value, key
    assert _field(reader, f"{arch}.rope.freq_base") == pytest.approx(10000.0)
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == 259 and tokens[0x41] == "<0x41>" and tokens[0x20] == "\u2581"
    assert tokens[256:] == ["<bos>", "<eos>", "<pad>"]
    assert types[256:] == [int(gguf.TokenType.CONTROL)] * 3
    assert types.count(int(gguf.TokenType.BYTE)) == 255
    # tokenizer round trip: every byte id decodes to its byte (SPM byte pieces)
    for i, tok in enumerate(tokens[:256]):
        raw = b" " if tok == "\u2581" else bytes([int(tok[3:5], 16)])
        assert raw == bytes([i])
    names = {t.name: t for t in reader.tensors}
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert names["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" in names and "token_embd.weight" in names
    assert info["tensors"]["blk.0.attn_k.weight"]["source"] == "model.layers.0.self_attn.k_proj"


def test_exact_codes_are_kept(checkpoints, tmp_path):
    """A weight whose scales are fp16 numbers is stored with its own codes, bit for bit."""
    src = tmp_path / "ck"
    shutil.copytree(checkpoints["w4"], src)
    from safetensors.torch import load_file, save_file
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight_scale"
    tensors[name] = tensors[name].half().float()
    save_file(tensors, src / "model.safetensors", metadata={"format": "quantwise", "version": "1"})
    info = export_gguf(src, tmp_path / "x.gguf", qtype="Q4_0")
    assert info["exact"] == ["blk.0.ffn_up.weight"]
    reader = gguf.GGUFReader(tmp_path / "x.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(640, 256)
    layer = quantwise.load(src).get_submodule("model.layers.0.mlp.up_proj")
    want = quantwise.numerics.dequantize(layer.codes(), layer.weight_scale, layer.zero_points(),
                                         layer.weight_spec).numpy()
    np.testing.assert_array_equal(got, want)


def test_refusals(checkpoints, tmp_path):
    out = tmp_path / "a.gguf"
    with pytest.raises(ExportError, match="Q8_0"):
        export_gguf(checkpoints["w8"], out, qtype="Q5_K")
    assert not out.exists()
    out.write_bytes(b"keep")
    with pytest.raises(OutputPathError):
        export_gguf(checkpoints["w8"], out)
    assert out.read_bytes() == b"keep"
    export_gguf(checkpoints["w8"], out, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    # another architecture
    other = tmp_path / "gpt2"
    shutil.copytree(checkpoints["w8"], other)
    cfg = dict(CONFIG, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="llama"):
        export_gguf(other, tmp_path / "b.gguf")
    # a non-LM model: the built-in digits CNN
    from quantwise.models.registry import load_model
    digits = load_model("digits")[0]
    qd = quantwise.quantize(digits, "w8", None, progress=False, source="digits")
    quantwise.save(qd, tmp_path / "digits")
    with pytest.raises(ExportError, match="llama|Llama") as exc:
        export_gguf(tmp_path / "digits", tmp_path / "c.gguf")
    assert isinstance(exc.value, QuantwiseError)
    assert not (tmp_path / "c.gguf").exists()


def test_transformers_gguf_loader(checkpoints, heldout, tmp_path):
    """transformers' own GGUF loader (it needs accelerate) reads the file: same perplexity, and
    its tokenizer gives stdlib-lm's byte ids, with one quirk: it prepends a space piece (its
    sentencepiece builder ignores tokenizer.ggml.add_space_prefix = false)."""
    pytest.importorskip("accelerate")
    from quantwise.models.stdlib_lm import ByteTokenizer
    export_gguf(checkpoints["w8"], tmp_path / "m.gguf", qtype="Q8_0")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert isinstance(model, transformers.LlamaForCausalLM) and model.config.vocab_size == 259
    ref = _ppl(quantwise.load(checkpoints["w8"]), heldout)
    got = _ppl(model.eval(), heldout)
    assert abs(got - ref) / ref < 0.005, (ref, got)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "def f(x):\n    return  'é€' \t# end\n"
    ids = tok(text)["input_ids"]
    assert ids == ByteTokenizer().encode(" " + text)
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_keep_codes_rounds_scales_only(checkpoints, heldout, tmp_path):
    """keep_codes: int4 group-128 codes kept in Q4_0 blocks, scales rounded to fp16: far closer
    to quantwise than gguf's re-quantization (which the default path measures above)."""
    out = tmp_path / "k.gguf"
    info = export_gguf(checkpoints["w4"], out, qtype="Q4_0", keep_codes=True)
    assert len(info["rounded"]) == 2 + 7 * CONFIG["num_hidden_layers"] and not info["requantized"]
    ref = _ppl(quantwise.load(checkpoints["w4"]), heldout)
    got = _ppl(model_from_gguf(out), heldout)
    print(f"w4->Q4_0 keep_codes: quantwise {ref:.4f} gguf {got:.4f}")
    assert abs(got - ref) / ref < 0.0005, (ref, got)
    # w8's int8 codes do not fit Q4_0: re-quantized even with keep_codes
    info = export_gguf(checkpoints["w8"], tmp_path / "k8.gguf", qtype="Q4_0", keep_codes=True)
    assert not info["rounded"] and len(info["requantized"]) == 2 + 7 * CONFIG["num_hidden_layers"]
