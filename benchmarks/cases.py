"""The three benchmark models and their fixed inputs (latency batch, quality set, calibration set).

Inputs are built once per model and shared by every system, so all of them see identical data.
Calibration data never overlaps the quality data.
"""

from __future__ import annotations

import torch

from harness import Case
from resnet18 import build_resnet18, random_images

MINILM_BATCH, MINILM_SEQ = 32, 64
MINILM_CALIB_SENTENCES = 256  # 8 batches: enough for MinMax/percentile ranges, keeps the run short


def _chunks_padded(items: list, size: int) -> list[list]:
    """Split into full-size chunks; the last is padded by repeating its final item (outputs of
    the padding rows are dropped), so every system always sees the exact latency shape."""
    out = [items[i:i + size] for i in range(0, len(items), size)]
    out[-1] = out[-1] + [out[-1][-1]] * (size - len(out[-1]))
    return out


def resnet18_case(init: str = "default") -> Case:
    """ResNet-18, batch 8 x 3x224x224, random weights (see resnet18.py for `init`)."""
    return Case(
        name="resnet18",
        description=f"ResNet-18 (random weights, init {init!r}), batch 8, 3x224x224; quality "
                    "on 32 random N(0,1) images vs fp32 torch",
        model=build_resnet18(seed=0, init=init),
        latency_input=random_images(8, seed=1),
        quality_inputs=[random_images(8, seed=s) for s in (1, 2, 3, 4)],
        quality_rows=32,
        calib=[random_images(8, seed=s) for s in (10, 11, 12, 13)],
        kind="classifier",
    )


def minilm_case() -> Case:
    """all-MiniLM-L6-v2, latency on a fixed 32x64 batch, quality on all 944 held-out sentences."""
    from quantwise.data import corpus_split
    from quantwise.models.minilm import load_minilm, load_tokenizer, tokenize

    tok = load_tokenizer()
    heldout = corpus_split("heldout")
    calib = corpus_split("calib")[:MINILM_CALIB_SENTENCES]
    quality = [tokenize(tok, chunk, max_length=MINILM_SEQ)
               for chunk in _chunks_padded(heldout, MINILM_BATCH)]
    return Case(
        name="minilm",
        description=f"all-MiniLM-L6-v2 (pretrained), batch {MINILM_BATCH}, sequence {MINILM_SEQ}; "
                    f"quality on {len(heldout)} held-out sentences vs fp32 torch embeddings",
        model=load_minilm(),
        latency_input=quality[0],
        quality_inputs=quality,
        quality_rows=len(heldout),
        calib=[tokenize(tok, chunk, max_length=MINILM_SEQ)
               for chunk in _chunks_padded(calib, MINILM_BATCH)],
        kind="embedding",
    )


def digits_case() -> Case:
    """The bundled digits CNN: latency and quality on the whole test split (360 images)."""
    from quantwise.models.digits import digits_calib_batches, digits_data, load_digits_model

    images, labels = digits_data("test")
    return Case(
        name="digits",
        description=f"digits CNN (trained), batch {len(images)} (the whole test split), 1x8x8; "
                    "top-1 accuracy vs labels and agreement with fp32",
        model=load_digits_model(),
        latency_input=images,
        quality_inputs=[images],
        quality_rows=len(images),
        calib=list(digits_calib_batches(32)),
        kind="classifier",
        labels=labels,
    )


CASES = {"resnet18": resnet18_case, "minilm": minilm_case, "digits": digits_case}


@torch.no_grad()
def reference_outputs(case: Case) -> torch.Tensor:
    """fp32 torch outputs on the quality inputs: what every system is compared with."""
    from harness import as_tensor, call_torch

    outs = [as_tensor(call_torch(case.model, x)).flatten(1) for x in case.quality_inputs]
    return torch.cat(outs)[: case.quality_rows]
