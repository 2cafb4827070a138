"""``VSAConfig``: every option of the compressed exchange, in one frozen dataclass.

The fields below are the one list of options: ``VSAState``'s keywords, the keys of a spec or a
configuration file, the row the ranks compare before the first exchange, and the option table of
docs/USAGE.md are all derived from ``dataclasses.fields(VSAConfig)``.

Launchers and integrations (``tritter_comm.integrations.accelerate``, ``launch/train.py``) read a
configuration from the environment, so that a job is compressed or not without editing the
training script:

``TRITTER_COMM``
    a spec: ``vsa`` (defaults), ``vsa:mode=int2:start_iter=50`` (``key=value`` items, values are
    Python literals, else strings) or ``none`` (leave the exchange alone).
``TRITTER_COMM_CONFIG``
    the path of a YAML (``.yaml``/``.yml``, needs PyYAML), JSON or TOML (Python >= 3.11) file::

        hook: vsa          # vsa | none
        mode: ternary      # any VSAConfig field, e.g.
        start_iter: 100

Where both are set, the items of ``TRITTER_COMM`` override those of the file. An unknown key is
an error that names the valid ones (a misspelt option must not silently train with the default).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .codec import DEFAULT_BLOCK_SIZE, MODES, block_log2, mode_id, u64

__all__ = ["ENV_CONFIG", "ENV_SPEC", "HOOKS", "CommConfig", "VSAConfig", "from_env",
           "options_table"]

ENV_SPEC = "TRITTER_COMM"
ENV_CONFIG = "TRITTER_COMM_CONFIG"
HOOKS = ("vsa", "none")

RESIDUAL_DTYPES = ("auto", "float32", "bfloat16", "int8", "int4", "int2", "int2-topk")

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _flag(name: str, value: Any) -> bool:
    """A boolean option: a bool, 0 or 1, or (from a config file or spec) true/false, yes/no,
    on/off. Anything else is an error, not truthiness: the string "false" must not mean True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be True or False, got {value!r}")


