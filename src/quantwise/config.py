"""Config: how each layer is quantized. Defaults plus ordered rules (first match wins).

    cfg = Config.preset("w8a8")
    cfg = cfg.with_rule(Rule(pattern="*.output.dense", activation=None))  # keep those inputs float
    cfg.exclude.append("classifier")
    cfg.save("my.yaml"); Config.load("my.yaml")

A rule matches a layer by fnmatch `pattern` on its qualified name and optionally by module
`types` (class names such as "Linear", "Conv2d"); the fields it sets override the defaults.

`method` (None, "rtn", "gptq", "awq", "smoothquant") runs a model-level algorithm before the
per-layer conversion (quantwise.methods); `method_args` are its options (see METHOD_ARGS):

    cfg = Config.preset("w4-gptq")                        # int4 group 128, GPTQ
    cfg = weight_method_config("gptq", bits=3, group_size=64, act_order=True, damp=0.01)
"""

from __future__ import annotations

import copy
import fnmatch
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from quantwise.errors import ConfigError
from quantwise.fileio import atomic_write_text
from quantwise.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

CALIBRATORS = ("max", "percentile", "entropy", "mse")
# Model-level methods (quantwise.methods) and the options each accepts in `method_args`.
#   bits: weight bits (3..8) within the weight spec's format (3 bits: int4 codes in [-4, 3]).
#   gptq: damp (fraction of mean diag(H) added, default 0.01), act_order (columns by descending
#         diag(H); group scales then come from the original weight: "static groups"),
#         block_size (lazy-batch width, 128), mse (True: each group's range shrunk to minimize
#         sum |w - Q(w)|^2.4, the reference quantizer's option; False: full range),
#         sequential (True: each group of Linears in a block (q/k/v, o, ...) sees the inputs
#         produced with the groups before it already quantized; False: one pass, float inputs).
#   awq: grid (points for the exponent a in [0, 1), 20), max_shrink (clipping search down to
#        1 - max_shrink of the group range, 0.5), clip_grid (20), n_samples (tokens kept per
#        input for the searches, 512), scale (False: clipping only).
#   smoothquant: alpha (fixed) or alphas (searched per layer).
METHOD_ARGS: dict[str, frozenset[str]] = {
    "rtn": frozenset({"bits"}),
    "gptq": frozenset({"bits", "damp", "act_order", "block_size", "mse", "sequential"}),
    "awq": frozenset({"bits", "grid", "max_shrink", "clip_grid", "n_samples", "scale"}),
    "smoothquant": frozenset({"alpha", "alphas"}),
}
_UNSET: Any = object()


@dataclass(frozen=True)
class LayerConfig:
    """How one layer is quantized.

    weight: spec of the weight (None: weights stay float).
    activation: spec of the layer's input (None: weight-only, the input stays float).
    dynamic: the activation scale is computed at run time (no calibration).
    calibrator: range estimator of static activations; calibrator_args go to its constructor.
    """

    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    dynamic: bool = False
    calibrator: str = "max"
    calibrator_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("weight", "activation"):  # from_dict parses dicts; anything else is a typo
            if not isinstance(getattr(self, key), (QuantSpec, type(None))):
                raise ConfigError(f"{key} must be a spec mapping (format, granularity, ...) or "
                                  f"null, got {getattr(self, key)!r}")
        if not isinstance(self.dynamic, bool):
            raise ConfigError(f"dynamic must be true or false, got {self.dynamic!r}")
        if not isinstance(self.calibrator_args, dict) or not all(
                isinstance(k, str) for k in self.calibrator_args):
            raise ConfigError(f"calibrator_args must be a mapping of option names, got "
                              f"{self.calibrator_args!r}")
        if not isinstance(self.calibrator, str) or self.calibrator not in CALIBRATORS:
            raise ConfigError(f"unknown calibrator {self.calibrator!r}; valid: {', '.join(CALIBRATORS)}")
        if self.dynamic and self.activation is None:
            raise ConfigError("dynamic=True needs an activation spec (per_tensor or per_token)")
        if self.activation is not None and not self.dynamic and isinstance(
                self.activation.granularity, PerToken):
            raise ConfigError("per_token activation scales exist only at run time: set dynamic=True")

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.activation is None

    def describe(self) -> str:
        """Short human label: 'w int8 per_channel / a uint8 per_tensor static (max)'."""
        if self.is_float:
            return "fp32"
        parts = []
        if self.weight is not None:
            parts.append(f"w {self.weight.format.value} {_gran_label(self.weight)}")
        if self.activation is not None:
            how = "dynamic" if self.dynamic else f"static ({self.calibrator})"
            parts.append(f"a {self.activation.format.value} {_gran_label(self.activation)} {how}")
        return " / ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.to_dict() if self.weight else None,
                "activation": self.activation.to_dict() if self.activation else None,
                "dynamic": self.dynamic, "calibrator": self.calibrator,
                "calibrator_args": dict(self.calibrator_args)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "LayerConfig | None" = None) -> "LayerConfig":
        """Fields in `data` override `base` (or the defaults); unknown keys are an error."""
        _check_keys(data, {f.name for f in fields(cls)}, "layer config")
        values = {}
        for key, value in data.items():
            if key in ("weight", "activation") and value is not None:
                value = value if isinstance(value, QuantSpec) else QuantSpec.from_dict(value)
            values[key] = value
        return replace(base, **values) if base is not None else cls(**values)


