"""quantwise.stream: a Hugging Face folder quantized block by block from its shards gives the
checkpoint of the in-memory path, tensor for tensor; bad folders fail before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quantwise
from quantwise.errors import ConfigError, ModelLoadError, QuantwiseError
from quantwise.formats.synthetic import write_llama_folder
from quantwise.models.minilm import load_hf_folder
from quantwise.stream import quantize_folder

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # several shards, a block split across two of them
    return write_llama_folder(tmp_path_factory.mktemp("llama") / "src", dtype=torch.float32,
                              shard_bytes=200_000, **SMALL)


def _calib(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (2, 16), generator=g)} for _ in range(n)]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _meta(folder: Path) -> dict:
    return json.loads((folder / "quantwise.json").read_text())


@pytest.mark.parametrize("config", ["w8", "w4-gptq", "w4-awq", "w8a8-dynamic"])
def test_streamed_checkpoint_equals_the_in_memory_one(folder, tmp_path, config):
    calib = _calib()
    streamed = quantize_folder(folder, config, calib, tmp_path / "s", progress=False)
    model = load_hf_folder(folder)
    ref = quantwise.save(quantwise.quantize(model, config, calib, progress=False,
                                            source=str(folder)), tmp_path / "m")
    a, b = _tensors(streamed), _tensors(ref)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ma, mb = _meta(streamed), _meta(ref)
    assert ma["layers"] == mb["layers"] and ma["records"] == mb["records"]
    # one shard per block plus one for the rest, an index, the config with its quantization
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == SMALL["num_hidden_layers"] + 1
    assert "quantization_config" in json.loads((streamed / "config.json").read_text())
    loaded = quantwise.load(streamed)
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, quantwise.load(ref)(input_ids=ids).logits)


def test_bf16_shards_are_computed_in_float32(tmp_path):
    src = write_llama_folder(tmp_path / "bf16", dtype=torch.bfloat16, shard_bytes=100_000, **SMALL)
    streamed = quantize_folder(src, "w4-gptq", _calib(), tmp_path / "s", progress=False)
    model = load_hf_folder(src).float()  # bf16 -> float32 is exact
    ref = quantwise.save(quantwise.quantize(model, "w4-gptq", _calib(), progress=False,
                                            source=str(src)), tmp_path / "m")
    a, b = _tensors(streamed), _tensors(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_truncated_shard_fails_before_any_work(folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in folder.iterdir():
        (bad / path.name).write_bytes(path.read_bytes())
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    with pytest.raises(QuantwiseError, match=shard.name):
        quantize_folder(bad, "w4-gptq", _calib(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before


def test_static_activations_are_refused_clearly(folder, tmp_path):
    with pytest.raises(ConfigError, match="in memory"):
        quantize_folder(folder, "w8a8", _calib(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_gptq_without_calibration_data_is_an_error(folder, tmp_path):
    with pytest.raises(QuantwiseError, match="calibration data"):
        quantize_folder(folder, "w4-gptq", None, tmp_path / "out", progress=False)


def test_a_folder_without_blocks_is_refused(tmp_path):
    with pytest.raises((ModelLoadError, QuantwiseError)):
        quantize_folder(tmp_path, "w8", None, tmp_path / "out", progress=False)


def test_stdlib_lm_streams_to_the_in_memory_checkpoint(tmp_path):
    """The committed, trained stdlib-lm (a single-file folder with tied embeddings)."""
    from quantwise.models.stdlib_lm import WEIGHTS_DIR, load_stdlib_lm

    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 256, (2, 32), generator=g)} for _ in range(3)]
    streamed = quantize_folder(WEIGHTS_DIR, "w4-gptq", calib, tmp_path / "s", progress=False)
    ref = quantwise.save(quantwise.quantize(load_stdlib_lm(), "w4-gptq", calib, progress=False,
                                            source=str(WEIGHTS_DIR)), tmp_path / "m")
    a, b = _tensors(streamed), _tensors(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _meta(streamed)["layers"] == _meta(ref)["layers"]
    assert (streamed / "tokenizer.json").is_file()


@pytest.mark.parametrize("config", ["w4-gptq", "w8a8-dynamic"])
def test_minilm_streams_to_the_in_memory_checkpoint(tmp_path, config):
    """The real all-MiniLM-L6-v2: a sentence-transformers folder (BertModel wrapped, int64
    position ids stored, a pooler outside the blocks)."""
    from quantwise.models.minilm import default_minilm_path, load_tokenizer, tokenize

    src = default_minilm_path()
    tok = load_tokenizer(src)
    calib = [tokenize(tok, ["the quick brown fox jumps", "over the lazy dog, twice"]),
             tokenize(tok, ["quantized weights", "streamed from their shards"])]
    streamed = quantize_folder(src, config, calib, tmp_path / "s", progress=False)
    ref = quantwise.save(quantwise.quantize(load_hf_folder(src), config, calib, progress=False,
                                            source=str(src)), tmp_path / "m")
    a, b = _tensors(streamed), _tensors(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _meta(streamed)["layers"] == _meta(ref)["layers"]
    assert _meta(streamed)["records"] == _meta(ref)["records"]
    with torch.no_grad():  # reloads as the sentence embedder, the same embeddings
        assert torch.equal(quantwise.load(streamed)(**calib[0]), quantwise.load(ref)(**calib[0]))


def test_command_line_streams_a_folder(tmp_path, capsys):
    from quantwise.cli import main

    src = write_llama_folder(tmp_path / "src", dtype=torch.bfloat16, shard_bytes=100_000,
                             **{**SMALL, "vocab_size": 300})
    out = tmp_path / "out"
    code = main(["quantize", str(src), "--stream", "--config", "w4-gptq", "--calib", "stdlib-code",
                 "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["shards"] == SMALL["num_hidden_layers"] + 1
    assert report["peak_rss_mib"] > 0 and Path(report["out"]) == out
    assert quantwise.load(out) is not None
    assert main(["quantize", str(src), "--stream", "--config", "w8a8", "--out",
                 str(tmp_path / "o2")]) == 2
    assert "static activations" in capsys.readouterr().err and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("config", ["w4-gptq", "w8"])
def test_interrupted_run_resumes_to_the_uninterrupted_checkpoint(tmp_path, monkeypatch, config):
    import quantwise.stream.quantize as sq

    src = write_llama_folder(tmp_path / "src", dtype=torch.bfloat16, shard_bytes=100_000,
                             **{**SMALL, "num_hidden_layers": 4})
    whole = quantize_folder(src, config, _calib(), tmp_path / "whole", progress=False)
    real, calls = sq.load_block, []

    def interrupt_at_block_2(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(sq, "load_block", interrupt_at_block_2)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize_folder(src, config, _calib(), out, progress=False)
    partial = tmp_path / ".out.partial"
    assert not out.exists() and json.loads((partial / "progress.json").read_text())["done"] == 2
    with pytest.raises(QuantwiseError, match="another source"):  # another config: refused
        quantize_folder(src, "w4", None, out, progress=False, resume=True)
    if config == "w4-gptq":
        with pytest.raises(QuantwiseError, match="another source"):  # other calibration data
            quantize_folder(src, config, _calib(seed=5), out, progress=False, resume=True)
    read = []
    monkeypatch.setattr(sq, "load_block", lambda *args: read.append(args[1]) or real(*args))
    quantize_folder(src, config, _calib(), out, progress=False, resume=True)
    assert read == ["model.layers.2.", "model.layers.3."]  # blocks 0-1 kept, not redone
    a, b = _tensors(out), _tensors(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = _meta(out), _meta(whole)
    assert ma["layers"] == mb["layers"] and ma["records"] == mb["records"]
    assert not partial.exists() and not (out / "progress.json").exists()


def test_resume_without_a_partial_run_is_an_error(folder, tmp_path):
    with pytest.raises(QuantwiseError, match="nothing to resume"):
        quantize_folder(folder, "w8", None, tmp_path / "out", progress=False, resume=True)


def test_command_line_resume_needs_stream(capsys):
    from quantwise.cli import main

    assert main(["quantize", "digits", "--resume"]) == 2
    assert "--stream" in capsys.readouterr().err


@pytest.mark.parametrize("tie", [False, True])
def test_loading_a_streamed_folder_never_builds_the_float_model(tmp_path, monkeypatch, tie):
    src = write_llama_folder(tmp_path / "src", dtype=torch.bfloat16, shard_bytes=200_000,
                             tie_word_embeddings=tie, **SMALL)
    out = quantize_folder(src, "w4", None, tmp_path / "s", progress=False)
    made: list[bool] = []  # is_meta of every Linear weight built while loading
    init = torch.nn.Linear.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self.weight.is_meta)

    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    loaded = quantwise.load(out)
    monkeypatch.setattr(torch.nn.Linear, "__init__", init)
    assert made and all(made)  # the skeleton's Linears: meta weights, never allocated
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.modules())
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ref = quantwise.load(out, model=load_hf_folder(src))  # the float model's copy, as before
    ids = _calib(1)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_loading_a_folder_missing_a_tensor_names_it(folder, tmp_path):
    out = quantize_folder(folder, "w8", None, tmp_path / "s", progress=False)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(quantwise.CheckpointError, match="model.norm.weight"):
        quantwise.load(out)


def test_a_load_over_its_memory_budget_keeps_8bit_weights_as_codes_only(folder, tmp_path):
    from quantwise.kernels import LEAN_REASON
    from quantwise.state import get_state

    out = quantize_folder(folder, "w8", None, tmp_path / "s", progress=False)
    fast, lean = quantwise.load(out), quantwise.load(out, max_memory=1)
    fast_kernel = fast.model.layers[0].mlp.up_proj.kernel
    lean_kernel = lean.model.layers[0].mlp.up_proj.kernel
    assert lean_kernel.nbytes() < fast_kernel.nbytes()  # no fp16 copy beside the codes
    assert LEAN_REASON in get_state(lean).records["model.layers.0.mlp.up_proj"].reason
    assert LEAN_REASON not in (get_state(fast).records["model.layers.0.mlp.up_proj"].reason or "")
    ids = _calib(1)[0]["input_ids"]
    with torch.no_grad():  # 2 x 16 rows: the batched kernels (fp16-code GEMM vs dequantize)
        torch.testing.assert_close(lean(input_ids=ids).logits, fast(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_a_folder_too_big_for_memory_streams_without_the_flag(folder, tmp_path, monkeypatch, capsys):
    import quantwise.io
    from quantwise.cli import main

    float32 = 4 * sum(p.numel() for p in load_hf_folder(folder).parameters())
    monkeypatch.setattr(quantwise.io, "available_memory", lambda: float32)  # < 2 x the model
    from safetensors.torch import save_file
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, batch in enumerate(_calib(2)):
        save_file(batch, str(calib / f"{i}.safetensors"))
    out = tmp_path / "out"
    assert main(["quantize", str(folder), "--config", "w8", "--calib", str(calib),
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "block by block" in captured.err and "peak_rss_mib" in captured.out
    monkeypatch.setattr(quantwise.io, "available_memory", lambda: 100 * float32)  # fits: in memory
    assert main(["quantize", str(folder), "--config", "w8", "--calib", str(calib),
                 "--out", str(tmp_path / "o2"), "--json"]) == 0
    assert "speedup" in json.loads(capsys.readouterr().out)


def test_carried_hidden_states_past_the_budget_are_mapped_from_disk(folder, tmp_path, monkeypatch):
    import quantwise.stream.quantize as streaming
    from quantwise.stream.progress import Progress

    calib = _calib()
    held = quantize_folder(folder, "w4-gptq", calib, tmp_path / "held", progress=False)
    mapped: list[bool] = []
    save = Progress.save

    def spy(self, *args, **kwargs):
        out = save(self, *args, **kwargs)
        mapped.append(out is not None)
        return out

    monkeypatch.setattr(Progress, "save", spy)
    monkeypatch.setattr(streaming, "CARRY_FRACTION", 0.0)  # every block's outputs go to the file
    spilled = quantize_folder(folder, "w4-gptq", calib, tmp_path / "spilled", progress=False)
    assert mapped == [True] * SMALL["num_hidden_layers"]
    a, b = _tensors(spilled), _tensors(held)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_benchmark_measures_the_quantized_model_alone_when_the_float_one_does_not_fit(
        folder, tmp_path, monkeypatch, capsys):
    import quantwise.io
    from safetensors.torch import save_file

    from quantwise.cli import main

    out = quantize_folder(folder, "w8", None, tmp_path / "q", progress=False)
    data = tmp_path / "ids"
    data.mkdir()
    for i, batch in enumerate(_calib(2)):
        save_file(batch, str(data / f"{i}.safetensors"))
    monkeypatch.setattr(quantwise.io, "available_memory", lambda: 1000)  # nothing fits
    assert main(["benchmark", str(out), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["before"] is None and report["speedup"] is None
    assert report["after"]["metric"] == "perplexity" and report["after"]["quality"] > 1
    assert any("measuring the quantized model alone" in n for n in report["notes"])
    # the same perplexity as the model loaded and scored by hand
    batches = [load_file(str(data / f"{i}.safetensors")) for i in range(2)]
    expected = quantwise.evaluate(quantwise.load(out), batches, "perplexity").value
    assert report["after"]["quality"] == pytest.approx(expected, rel=1e-6)
    assert main(["benchmark", str(out)]) == 2  # no data: says what to pass
    assert "pass --data" in capsys.readouterr().err
    monkeypatch.setattr(quantwise.io, "available_memory", lambda: 10 ** 12)  # fits: side by side
    assert main(["benchmark", str(out), "--data", str(data)]) == 0
    assert "fp32: not measured" not in capsys.readouterr().out
