"""`quantwise quantize FOLDER --stream`: the streamed quantization of a Hugging Face folder, with
what it took (time, peak resident memory) and what it wrote. The float model is never loaded,
so there is no before / after measurement here (`quantwise benchmark OUT` does that)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantwise.config import Config
from quantwise.data import load_calibration_data
from quantwise.evaluate import folder_bytes
from quantwise.models.hf import folder_tokenizer
from quantwise.stream.quantize import quantize_folder


def stream_by_default(ref: str) -> str | None:
    """Why `quantwise quantize REF` should stream: REF is a Hugging Face folder whose float32
    weights would take more than half the memory available (the in-memory path holds the float
    model and its quantized copy); None otherwise (not such a folder, or it fits)."""
    from quantwise.formats.shards import float32_bytes
    from quantwise.io import available_memory

    path = Path(ref)
    float32 = float32_bytes(path) if (path / "config.json").is_file() else None
    available = available_memory()
    if float32 is None or available is None or 2 * float32 <= available:
        return None
    return (f"{path} is {float32 / 1e9:.1f} GB in float32 with {available / 1e9:.1f} GB of memory "
            "available: quantizing it block by block from its shards (as with --stream)")


def run_stream_job(folder: str, config: str, calib: str | None, out: str | None,
                   overwrite: bool = False, progress: bool = True,
                   log: Callable[[str], None] = lambda _: None, resume: bool = False
                   ) -> dict[str, Any]:
    from quantwise.job import default_out

    src = Path(folder)
    cfg = Config.resolve(config)
    target = Path(out) if out else default_out(folder, cfg.name)
    calib_data = None
    if calib:
        calib_data = load_calibration_data(calib, None, tokenizer=folder_tokenizer(src), batch_size=8)
        log(f"{len(calib_data)} calibration batches from {calib!r}")
    log(f"streaming {src} block by block with {cfg.name} into {target}"
        + (" (resuming)" if resume else ""))
    start = time.perf_counter()
    quantize_folder(src, cfg, calib_data, target, overwrite=overwrite, progress=progress,
                    source=str(src), resume=resume)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    shards = sorted(p.name for p in target.glob("*.safetensors"))
    return {"model": str(src), "config": cfg.name, "out": str(target), "seconds": round(seconds, 1),
            "peak_rss_mib": round(peak / 2 ** 20, 1), "shards": len(shards),
            "size_mib": round(folder_bytes(target) / 2 ** 20, 2)}
