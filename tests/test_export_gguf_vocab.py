"""GGUF export of a Llama with a Hugging Face tokenizer (formats/gguf_vocab.py): a GPT-2-style
byte-level BPE trained here on standard-library text, grouped-query attention; the file's
vocabulary and merges equal the tokenizer's, and llama.cpp (where llama-cpp-python is
installed) tokenizes held-out text to the same ids."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import quantwise  # noqa: E402
from quantwise.errors import ExportError  # noqa: E402
from quantwise.formats.gguf_export import export_gguf  # noqa: E402

TEXT = "def main(argv):\n    return {'path': os.path.join(root, name)}  # ünïcode ✓\n"


def _stdlib_lines(limit: int = 4000) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for name in ("os.py", "json/encoder.py", "argparse.py"):
        lines += (lib / name).read_text(encoding="utf-8").splitlines()
    return lines[:limit]


@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_stdlib_lines(), trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")
    src = root / "float"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(fast) + 4, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    fast.save_pretrained(src)
    from quantwise.models.registry import load_model
    model = load_model(str(src))[0]
    calib = [{"input_ids": torch.tensor([fast(line)["input_ids"][:32]])} for line in _stdlib_lines(60)
             if len(fast(line)["input_ids"]) >= 8][:4]
    q = quantwise.quantize(model, "w8", calib, progress=False, source=str(src))
    quantwise.save(q, root / "w8")
    return root / "w8", fast


def test_bpe_vocabulary_merges_and_tokenization_survive(bpe_checkpoint, tmp_path):
    folder, fast = bpe_checkpoint
    out = tmp_path / "bpe.gguf"
    info = export_gguf(folder, out, qtype="Q8_0")
    assert info["tokenizer"]["model"] == "gpt2" and info["tokenizer"]["pre"] == "gpt-2"
    reader = gguf.GGUFReader(out)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokens = field("tokenizer.ggml.tokens")
    vocab = fast.get_vocab()
    assert len(tokens) == len(fast) + 4  # padded to the embedding's rows
    assert all(tokens[i] == piece for piece, i in vocab.items())
    merges = json.loads(fast.backend_tokenizer.to_str())["model"]["merges"]
    assert len(field("tokenizer.ggml.merges")) == len(merges) > 100
    assert field("tokenizer.ggml.eos_token_id") == fast.eos_token_id
    assert field("llama.attention.head_count_kv") == 2
    try:
        import llama_cpp
    except ImportError:
        return  # llama-cpp-python is not in the extras (it compiles llama.cpp)
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False) == fast(TEXT)["input_ids"]


def test_tokenizers_llama_cpp_would_read_otherwise_are_refused(bpe_checkpoint, tmp_path):
    folder, fast = bpe_checkpoint
    bad = tmp_path / "ck"
    bad.mkdir()
    for p in folder.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["model"]["byte_fallback"] = True  # a Llama-style BPE without tokenizer.model
    tok["decoder"] = {"type": "Sequence", "decoders": []}
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ExportError, match="byte fallback.*tokenizer.model"):
        export_gguf(bad, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_sentencepiece_model_pieces_scores_and_tokenization_survive(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    src = tmp_path / "float"
    src.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_stdlib_lines(3000)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(src / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   # as Llama's: llama.cpp applies no SentencePiece normalizer
                                   normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                                   split_digits=True)
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=sp.get_piece_size(), hidden_size=128, intermediate_size=256,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    from quantwise.models.registry import load_model
    model = load_model(str(src))[0]
    calib = [{"input_ids": torch.tensor([sp.encode(line)[:32]])} for line in _stdlib_lines(40)
             if len(sp.encode(line)) >= 8][:4]
    quantwise.save(quantwise.quantize(model, "w8", calib, progress=False, source=str(src)),
                   tmp_path / "w8")
    out = tmp_path / "spm.gguf"
    info = export_gguf(tmp_path / "w8", out, qtype="Q8_0")
    assert info["tokenizer"]["model"] == "llama"
    reader = gguf.GGUFReader(out)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert scores == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False) == sp.encode(TEXT)
