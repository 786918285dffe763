import json

import pytest

from quantwise import Config, ConfigError, Rule
from quantwise.config import PRESETS
from quantwise.spec import Format, PerChannel, PerGroup, PerToken


def test_presets_exist_with_the_promised_formats():
    w8a8 = Config.preset("w8a8").default
    assert w8a8.weight.format == Format.INT8 and isinstance(w8a8.weight.granularity, PerChannel)
    assert w8a8.activation.format == Format.UINT8 and not w8a8.dynamic
    dyn = Config.preset("w8a8-dynamic").default
    assert dyn.dynamic and isinstance(dyn.activation.granularity, PerToken)
    assert Config.preset("w8").default.activation is None
    w4 = Config.preset("w4").default.weight
    assert w4.format == Format.INT4 and w4.granularity == PerGroup(128)
    assert Config.preset("fp16").default.weight.format == Format.FP16
    assert Config.preset("bf16").default.weight.format == Format.BF16
    assert {"w8a8", "w8a8-dynamic", "w8", "w4", "fp16", "bf16"} <= set(PRESETS)


def test_rules_first_match_wins_and_types_filter():
    cfg = Config.preset("w8a8")
    cfg = cfg.with_rule(Rule("*.fc*", types=("Linear",), overrides={"calibrator": "entropy"}))
    cfg = cfg.with_rule(Rule("head.fc2", overrides={"calibrator": "mse"}))  # added first: wins
    assert cfg.layer_config("head.fc2", "Linear")[0].calibrator == "mse"
    assert cfg.layer_config("head.fc1", "Linear")[0].calibrator == "entropy"
    assert cfg.layer_config("head.fc1", "Conv2d")[0].calibrator == "max"  # type filter
    cfg.exclude.append("head.*")
    layer, why = cfg.layer_config("head.fc1", "Linear")
    assert layer.is_float and "excluded" in why


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips(tmp_path, name):
    Config.preset(name).save(tmp_path / "p.yaml")
    assert Config.load(tmp_path / "p.yaml") == Config.preset(name)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_files(tmp_path, suffix):
    cfg = Config.preset("w8a8").with_rule(Rule("*.out", overrides={"calibrator": "percentile",
                                                                   "calibrator_args": {"percentile": 99.9}}))
    cfg.exclude.append("classifier")
    path = tmp_path / f"cfg{suffix}"
    cfg.save(path)
    assert Config.load(path) == cfg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_unknown_keys_and_typos_list_the_valid_choices(tmp_path):
    with pytest.raises(ConfigError, match="valid keys"):
        Config.from_dict({"defaults": {}})
    with pytest.raises(ConfigError, match="valid formats: int8"):
        Config.from_dict({"default": {"weight": {"format": "imt8"}}})
    with pytest.raises(ConfigError, match="valid: max, percentile"):
        Config.from_dict({"rules": [{"pattern": "*", "calibrator": "kl"}]})
    with pytest.raises(ConfigError, match="valid keys"):
        Config.from_dict({"rules": [{"patern": "*"}]})
    with pytest.raises(ConfigError, match="valid presets"):
        Config.resolve("w8a9")
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: [unclosed")
    with pytest.raises(ConfigError, match="not valid JSON/YAML"):
        Config.load(bad)


def test_per_token_needs_dynamic():
    with pytest.raises(ConfigError, match="dynamic=True"):
        Config.from_dict({"default": {"weight": {"format": "int8"},
                                      "activation": {"format": "int8", "granularity": "per_token"}}})


def test_preset_file_with_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "w8a8", "default": {"calibrator": "entropy"},
                                "exclude": ["fc2"]}))
    cfg = Config.resolve(str(path))
    assert cfg.default.calibrator == "entropy" and cfg.default.weight.format == Format.INT8
    assert cfg.layer_config("fc2", "Linear")[0].is_float