def _opt(default: Any, doc: str, *, agreed: bool = True) -> Any:
    """A field with its documentation; ``agreed``: every rank must pass the same value (it
    decides which collectives run, or what they carry)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "agreed": agreed})


@dataclasses.dataclass(frozen=True)
class VSAConfig:
    """The options of the compressed exchange (hooks, FSDP reduce-scatter).

    Every field is validated on construction; a bad value raises ``ValueError`` naming the
    field. Build one from code, ``VSAConfig.from_spec("vsa:mode=ternary")``,
    ``VSAConfig.from_dict({...})`` or ``VSAConfig.from_env()``; derive variants with
    ``replace(**changes)``. The measurements behind the defaults are in the README ("Measured").
    """

    mode: str = _opt("int2", "`\"int2\"`: 2 bits an element (15.7x fewer bytes than fp32, 7.9x "
                     "fewer than bf16); `\"ternary\"`: 1.6 bits (19.6x / 9.8x); `\"sign\"`: 1 bit "
                     "(31x / 15.5x). Both phases, unless `phase2_mode` is given")
    phase2_mode: Optional[str] = _opt(None, "the quantization of phase 2 (each owner's re-encoded "
                                      "average); None: `mode`. `mode=\"ternary\", "
                                      "phase2_mode=\"int2\"` sends 1.83 bits an element (17.4x)")
    block_size: int = _opt(DEFAULT_BLOCK_SIZE, "Hadamard block size, a power of two from 256 to "
                           "65536; one f32 scale a block")
    seed: int = _opt(0, "shared seed of the keys")
    start_iter: int = _opt(100, "iterations of plain all-reduce before compression starts; at "
                           "least 2 (DDP rebuilds its buckets after the first)")
    min_compress_numel: int = _opt(65536, "buckets smaller than this (in elements) are "
                                   "all-reduced uncompressed: their exchange costs latency, not "
                                   "bandwidth")
    error_feedback: bool = _opt(True, "keep a per-bucket residual of what quantization dropped "
                                "and send it in later steps; without it (and wherever a phase "
                                "has no residual) int2 encodes take the unbiased scale, whose "
                                "decoded vectors average to the input over steps")
    server_error_feedback: bool = _opt(True, "the owner of a chunk keeps a residual of its "
                                       "re-encoding (phase 2)")
    fixed_keys: bool = _opt(False, "the same keys every step (stream = bucket and chunk) "
                            "instead of fresh keys")
    auto: bool = _opt(False, "measure what plain and compressed exchange of each bucket cost on "
                      "this link and compress only where it is faster; every rank makes the "
                      "same choice (`stats()[\"auto\"]`)")
    residual_dtype: str = _opt("auto", "how residuals are stored: `\"auto\"`: under the FSDP "
                               "hooks the widest form that fits in `residual_budget` times the "
                               "rank's fp32 gradient shard (`\"int4\"` up to 7 ranks, `\"int2\"` "
                               "up to 12, then `\"int2-topk\"`), `\"float32\"` elsewhere; "
                               "`\"float32\"`; `\"bfloat16\"` (half the memory); `\"int8\"`, "
                               "`\"int4\"` or `\"int2\"` (codes with one f32 scale per 64 "
                               "elements: 0.27x, 0.14x and 0.078x of fp32); `\"int2-topk\"`: "
                               "int2 on the blocks of 64 of most energy, as many as fit in the "
                               "budget, the rest dropped (FSDP; int2 where nothing is sharded). "
                               "A client residual covers the whole gradient, so under FSDP fp32 "
                               "residuals take N times the rank's gradient shard, int4 0.14 N "
                               "times; ranks may differ here, and a checkpoint's residuals are "
                               "converted to this format", agreed=False)
    residual_budget: float = _opt(1.0, "the memory the FSDP hooks' client residuals may take, "
                                  "in multiples of the rank's fp32 gradient shard: what "
                                  "`residual_dtype=\"auto\"` fits its form to and what "
                                  "`\"int2-topk\"` fills", agreed=False)
    intra_node_size: Optional[int] = _opt(None, "ranks a node (ranks `n*L .. n*L+L-1` share a fast "
                                          "link): reduce plainly inside the node and compress only "
                                          "across nodes (docs/USAGE.md, \"Node-aware exchange\"); "
                                          "1: the flat exchange; None: torchrun's "
                                          "`LOCAL_WORLD_SIZE` where the job spans several nodes, "
                                          "else 1")

    def __post_init__(self) -> None:
        mode_id(self.mode)
        if self.phase2_mode is not None:
            try:
                mode_id(self.phase2_mode)
            except ValueError as e:
                raise ValueError(f"phase2_mode: {e}") from None
        block_log2(self.block_size)
        u64("seed", self.seed)
        if not isinstance(self.start_iter, int) or isinstance(self.start_iter, bool) \
                or self.start_iter < 2:
            raise ValueError(
                f"start_iter must be an int >= 2 (DDP rebuilds its buckets after the first "
                f"iteration, and residuals are keyed by bucket), got {self.start_iter!r}")
        if (not isinstance(self.min_compress_numel, int) or isinstance(self.min_compress_numel, bool)
                or self.min_compress_numel < 1):
            raise ValueError(
                f"min_compress_numel must be a positive int, got {self.min_compress_numel!r}")
        for f in dataclasses.fields(self):
            if f.type in (bool, "bool"):
                object.__setattr__(self, f.name, _flag(f.name, getattr(self, f.name)))
        if self.intra_node_size is not None and (
                not isinstance(self.intra_node_size, int) or isinstance(self.intra_node_size, bool)
                or self.intra_node_size < 1):
            raise ValueError(f"intra_node_size must be a positive int (the ranks on each node) or "
                             f"None (from LOCAL_WORLD_SIZE), got {self.intra_node_size!r}")
        if (isinstance(self.residual_budget, bool)
                or not isinstance(self.residual_budget, (int, float))
                or not math.isfinite(self.residual_budget) or self.residual_budget <= 0):
            raise ValueError(f"residual_budget must be a positive number (a multiple of the "
                             f"rank's fp32 gradient shard), got {self.residual_budget!r}")
        object.__setattr__(self, "residual_budget", float(self.residual_budget))
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"residual_dtype must be one of {list(RESIDUAL_DTYPES)}, "
                             f"got {self.residual_dtype!r} (int8/int4/int2 store residuals "
                             "quantized, see tritter_comm/residual.py)")

    # -- derived ---------------------------------------------------------------------------------

    @property
    def phase2(self) -> str:
        """The mode of phase 2 (``phase2_mode``, else ``mode``)."""
        return self.mode if self.phase2_mode is None else self.phase2_mode

    def replace(self, **changes: Any) -> "VSAConfig":
        """A copy with ``changes``; an unknown name is a ``ValueError`` naming the valid ones."""
        _check_names(changes, "replace()")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field, ``phase2_mode`` resolved: what a checkpoint records."""
        d = dataclasses.asdict(self)
        d["phase2_mode"] = self.phase2
        return d

    def describe(self) -> str:
        """The spec of this configuration's non-default fields (``vsa`` for the defaults)."""
        default = VSAConfig()
        items = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if getattr(self, f.name) != getattr(default, f.name)]
        return ":".join(["vsa", *items])

    # -- the cross-rank row ------------------------------------------------------------------

    def row(self) -> list[int]:
        """The agreed fields as int64 values, in field order (the seed, a u64, as two)."""
        out = []
        for f in agreed_fields():
            v = self.phase2 if f.name == "phase2_mode" else getattr(self, f.name)
            if f.name in ("mode", "phase2_mode"):
                out.append(MODES[v])
            elif f.name == "seed":
                out += [v & 0x7FFFFFFF_FFFFFFFF, v >> 63]
            elif v is None:  # intra_node_size: from the environment (the state rows resolve it)
                out.append(0)
            else:
                out.append(int(v))
        return out

    @staticmethod
    def read_row(row: list[int]) -> dict[str, Any]:
        """A row read back as the values a user passed, by field name."""
        names = {i: m for m, i in MODES.items()}
        values, i = {}, 0
        for f in agreed_fields():
            if f.name in ("mode", "phase2_mode"):
                values[f.name] = names.get(row[i], row[i])
            elif f.name == "seed":
                values[f.name] = row[i] | (row[i + 1] << 63)
                i += 1
            elif f.type in (bool, "bool"):
                values[f.name] = bool(row[i])
            elif f.name == "intra_node_size":
                values[f.name] = row[i] or None
            else:
                values[f.name] = row[i]
            i += 1
        return values

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "a mapping") -> "VSAConfig":
        """From a mapping of field names (a ``hook: vsa`` key is accepted and ignored; ``hook:
        none`` is an error here: use :meth:`from_env` or :func:`parse` where none is allowed)."""
        config = _from_mapping(data, source)
        if config is None:
            raise ValueError(f"{source} says hook: none; there is no configuration to build")
        return config

    @classmethod
    def from_spec(cls, spec: str) -> "VSAConfig":
        """From ``"vsa"`` or ``"vsa:mode=int2:start_iter=50"``."""
        config = parse(spec)
        if config is None:
            raise ValueError(f"spec {spec!r} installs no hook; there is no configuration")
        return config

    @classmethod
    def from_file(cls, path: "str | os.PathLike[str]") -> Optional["VSAConfig"]:
        """From a YAML, JSON or TOML file; None where it says ``hook: none``."""
        return _from_mapping(_read_file(Path(path)), str(path))

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Optional["VSAConfig"]:
        """What ``TRITTER_COMM_CONFIG`` and ``TRITTER_COMM`` set; None where neither is set or
        either says ``none``-only (``TRITTER_COMM=none`` turns a file's configuration off)."""
        config = from_env(environ)  # the one reading of the two variables
        return None if config is None else config.vsa


