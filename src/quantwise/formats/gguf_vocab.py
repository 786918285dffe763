"""The tokenizer of a GGUF export (formats/gguf_export.py): what llama.cpp needs to tokenize as
the model's own tokenizer does, read with the gguf package's own vocabulary classes where it
has them.

Supported, each exact by construction:
- quantwise's byte-level tokenizer (tokenizer.json of type "bytes", stdlib-lm's): ids 0..255
  are the bytes, written as SentencePiece byte pieces <0xNN> (U+2581 for the space byte);
- a SentencePiece model (tokenizer.model: Llama 1 / 2, TinyLlama, Mistral), through
  gguf.vocab.SentencePieceVocab: its pieces, scores and types as sentencepiece gives them
  (needs the sentencepiece package). llama.cpp applies no SentencePiece normalizer: a model
  trained as Llama's (identity normalization, extra whitespace kept) tokenizes the same, one
  trained with sentencepiece's defaults (NFKC, whitespace runs collapsed) does not;
- a GPT-2-style byte-level BPE (tokenizer.json: model BPE, ByteLevel pre-tokenizer with the
  GPT-2 regex and decoder), through gguf.vocab.BpeVocab with its merges: llama.cpp's "gpt-2"
  pre-tokenizer splits text as that regex does.
Refused, with the reason: a tokenizer.json-only Llama BPE with byte fallback (gguf's
LlamaHfVocab gives every piece the same score, so llama.cpp's SentencePiece tokenizer would
merge in another order), other pre-tokenizer regexes (llama.cpp names each by a hash of its
output that we cannot check here), WordPiece / Unigram tokenizer.json files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from quantwise.errors import ExportError

SPACE_PIECE = "\u2581"  # SentencePiece's visible space
SUPPORTED = ("quantwise's byte tokenizer (tokenizer.json type 'bytes')",
             "a SentencePiece tokenizer.model", "a GPT-2-style byte-level BPE tokenizer.json")


def _gguf():
    import gguf

    return gguf


def byte_vocab(config: dict[str, Any], tok: dict[str, Any]) -> dict[str, Any]:
    """The byte-level vocabulary as SPM pieces: tokens, scores, types and special ids."""
    gguf = _gguf()
    vocab = int(config["vocab_size"])
    if vocab < 256:
        raise ExportError(f"vocab_size {vocab} < 256: not a byte-level vocabulary")
    special = {"bos": tok.get("bos_token_id", config.get("bos_token_id")),
               "eos": tok.get("eos_token_id", config.get("eos_token_id")),
               "pad": tok.get("pad_token_id", config.get("pad_token_id"))}
    tokens, types = [], []
    for i in range(256):
        tokens.append(SPACE_PIECE if i == 0x20 else f"<0x{i:02X}>")
        types.append(gguf.TokenType.NORMAL if i == 0x20 else gguf.TokenType.BYTE)
    names = {v: k for k, v in special.items() if isinstance(v, int)}
    for i in range(256, vocab):
        tokens.append(f"<{names[i]}>" if i in names else f"<extra_{i}>")
        types.append(gguf.TokenType.CONTROL if i in names else gguf.TokenType.UNUSED)
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": [0.0] * vocab,
            "types": [int(t) for t in types], "special": None, "add_bos": True,
            "add_space_prefix": False, "source": "byte tokenizer (<0xNN> pieces, U+2581 for space)",
            **{k: v for k, v in special.items() if isinstance(v, int) and 0 <= v < vocab}}


def _is_gpt2_bpe(tok: dict[str, Any]) -> bool:
    model, pre, dec = tok.get("model") or {}, tok.get("pre_tokenizer") or {}, tok.get("decoder") or {}
    return (model.get("type") == "BPE" and not model.get("byte_fallback", False)
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and dec.get("type") == "ByteLevel")


def _padded(tokens: list, scores: list, types: list, vocab: int, source: str) -> None:
    """Pad to config.vocab_size (embedding rows past the tokenizer's, as convert_hf_to_gguf)."""
    gguf = _gguf()
    if len(tokens) > vocab:
        raise ExportError(f"the tokenizer ({source}) has {len(tokens)} tokens but the model's "
                          f"vocab_size is {vocab}: they do not belong together")
    for i in range(len(tokens), vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)


def hf_vocab(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The vocabulary of a tokenizer.model / tokenizer.json in `folder` via gguf.vocab."""
    gguf = _gguf()
    vocab_size = int(config["vocab_size"])
    if (folder / "tokenizer.model").is_file():
        try:
            import sentencepiece  # noqa: F401
        except ImportError as exc:
            raise ExportError(f"{folder / 'tokenizer.model'} is a SentencePiece model: GGUF export "
                              "reads it with the sentencepiece package (pip install sentencepiece)") from exc
        vocab, model, pre, merges = gguf.vocab.SentencePieceVocab(folder), "llama", "default", False
        source = "SentencePiece tokenizer.model"
    else:
        tok = json.loads((folder / "tokenizer.json").read_text())
        if not _is_gpt2_bpe(tok):
            kind = (tok.get("model") or {}).get("type")
            why = ("a Llama BPE with byte fallback and no tokenizer.model: its pieces carry no "
                   "scores, so llama.cpp would merge in another order; put the model's "
                   "tokenizer.model next to it" if kind == "BPE" and (tok.get("model") or {}).get("byte_fallback")
                   else f"a {kind} tokenizer.json with pre-tokenizer "
                        f"{(tok.get('pre_tokenizer') or {}).get('type')!r}")
            raise ExportError(f"{folder / 'tokenizer.json'} is {why}: GGUF export supports "
                              + ", ".join(SUPPORTED))
        vocab, model, pre, merges = gguf.vocab.BpeVocab(folder), "gpt2", "gpt-2", True
        source = "GPT-2 byte-level BPE tokenizer.json (pre-tokenizer gpt-2, with merges)"
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(kind)
    _padded(tokens, scores, types, vocab_size, source)
    special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=len(tokens))
    if merges and not special.merges:
        raise ExportError(f"{folder / 'tokenizer.json'} has no merges: a BPE vocabulary without "
                          "them cannot be tokenized by llama.cpp")
    return {"model": model, "pre": pre, "tokens": tokens, "scores": scores,
            "types": [int(t) for t in types], "special": special, "source": source}


def read_vocab(config: dict[str, Any], dirs: list[Optional[Path]]) -> dict[str, Any]:
    """The GGUF vocabulary of the first of `dirs` (the checkpoint, then its source model) that
    holds a tokenizer; ExportError naming what is supported where none is."""
    for folder in (d for d in dirs if d is not None):
        path = folder / "tokenizer.json"
        if path.is_file():
            try:
                tok = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise ExportError(f"{path} is not a readable tokenizer.json ({exc})") from exc
            if isinstance(tok, dict) and tok.get("type") == "bytes":
                return byte_vocab(config, tok)
        if path.is_file() or (folder / "tokenizer.model").is_file():
            return hf_vocab(config, folder)
    raise ExportError("the checkpoint has no tokenizer (tokenizer.json / tokenizer.model next to "
                      "config.json, or in its source model's folder): GGUF export supports "
                      + ", ".join(SUPPORTED))


def write_vocab(writer, vocab: dict[str, Any]) -> None:
    """The tokenizer keys of `vocab` into a GGUFWriter."""
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    if vocab["special"] is not None:  # ids, add_bos / add_eos, merges, chat template
        vocab["special"].add_to_gguf(writer, quiet=True)
        return
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id)):
        if key in vocab:
            add(vocab[key])
    writer.add_add_bos_token(vocab["add_bos"])  # each text starts with BOS in stdlib-lm's stream
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab["add_space_prefix"])
