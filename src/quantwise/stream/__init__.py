"""Quantize Hugging Face checkpoints larger than memory, block by block, streamed from disk.

    quantwise.stream.quantize_folder(folder, "w4-gptq", calib_data, out)

folder.py builds the model on the meta device and reads the embeddings, the head and one block
at a time from the shards (float32); quantize.py runs the method through the block runner
(methods/blocks.py), converts and writes each block's shard, and publishes the output folder;
progress.py keeps an interrupted run's finished blocks for `resume`.
"""

from quantwise.stream.quantize import quantize_folder

__all__ = ["quantize_folder"]