def agreed_fields() -> tuple:
    """The fields every rank must agree on, in order."""
    return tuple(f for f in dataclasses.fields(VSAConfig) if f.metadata["agreed"])


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(VSAConfig))


def options_table() -> str:
    """The option table of docs/USAGE.md (markdown), from the fields."""
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(VSAConfig):
        default = "`mode`" if f.name == "phase2_mode" else f"`{f.default!r}`"
        lines.append(f"| `{f.name}` | {default} | {f.metadata['doc']} |")
    return "\n".join(lines)


def _check_names(options: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(options) - set(field_names()))
    if unknown:
        raise ValueError(f"unknown tritter-comm option(s) {', '.join(unknown)} (from {source}); "
                         f"valid: hook, {', '.join(field_names())}")


def _from_mapping(data: Mapping[str, Any], source: str) -> Optional[VSAConfig]:
    if not isinstance(data, Mapping):
        raise ValueError(f"tritter-comm configuration must be a mapping, got "
                         f"{type(data).__name__} (from {source})")
    data = dict(data)
    hook = str(data.pop("hook", "vsa")).strip().lower()
    if hook not in HOOKS:
        raise ValueError(f"tritter-comm hook must be one of {', '.join(HOOKS)}, got {hook!r} "
                         f"(from {source})")
    _check_names(data, source)
    if hook == "none":
        return None
    try:
        return VSAConfig(**data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad tritter-comm configuration (from {source}): {e}") from e


def _split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    hook, *items = spec.strip().split(":")
    options: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad item {item!r} in tritter-comm spec {spec!r}; write key=value")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return hook.strip().lower() or "vsa", options


def parse(spec: str) -> Optional[VSAConfig]:
    """A spec: ``"vsa"``, ``"none"`` (None) or ``"vsa:mode=int2:start_iter=50"``."""
    hook, options = _split_spec(spec)
    return _from_mapping({"hook": hook, **options}, f"spec {spec!r}")


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"tritter-comm configuration file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ImportError(f"reading {path} needs PyYAML: pip install pyyaml "
                              "(or write the configuration as JSON)") from e
        data = yaml.safe_load(text) or {}
    elif suffix == ".json":
        data = json.loads(text)
    elif suffix == ".toml":
        try:
            import tomllib
        except ImportError as e:  # Python < 3.11
            raise ImportError(f"reading {path} needs Python >= 3.11 (tomllib); "
                              "write the configuration as YAML or JSON") from e
        data = tomllib.loads(text)
    else:
        raise ValueError(f"tritter-comm configuration {path} must end in .yaml, .yml, .json "
                         "or .toml")
    if not isinstance(data, Mapping):
        raise ValueError(f"tritter-comm configuration must be a mapping, got "
                         f"{type(data).__name__} (from {path})")
    return dict(data)