def _gran_label(spec: QuantSpec) -> str:
    g = spec.granularity
    if isinstance(g, PerGroup):
        return f"group {g.size}"
    if isinstance(g, PerChannel):
        return "per_channel"
    return "per_token" if isinstance(g, PerToken) else "per_tensor"


@dataclass(frozen=True)
class Rule:
    """Select layers by name pattern and/or module types; `overrides` change the defaults."""

    pattern: str = "*"
    types: tuple[str, ...] = ()
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise ConfigError(f"a rule's pattern must be a string (fnmatch), got {self.pattern!r}")
        if isinstance(self.types, str) or not isinstance(self.types, (list, tuple)) or not all(
                isinstance(t, str) for t in self.types):
            raise ConfigError(f"a rule's types must be a list of module class names, got {self.types!r}")
        object.__setattr__(self, "types", tuple(self.types))
        LayerConfig.from_dict(self.overrides, LayerConfig())  # validate eagerly: typos fail here
        specs = {k: QuantSpec.from_dict(v) for k, v in self.overrides.items()
                 if k in ("weight", "activation") and isinstance(v, dict)}
        object.__setattr__(self, "overrides", {**self.overrides, **specs})  # one form: equal after reload

    def matches(self, name: str, module_type: str) -> bool:
        if self.types and module_type not in self.types:
            return False
        return fnmatch.fnmatchcase(name, self.pattern)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pattern": self.pattern}
        if self.types:
            out["types"] = list(self.types)
        for key, value in self.overrides.items():
            out[key] = value.to_dict() if isinstance(value, QuantSpec) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Rule":
        layer_keys = {f.name for f in fields(LayerConfig)}
        _check_keys(data, layer_keys | {"pattern", "types"}, "rule")
        overrides = {k: v for k, v in data.items() if k in layer_keys}
        return cls(pattern=data.get("pattern", "*"), types=data.get("types", ()),
                   overrides=overrides)


