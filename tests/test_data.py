"""Calibration data sources: stdlib corpus, built-in data sets, text files, tensor folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from quantwise import data
from quantwise.data import corpus_split, load_calibration_data, stdlib_corpus
from quantwise.errors import DataLoadError
from quantwise.models.registry import builtin_info


@pytest.fixture(scope="module")
def tokenizer():
    from quantwise.models.minilm import load_tokenizer

    return load_tokenizer()


DIGITS = builtin_info("digits")


# ---------------------------------------------------------------- corpus

def test_corpus_is_real_deterministic_and_large():
    first = stdlib_corpus()
    data._corpus.cache_clear()  # rebuild from scratch, not from the cache
    assert stdlib_corpus() == first
    assert len(first) >= 1500 and len(set(first)) == len(first)
    assert all(6 <= len(s.split()) <= 60 and s[0].isupper() and s[-1] in ".!?" for s in first)
    assert not any(">>>" in s for s in first)
    assert any("JSON" in s for s in first) and any("logger" in s.lower() for s in first)


def test_corpus_splits_disjoint_and_fixed():
    calib, heldout = corpus_split("calib"), corpus_split("heldout")
    assert (len(calib), len(heldout)) == (512, 944)
    assert not set(calib) & set(heldout)
    assert calib == corpus_split("calib") and calib != stdlib_corpus()[:512]  # seeded shuffle
    with pytest.raises(DataLoadError, match="'calib' or 'heldout'"):
        corpus_split("train")


# ---------------------------------------------------------------- built-in data sets

def test_builtin_digits_batches_and_limit():
    batches = load_calibration_data("digits", DIGITS, batch_size=32)
    assert [b.shape for b in batches] == [(32, 1, 8, 8)] * 8
    limited = load_calibration_data("digits", DIGITS, batch_size=32, limit=40)
    assert [len(b) for b in limited] == [32, 8] and torch.equal(limited[0], batches[0])


def test_builtin_stdlib_text(tokenizer):
    batches = load_calibration_data("stdlib-text", builtin_info("minilm"), tokenizer, batch_size=100)
    assert [b["input_ids"].shape for b in batches] == [(100, 64)] * 5 + [(12, 64)]
    assert set(batches[0]) >= {"input_ids", "attention_mask"}
    assert batches[0]["input_ids"].dtype == torch.int64
    with pytest.raises(DataLoadError, match="no tokenizer"):
        load_calibration_data("stdlib-text", DIGITS)


# ---------------------------------------------------------------- text files

def test_text_file_one_sample_a_line(tmp_path, tokenizer):
    f = tmp_path / "calib.txt"
    f.write_text("The first sentence.\n\nThe second one.\nA third.\nFour.\nFive!\n")
    batches = load_calibration_data(str(f), builtin_info("minilm"), tokenizer, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]  # blank line skipped
    expected = tokenizer("The first sentence.")["input_ids"]
    assert batches[0]["input_ids"][0, :len(expected)].tolist() == expected
    assert len(load_calibration_data(str(f), builtin_info("minilm"), tokenizer, limit=3)[0]["input_ids"]) == 3
    with pytest.raises(DataLoadError, match="no tokenizer"):
        load_calibration_data(str(f), DIGITS)


def test_empty_and_binary_text_files(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataLoadError, match="empty calibration data.*empty.txt"):
        load_calibration_data(str(empty), None, tokenizer)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataLoadError, match="blob.bin is not UTF-8"):
        load_calibration_data(str(binary), None, tokenizer)


# ---------------------------------------------------------------- tensor folders

def test_npy_folder_sorted_and_batched(tmp_path):
    for i in range(5):  # names sort as 00..04; values identify the file
        np.save(tmp_path / f"{i:02d}.npy", np.full((1, 8, 8), i, dtype=np.float64))
    (tmp_path / "README.txt").write_text("ignored")
    batches = load_calibration_data(str(tmp_path), DIGITS, batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 1, 8, 8), (2, 1, 8, 8), (1, 1, 8, 8)]
    assert batches[0].dtype == torch.float32  # float64 arrays become float32
    assert [b[:, 0, 0, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert [len(b) for b in load_calibration_data(str(tmp_path), DIGITS, limit=3)] == [3]
    np.save(tmp_path / "05.npy", np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(DataLoadError, match="05.npy has shape \\(3, 3\\)"):
        load_calibration_data(str(tmp_path), DIGITS)


def test_npy_batches_kept_for_custom_models(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 10), dtype=np.float32))
    np.save(tmp_path / "b.npy", np.zeros((6, 10), dtype=np.float32))
    batches = load_calibration_data(str(tmp_path), None, batch_size=8)
    assert [tuple(b.shape) for b in batches] == [(4, 10), (6, 10)]  # 4 + 6 > 8: not merged
    single = load_calibration_data(str(tmp_path / "b.npy"), None)
    assert len(single) == 1 and torch.equal(single[0], torch.zeros(6, 10))


def test_safetensors_folder(tmp_path):
    save_file({"x": torch.randn(2, 1, 8, 8)}, str(tmp_path / "a.safetensors"))
    save_file({"input_ids": torch.ones(2, 5, dtype=torch.int64),
               "attention_mask": torch.ones(2, 5, dtype=torch.int64)}, str(tmp_path / "b.safetensors"))
    batches = load_calibration_data(str(tmp_path), None)
    assert isinstance(batches[0], torch.Tensor) and batches[0].shape == (2, 1, 8, 8)
    assert isinstance(batches[1], dict) and sorted(batches[1]) == ["attention_mask", "input_ids"]
    (tmp_path / "c.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataLoadError, match="c.safetensors"):
        load_calibration_data(str(tmp_path), None)


def test_pickle_npy_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataLoadError, match="obj.npy.*pickle"):
        load_calibration_data(str(tmp_path), None)
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    with pytest.raises(DataLoadError, match="text.npy holds a <U1 array"):
        load_calibration_data(str(tmp_path / "text.npy"), None)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataLoadError, match="not found.*digits, stdlib-text"):
        load_calibration_data(str(tmp_path / "missing"), DIGITS)
    with pytest.raises(DataLoadError, match="empty calibration data.*no .npy or .safetensors"):
        load_calibration_data(str(tmp_path), DIGITS)
    np.save(tmp_path / "zero.npy", np.zeros((0, 1, 8, 8), dtype=np.float32))
    with pytest.raises(DataLoadError, match="empty calibration data"):
        load_calibration_data(str(tmp_path), DIGITS)
    with pytest.raises(DataLoadError, match="must be >= 1"):
        load_calibration_data("digits", DIGITS, batch_size=0)