# -- the integrations' view: which hook, with which configuration ----------------------------


@dataclasses.dataclass(frozen=True)
class CommConfig:
    """A configuration as the integrations read it: ``hook`` (``"vsa"`` or ``"none"``) and the
    options given (a :class:`VSAConfig` is built from them, validating every value)."""

    hook: str = "vsa"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "code"

    def __post_init__(self) -> None:
        data = {"hook": self.hook, **self.options}
        _from_mapping(data, self.source)  # validates names and values, with the source named
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def enabled(self) -> bool:
        return self.hook != "none"

    @property
    def vsa(self) -> Optional[VSAConfig]:
        """The :class:`VSAConfig` (None for ``hook: none``)."""
        return VSAConfig(**self.options) if self.enabled else None

    def replace(self, **options: Any) -> "CommConfig":
        """A copy with ``options`` overriding (``hook=`` included)."""
        hook = options.pop("hook", self.hook)
        return CommConfig(hook, {**self.options, **options}, self.source)

    def describe(self) -> str:
        if not self.enabled:
            return "none"
        return ":".join(["vsa", *(f"{k}={v!r}" for k, v in self.options.items())])

    @classmethod
    def parse(cls, spec: str, *, source: Optional[str] = None) -> "CommConfig":
        hook, options = _split_spec(spec)
        return cls(hook, options, source or f"spec {spec!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "mapping") -> "CommConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"tritter-comm configuration must be a mapping, got "
                             f"{type(data).__name__} (from {source})")
        data = dict(data)
        return cls(str(data.pop("hook", "vsa")).strip().lower(), data, source)

    @classmethod
    def from_file(cls, path: "str | os.PathLike[str]") -> "CommConfig":
        return cls.from_mapping(_read_file(Path(path)), source=str(path))


def from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[CommConfig]:
    """The configuration that ``TRITTER_COMM_CONFIG`` and ``TRITTER_COMM`` set, or None."""
    env = os.environ if environ is None else environ
    path, spec = env.get(ENV_CONFIG, "").strip(), env.get(ENV_SPEC, "").strip()
    if not path and not spec:
        return None
    config = CommConfig.from_file(path) if path else None
    if spec:
        over = CommConfig.parse(spec, source=f"{ENV_SPEC}={spec!r}")
        if config is None or not over.enabled:
            return over
        config = CommConfig(over.hook, {**config.options, **over.options},
                            f"{path} + {ENV_SPEC}={spec!r}")
    return config
