"""Block-by-block runner for transformer stacks (GPTQ, AWQ).

    blocks_name, blocks = find_blocks(model)          # e.g. "model.layers" (Llama)
    run_blocks(model, calib_data, process, linears)   # process(block_index, BlockPass)

1. The repeated blocks: the longest nn.ModuleList whose children are modules of one type that
   contain Linears (model.layers for Llama, transformer.h for GPT-2, encoder.layer for BERT).
2. The inputs of block 0 (positional and keyword arguments: hidden states, attention masks,
   position embeddings) are captured by running the model on each calibration sample with a
   pre-hook on block 0 that raises once it has stored them; nothing after block 0 runs. KV caches
   in the captured arguments are dropped (use_cache=False), so re-running a block is pure.
3. For each block: `process(index, BlockPass)` gathers what its method needs (BlockPass.collect
   runs the block on every captured input with hooks on its Linears), changes the block's
   weights, and returns; the block is then run once more on the same inputs, with the modified
   weights, and its outputs replace the inputs (they are the next block's inputs).

Memory: one block's inputs (one hidden-state tensor per calibration sample) plus whatever the
method gathers for that block; shared keyword tensors (masks, rotary tables) are referenced.
Padding tokens (attention_mask == 0 of a dict sample) are left out of the statistics.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantwise.errors import CalibrationError, QuantwiseError
from quantwise.data import run_model
from quantwise.modules.layers import is_hf_conv1d


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(qualified name, ModuleList) of the model's repeated blocks, or None.

    The longest nn.ModuleList of same-type children that each contain a Linear (transformers'
    Conv1D counts); on a tie the outermost (first in named_modules order)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or is_linear(module[0]):
            continue
        if not all(any(is_linear(m) for m in child.modules()) for child in module):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to do
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim).

    Freed tensors below glibc's mmap threshold, which rises to the size of the largest freed
    block (a Hessian, a layer's inputs), go back to the heap, not to the OS: block after block
    the heap fills with free holes and the process's resident memory grows past what is alive.
    Called between blocks (about a millisecond) it brings the resident size back to the live
    data; peaks inside a block still count the holes the block's own temporaries reuse."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _Captured(Exception):
    pass


@dataclass
class BlockInput:
    """One calibration sample's inputs to the current block."""

    args: list
    kwargs: dict
    token_mask: torch.Tensor | None  # [B, T] bool of real tokens, when the sample had a mask

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        if self.args:
            self.args[0] = value
        else:
            self.kwargs["hidden_states"] = value


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache") or hasattr(value, "get_seq_length")


def _clean_kwargs(kwargs: dict) -> dict:
    """Drop KV caches (a re-run must not append to them) and ask for no cache."""
    out = {}
    for key, value in kwargs.items():
        if key in ("use_cache",):
            value = False
        elif value is not None and _is_cache(value):
            value = None
        out[key] = value
    return out


def _token_mask(sample: Any) -> torch.Tensor | None:
    if isinstance(sample, dict):
        mask = sample.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.bool()
    return None


def capture_block_inputs(model: nn.Module, block: nn.Module, calib_data: Iterable[Any]
                         ) -> list[BlockInput]:
    """The inputs of `block` for each calibration sample (the model stops right there)."""
    captured: list[BlockInput] = []
    current: dict[str, Any] = {}

    def hook(module, args, kwargs):
        if any(_is_cache(a) for a in args[1:]):
            args = (args[0], *[None if _is_cache(a) else a for a in args[1:]])
        captured.append(BlockInput(list(args), _clean_kwargs(kwargs), current.get("mask")))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for index, sample in enumerate(calib_data):
            current["mask"] = _token_mask(sample)
            before = len(captured)
            try:
                run_model(model, sample)
            except _Captured:
                pass
            except QuantwiseError:
                raise
            except Exception as exc:  # noqa: BLE001 - translate at the boundary
                raise CalibrationError(f"calibration sample {index} failed before the first "
                                       f"block: {exc}") from exc
            if len(captured) == before:
                raise CalibrationError(f"calibration sample {index} never reached the model's "
                                       "first block")
    finally:
        handle.remove()
    if not captured:
        raise CalibrationError("calibration data is empty: pass at least one model input")
    return captured


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise QuantwiseError(f"cannot find the hidden states in a block's output ({type(output).__name__})")


def rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A Linear's input as [tokens, in] float32, padding tokens removed when `mask` fits."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask]
    return x.reshape(-1, x.shape[-1]).float()


