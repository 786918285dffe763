"""Valid seed files for the fuzzers (tests/fuzz_targets.py): tiny quantwise checkpoints, Hugging
Face folders, ONNX graphs and configs, built once per process and kept as {name: bytes}, so each
fuzzed case is a mutation of a file quantwise really writes or reads."""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

IN_SHAPE = (1, 6, 6)  # one sample of TinyNet


class TinyNet(nn.Module):
    """Conv + BatchNorm (folded at quantize) + two Linears: every checkpoint layer kind but
    embeddings, in a 5 KB checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def tiny_model() -> nn.Module:
    """The float TinyNet, the same weights every call (`fuzz_seeds:tiny_model` for the CLI)."""
    torch.manual_seed(0)
    return TinyNet().eval()


def tiny_input(n: int = 2) -> torch.Tensor:
    return torch.randn(n, *IN_SHAPE, generator=torch.Generator().manual_seed(1))


def read_folder(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@lru_cache(maxsize=None)
def checkpoints() -> dict[str, dict[str, bytes]]:
    """quantwise.save folders of TinyNet: static int8, dynamic int8, int4 per group."""
    import quantwise

    model, calib = tiny_model(), [tiny_input(4), tiny_input(4) * 2]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("w8a8", "w8a8-dynamic", "w4"):
            cfg = quantwise.Config.preset(preset)
            if preset == "w4":  # groups of 8 fit the 16- and 64-wide inputs
                cfg = quantwise.Config.from_dict({**cfg.to_dict(), "default": {
                    **cfg.default.to_dict(), "weight": {**cfg.default.weight.to_dict(),
                                                        "granularity": {"type": "per_group", "size": 8}}}})
            qmodel = quantwise.quantize(model, cfg, calib, progress=False)
            folder = quantwise.save(qmodel, Path(tmp) / preset)
            files = read_folder(folder)
            meta = json.loads(files["quantwise.json"])
            meta["source"] = "fuzz_seeds:tiny_model"  # benchmark / load without model= use it
            files["quantwise.json"] = json.dumps(meta).encode()
            out[preset] = files
    return out


def _hf_config(name: str):
    from transformers import BertConfig, LlamaConfig

    if name == "bert":
        return BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=16)
    return LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=32, max_position_embeddings=16)


@lru_cache(maxsize=None)
def hf_folders() -> dict[str, dict[str, bytes]]:
    """save_pretrained folders of a 1-layer BERT and Llama; "llama-sharded": its weights as
    two shards plus model.safetensors.index.json."""
    from transformers import BertModel, LlamaForCausalLM

    from quantwise.formats.shards import write_shards

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls in (("bert", BertModel), ("llama", LlamaForCausalLM)):
            torch.manual_seed(0)
            model = cls(_hf_config(name)).eval()
            model.save_pretrained(Path(tmp) / name)
            out[name] = read_folder(Path(tmp) / name)
        sharded = Path(tmp) / "llama-sharded"
        sharded.mkdir()
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or
                 not model.config.tie_word_embeddings}
        write_shards(state, sharded, 6000, {"format": "pt"})
        (sharded / "config.json").write_bytes(out["llama"]["config.json"])
        out["llama-sharded"] = read_folder(sharded)
    return out


@lru_cache(maxsize=None)
def onnx_models() -> dict[str, bytes]:
    """A MatMul + Add + Relu graph, its weight inline ("inline") or as external data in
    weights.bin ("external": the .onnx bytes; weights.bin is ONNX_WEIGHTS)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gen = torch.Generator().manual_seed(0)
    w = numpy_helper.from_array(torch.randn(8, 4, generator=gen).numpy(), "W")
    b = numpy_helper.from_array(torch.randn(4, generator=gen).numpy(), "B")
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H"]), helper.make_node("Add", ["H", "B"], ["A"]),
             helper.make_node("Relu", ["A"], ["Y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    inline = model.SerializeToString()
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(len(ONNX_WEIGHTS())))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    model.graph.initializer[0].CopyFrom(w)
    return {"inline": inline, "external": model.SerializeToString()}


@lru_cache(maxsize=None)
def ONNX_WEIGHTS() -> bytes:  # noqa: N802 - a constant, computed once
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(0)).numpy().tobytes()


@lru_cache(maxsize=None)
def config_dicts() -> tuple[dict, ...]:
    """Every preset's dict, a preset with overrides, and a custom config with rules."""
    from quantwise.config import PRESETS

    custom = {"name": "mine", "default": {"weight": {"format": "int8", "granularity": "per_channel"},
                                          "activation": {"format": "uint8", "symmetric": False},
                                          "calibrator": "percentile", "calibrator_args": {"percentile": 99.9}},
              "rules": [{"pattern": "fc*", "types": ["Linear"], "activation": None},
                        {"pattern": "conv", "weight": {"format": "int4",
                                                       "granularity": {"type": "per_group", "size": 8}}}],
              "exclude": ["fc2"]}
    return tuple([p.to_dict() for p in PRESETS.values()] +
                 [{"preset": "w8a8", "exclude": ["fc2"], "default": {"calibrator": "mse"}},
                  {"preset": "w4-gptq", "method_args": {"damp": 0.05}}, custom])