@dataclass
class Config:
    """Defaults plus ordered rules (first match wins) plus exclude patterns."""

    default: LayerConfig = field(default_factory=LayerConfig)
    rules: list[Rule] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    name: str = "custom"
    method: str | None = None       # None | "rtn" | "gptq" | "awq" | "smoothquant"
    method_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_method(self.method, self.method_args)
        # One form (lists, not tuples) so that a YAML/JSON round trip compares equal.
        self.method_args = {k: list(v) if isinstance(v, tuple) else v
                            for k, v in dict(self.method_args).items()}

    def layer_config(self, name: str, module_type: str) -> tuple[LayerConfig, str]:
        """The LayerConfig for one layer and why: ('default', 'rule 2: *.fc', 'excluded by ...')."""
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(name, pattern):
                return LayerConfig(), f"excluded by {pattern!r}"
        for index, rule in enumerate(self.rules):
            if rule.matches(name, module_type):
                return LayerConfig.from_dict(rule.overrides, self.default), f"rule {index}: {rule.pattern}"
        return self.default, "default"

    def with_rule(self, rule: Rule, first: bool = True) -> "Config":
        """A copy with `rule` added first (it then wins over the existing rules) or last."""
        rules = [rule, *self.rules] if first else [*self.rules, rule]
        return replace(self, rules=rules, exclude=list(self.exclude),
                       method_args=dict(self.method_args))

    def with_calibrator(self, calibrator: str, **calibrator_args: Any) -> "Config":
        """A copy whose default (and every rule's) static calibrator is `calibrator`."""
        default = replace(self.default, calibrator=calibrator, calibrator_args=calibrator_args)
        rules = [replace(r, overrides={k: v for k, v in r.overrides.items()
                                       if k not in ("calibrator", "calibrator_args")})
                 for r in self.rules]
        return replace(self, default=default, rules=rules, exclude=list(self.exclude),
                       method_args=dict(self.method_args))

    # -- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "default": self.default.to_dict(),
               "rules": [r.to_dict() for r in self.rules], "exclude": list(self.exclude)}
        if self.method is not None:  # absent for plain configs: older files stay identical
            out["method"] = self.method
            out["method_args"] = copy.deepcopy(self.method_args)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
        _check_keys(data, {"name", "default", "rules", "exclude", "preset", "method", "method_args"},
                    "config")
        base = cls.preset(data["preset"]) if "preset" in data else cls()
        default = LayerConfig.from_dict(data.get("default") or {}, base.default)
        rules, exclude = data.get("rules") or [], data.get("exclude") or []
        if not isinstance(rules, list):
            raise ConfigError(f"rules must be a list of rule mappings, got {rules!r}")
        if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
            raise ConfigError(f"exclude must be a list of name patterns (strings), got {exclude!r}")
        rules = [Rule.from_dict(r) for r in rules] + base.rules
        exclude = exclude + base.exclude
        # A preset's method stays unless overridden; its args are kept (and updated by
        # `method_args`) only while the method is the same.
        method = data.get("method", base.method)
        args = dict(base.method_args) if method == base.method else {}
        extra = data.get("method_args") or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"method_args must be a mapping, got {extra!r}")
        args.update(extra)
        name = data.get("name", data.get("preset", "custom"))
        if not isinstance(name, str):
            raise ConfigError(f"name must be a string, got {name!r}")
        return cls(default=default, rules=rules, exclude=exclude, name=name, method=method,
                   method_args=args)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = (json.dumps(self.to_dict(), indent=2) if path.suffix == ".json"
                else yaml.safe_dump(self.to_dict(), sort_keys=False))
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON/YAML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        _check_nesting(text, path)
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        # ValueError: bad JSON, a 5000-digit number; RecursionError: nested past the stack
        except (ValueError, yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"config file {path} is not valid JSON/YAML: "
                              f"{str(exc)[:300] or type(exc).__name__}") from None
        return cls.from_dict(data)

    # -- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "Config":
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return copy.deepcopy(PRESETS[name])

    @classmethod
    def resolve(cls, config: "Config | str | Path | dict") -> "Config":
        """A Config from a Config, a preset name, a YAML/JSON path, or a dict."""
        if isinstance(config, Config):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        text = str(config)
        if text in PRESETS:
            return cls.preset(text)
        if Path(text).suffix in (".yaml", ".yml", ".json") or Path(text).exists():
            return cls.load(text)
        raise ConfigError(f"unknown preset {text!r}; valid presets: {', '.join(PRESETS)}, "
                          "or a path to a .yaml/.json config file")


def check_method(method: str | None, args: dict) -> None:
    """Unknown methods, unknown or ill-typed method_args are errors that list the choices."""
    if method is None:
        if args:
            raise ConfigError(f"method_args {sorted(args, key=str)} given without a method; valid methods: "
                              f"{', '.join(METHOD_ARGS)}")
        return
    if not isinstance(method, str) or method not in METHOD_ARGS:
        raise ConfigError(f"unknown method {method!r}; valid methods: {', '.join(METHOD_ARGS)} "
                          "(or none)")
    _check_keys(args, set(METHOD_ARGS[method]), f"{method} method_args")
    bits = args.get("bits")
    if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8):
        raise ConfigError(f"method_args bits must be an integer in 2..8, got {bits!r}")
    for key in ("damp", "max_shrink", "alpha"):
        value = args.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 1):
            raise ConfigError(f"method_args {key} must be a number in [0, 1], got {value!r}")
    for key in ("grid", "clip_grid", "n_samples", "block_size"):
        value = args.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"method_args {key} must be a positive integer, got {value!r}")