@dataclass
class BlockPass:
    """What a method sees of one block: the block, its selected Linears (qualified name ->
    module) and the block's inputs."""

    index: int
    name: str
    block: nn.Module
    linears: dict[str, nn.Module]
    inputs: list[BlockInput]
    forward_calls: int = 0
    groups: dict[str, list[str]] = field(default_factory=dict)  # leader -> Linears sharing its input

    def forward(self, item: BlockInput) -> torch.Tensor:
        self.forward_calls += 1
        return _first(self.block(*item.args, **item.kwargs))

    def collect(self, on_input: Callable[[str, torch.Tensor], None],
                only: Iterable[str] | None = None) -> dict[str, list[str]]:
        """Run the block on every input; call on_input(leader, rows) once per distinct Linear
        input per sample (Linears fed the very same tensor, e.g. q/k/v, share one leader).
        Returns (and keeps in .groups) leader -> [names of the Linears sharing that input], in
        the order the block calls them. `only`: watch just these Linears, and stop each forward
        once all of them have been called (GPTQ's sequential passes for o_proj skip the MLP:
        the 1.1B shape's 94 s per block spent five full forwards on 16K tokens)."""
        seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input kept alive, leader)
        follower_of: dict[str, str] = {}
        state: dict[str, Any] = {}
        fired: set[str] = set()

        def make_hook(name: str):
            def hook(module, args):
                x = args[0]
                hit = seen.get(id(x))
                fired.add(name)
                if hit is not None and hit[0] is x:
                    follower_of.setdefault(name, hit[1])
                else:
                    seen[id(x)] = (x, name)
                    follower_of.setdefault(name, name)
                    on_input(name, rows(x.detach(), state["mask"]))
                if only is not None and len(fired) == len(watched):
                    raise _Captured  # `only`'s inputs are all in: the rest of the block is not needed
            return hook

        watched = self.linears if only is None else {n: self.linears[n] for n in only}
        handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in watched.items()]
        try:
            for item in self.inputs:
                state["mask"] = item.token_mask
                seen.clear()
                fired.clear()
                try:
                    self.forward(item)
                except _Captured:
                    pass
        finally:
            for handle in handles:
                handle.remove()
            seen.clear()
        groups: dict[str, list[str]] = {}
        for name in follower_of:  # call order
            groups.setdefault(follower_of[name], []).append(name)
        if only is None:
            self.groups = groups
        return groups


@dataclass
class BlockStream:
    """How run_blocks gets and hands back blocks when they are streamed (quantwise.stream).

    `load(i)` returns block i with real weights (the model's own block may be a meta-device
    placeholder, never run); `finish(i, block, outputs)` takes it with its outputs, the next
    block's hidden-state inputs (to convert, write and free it, and keep the outputs for a
    resume), and may return those outputs to use instead (the same values held elsewhere: a
    memory-mapped file); `after_capture()` runs once block 0's inputs are captured (the layers outside the
    blocks are not needed any more: written and freed). `start` / `carried`: resume at block
    `start`, whose inputs' hidden states are `carried` (the other inputs, masks and rotary
    tables, are captured again: they do not depend on the blocks)."""

    load: Callable[[int], nn.Module]
    finish: Callable[[int, nn.Module, list[torch.Tensor]], list[torch.Tensor] | None]
    start: int = 0
    carried: list[torch.Tensor] | None = None
    after_capture: Callable[[], None] | None = None


def run_blocks(model: nn.Module, calib_data: Iterable[Any],
               process: Callable[[BlockPass], None], selected: dict[str, nn.Module],
               progress: bool = False, desc: str = "blocks",
               stream: BlockStream | None = None) -> dict[str, Any]:
    """Run `process` on each block in order (see the module docstring); returns a report:
    blocks name, count, Linears processed, peak number of captured inputs held.
    `stream`: the blocks are read and released one at a time (BlockStream); a selected Linear
    is then looked up in the loaded block by its name, not taken from `selected`."""
    found = find_blocks(model)
    if found is None:
        raise QuantwiseError("no repeated transformer blocks found (an nn.ModuleList of same-type "
                             "layers containing Linears); this method runs block by block")
    blocks_name, blocks = found
    # weak keys: a module replaced meanwhile (streaming converts and frees the embeddings and
    # the head) must not be kept alive by this bookkeeping (it held 0.5 GB on a 1.1B model)
    modes = weakref.WeakKeyDictionary({m: m.training for m in model.modules()})
    model.eval()
    report: dict[str, Any] = {"blocks": blocks_name, "num_blocks": len(blocks), "linears": 0,
                              "block_forward_calls": []}
    try:
        with torch.no_grad():
            inputs = capture_block_inputs(model, blocks[0], calib_data)
            report["samples"] = len(inputs)
            report["input_bytes"] = sum(i.hidden.numel() * i.hidden.element_size() for i in inputs)
            start, carried = (0, None) if stream is None else (stream.start, stream.carried)
            if stream is not None and stream.after_capture is not None:
                stream.after_capture()
            if carried is not None:
                if len(carried) != len(inputs):
                    raise QuantwiseError(f"resume: {len(carried)} carried hidden states for "
                                         f"{len(inputs)} calibration inputs")
                for item, hidden in zip(inputs, carried):
                    item.hidden = hidden
            from tqdm.auto import tqdm
            for index in tqdm(range(start, len(blocks)), desc=desc, disable=not progress,
                              initial=start, total=len(blocks)):
                block = blocks[index] if stream is None else stream.load(index)
                prefix = f"{blocks_name}.{index}." if blocks_name else f"{index}."
                linears = {n: block.get_submodule(n[len(prefix):]) for n in selected
                           if n.startswith(prefix)}
                bp = BlockPass(index, prefix[:-1], block, linears, inputs)
                if linears:
                    process(bp)
                    release_free_memory()
                report["linears"] += len(linears)
                for item in inputs:
                    item.hidden = bp.forward(item)
                report["block_forward_calls"].append(bp.forward_calls)
                if stream is not None:
                    carried = stream.finish(index, block, [item.hidden for item in inputs])
                    for item, hidden in zip(inputs, carried or ()):
                        item.hidden = hidden  # the same values, e.g. mapped from a file
                del block, bp, linears
                release_free_memory()
    finally:
        for module, training in list(modes.items()):
            module.train(training)
    return report
