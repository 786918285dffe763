"""formats/verify.py on its own: the checks the bad-input table does not reach through files."""

from pathlib import Path

import pytest
import torch

from quantwise.errors import CheckpointError
from quantwise.formats.verify import check_metadata, check_tensors
from quantwise.numerics import pack_int4

WHERE = Path("ckpt/model.safetensors")


def _meta(fmt="int4", narrow=True, granularity=None, limit=None, shape=(4, 8), scale=(4,)):
    spec = {"format": fmt, "symmetric": True, "granularity": granularity or {"type": "per_channel", "axis": 0},
            **({"narrow_range": True} if narrow else {})}
    layer = {"kind": "linear", "weight_spec": spec, "act_spec": None, "dynamic": False,
             "weight_shape": list(shape), "scale_shape": list(scale), "bias_size": None, "layer_args": {}}
    return {"layers": {"fc": layer}, "records": [{"name": "fc", "module_type": "Linear",
                                                  **({"code_limit": limit} if limit else {})}],
            "config": {}, "folded": []}


def test_narrow_int4_code_minus_8_is_refused():
    codes = torch.zeros(4, 8, dtype=torch.int8)
    state = {"fc.weight": pack_int4(codes), "fc.weight_scale": torch.ones(4)}
    check_tensors(state, _meta(), WHERE)  # zeros: fine
    codes[2, 5] = -8
    with pytest.raises(CheckpointError, match=r"'fc.weight' holds codes -8\.\.0, outside int4's -7\.\.7"):
        check_tensors({**state, "fc.weight": pack_int4(codes)}, _meta(), WHERE)


def test_a_recorded_7_bit_code_limit_is_enforced():
    codes = torch.full((4, 8), 64, dtype=torch.int8)
    state = {"fc.weight": codes, "fc.weight_scale": torch.ones(4)}
    check_tensors(state, _meta("int8", limit=64), WHERE)
    codes[0, 0] = 65  # would saturate the int16 pair sums of an AVX2-only CPU
    with pytest.raises(CheckpointError, match=r"outside int8's -64\.\.64"):
        check_tensors(state, _meta("int8", limit=64), WHERE)


def test_scale_shape_must_fit_the_granularity():
    check_metadata(_meta("int4", granularity={"type": "per_group", "size": 4}, scale=(4, 2)), WHERE)
    with pytest.raises(CheckpointError, match="scale_shape \\[4, 3\\] does not fit"):
        check_metadata(_meta("int4", granularity={"type": "per_group", "size": 4}, scale=(4, 3)), WHERE)
    with pytest.raises(CheckpointError, match="does not fit"):
        check_metadata(_meta("int4", granularity={"type": "per_group", "size": 3}, scale=(4, 2)), WHERE)


def test_ties_and_records_must_name_layers():
    meta = _meta()
    meta["layers"]["fc"]["tied_to"] = "nowhere"
    with pytest.raises(CheckpointError, match="tied to 'nowhere'"):
        check_metadata(meta, WHERE)
    meta = _meta()
    meta["records"] = []
    with pytest.raises(CheckpointError, match="no record for the quantized layers \\['fc'\\]"):
        check_metadata(meta, WHERE)
    meta = _meta()
    meta["layers"]["fc"]["weight_shape"] = [4, -8]
    with pytest.raises(CheckpointError, match="weight_shape \\[4, -8\\] is not a list of sizes"):
        check_metadata(meta, WHERE)