def weight_method_config(method: str = "gptq", bits: int = 4, group_size: int | None = 128,
                         **method_args: Any) -> Config:
    """Weight-only config for `method` ("rtn", "gptq", "awq") at `bits` (3, 4 or 8) and
    `group_size` (None: per output channel). 3 and 4 bits are stored as int4 (3 bits: codes
    in [-4, 3]), 8 bits as int8; options (damp, act_order, grid, ...) go to method_args."""
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ConfigError(f"bits must be in 2..8, got {bits!r}")
    granularity = PerChannel(0) if group_size is None else PerGroup(group_size)
    spec = QuantSpec("int4" if bits <= 4 else "int8", symmetric=True, granularity=granularity)
    if method == "gptq":
        method_args.setdefault("act_order", True)  # as the w4-gptq preset
    args = {"bits": bits, **method_args} if bits not in (4, 8) else dict(method_args)
    group = "ch" if group_size is None else f"g{group_size}"
    return Config(LayerConfig(weight=spec), name=f"w{bits}-{method}-{group}", method=method,
                  method_args=args)


MAX_NESTING = 64  # a config is a few levels deep; PyYAML takes minutes on 5,000 "{" (cubic)


def _check_nesting(text: str, path: Path) -> None:
    """Refuse brackets nested past MAX_NESTING before any parser sees them (counted loosely:
    brackets inside strings count too, which no real config comes near)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    if deepest > MAX_NESTING:
        raise ConfigError(f"config file {path} nests brackets {deepest} deep (at most "
                          f"{MAX_NESTING}): not a quantwise config")


def _check_keys(data: dict[str, Any], allowed: set[str], what: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"a {what} must be a mapping, got {data!r}")
    unknown = set(data) - allowed
    if unknown:  # key=str: YAML keys may be numbers, dates, None
        raise ConfigError(f"unknown {what} keys {sorted(unknown, key=str)}; valid keys: {sorted(allowed)}")


_W8 = QuantSpec("int8", symmetric=True, narrow_range=True, granularity=PerChannel(0))
_W4 = QuantSpec("int4", symmetric=True, granularity=PerGroup(128))
_W4C = QuantSpec("int4", symmetric=True, granularity=PerChannel(0))
_A8_STATIC = QuantSpec("uint8", symmetric=False, granularity=PerTensor())
_A8_TOKEN = QuantSpec("int8", symmetric=True, granularity=PerToken())

PRESETS: dict[str, Config] = {
    "w8a8": Config(LayerConfig(weight=_W8, activation=_A8_STATIC), name="w8a8"),
    # Per-token scales are rows of a Linear's input; a conv's input gets one dynamic scale.
    "w8a8-dynamic": Config(LayerConfig(weight=_W8, activation=_A8_TOKEN, dynamic=True),
                           rules=[Rule("*", types=("Conv1d", "Conv2d", "ConvTranspose2d"),
                                       overrides={"activation": replace(_A8_TOKEN, granularity=PerTensor())})],
                           name="w8a8-dynamic"),
    "w8": Config(LayerConfig(weight=_W8), name="w8"),
    "w4": Config(LayerConfig(weight=_W4), name="w4"),
    # Model-level methods run before conversion (quantwise.methods), block by block.
    # act_order with static groups: the best of the measured GPTQ variants on MiniLM
    "w4-gptq": Config(LayerConfig(weight=_W4), name="w4-gptq", method="gptq",
                      method_args={"act_order": True}),
    "w4-awq": Config(LayerConfig(weight=_W4), name="w4-awq", method="awq"),
    "w8a8-smoothquant": Config(LayerConfig(weight=_W8, activation=_A8_STATIC),
                               name="w8a8-smoothquant", method="smoothquant"),
    # SmoothQuant before per-token dynamic int8 (alphas scored with per-token inputs)
    "w8a8-dynamic-smoothquant": Config(LayerConfig(weight=_W8, activation=_A8_TOKEN, dynamic=True),
                                       rules=[Rule("*", types=("Conv1d", "Conv2d", "ConvTranspose2d"),
                                                   overrides={"activation": replace(_A8_TOKEN, granularity=PerTensor())})],
                                       name="w8a8-dynamic-smoothquant", method="smoothquant"),
    "fp16": Config(LayerConfig(weight=QuantSpec("fp16")), name="fp16"),
    "bf16": Config(LayerConfig(weight=QuantSpec("bf16")), name="bf16"),
    # 4-bit weights with 8- or 4-bit static activations: for QAT (quantwise.prepare_qat) and
    # PTQ alike; 4-bit codes run exactly on the 8-bit integer kernels.
    # (per-channel weight scales: one integer GEMM per layer, as per-group scales cannot be)
    "w4a8": Config(LayerConfig(weight=_W4C, activation=_A8_STATIC), name="w4a8"),
    "w4a4": Config(LayerConfig(weight=_W4C, activation=QuantSpec("uint4", symmetric=False,
                                                                 granularity=PerTensor())), name="w4a4"),
}
