"""Compression switched on by configuration: a spec string, a file, or the environment.

Launchers and integrations (``tritter_comm.integrations.accelerate``, ``launch/train.py``) read
one of these, so that a job is compressed or not without editing the training script:

``TRITTER_COMM``
    a spec: ``vsa`` (defaults), ``vsa:mode=int2:start_iter=50`` (``key=value`` items, values are
    Python literals, else strings) or ``none`` (leave the exchange alone).
``TRITTER_COMM_CONFIG``
    the path of a YAML (``.yaml``/``.yml``, needs PyYAML), JSON or TOML (Python >= 3.11) file::

        hook: vsa          # vsa | none
        mode: ternary      # any VSAState option (docs/USAGE.md lists them), e.g.
        start_iter: 100

Where both are set, the items of ``TRITTER_COMM`` override those of the file. Keys are the
keyword options of :class:`tritter_comm.VSAState` plus ``hook``; an unknown key is an error that
names the valid ones (a misspelt option must not silently train with the default).
"""

from __future__ import annotations

import ast
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .hooks import VSAState

__all__ = ["ENV_CONFIG", "ENV_SPEC", "HOOKS", "CommConfig", "from_env"]

ENV_SPEC = "TRITTER_COMM"
ENV_CONFIG = "TRITTER_COMM_CONFIG"
HOOKS = ("vsa", "none")


def _state_options() -> tuple[str, ...]:
    """VSAState's keyword options: the one source of truth for names and defaults."""
    sig = inspect.signature(VSAState.__init__)
    return tuple(n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY)


STATE_OPTIONS = _state_options()


@dataclass(frozen=True)
class CommConfig:
    """Which hook to install and the :class:`~tritter_comm.VSAState` options to build it with.

    Args:
        hook: ``"vsa"`` (compress) or ``"none"`` (leave the framework's exchange alone).
        options: ``VSAState`` keyword options; omitted ones keep ``VSAState``'s defaults.
        source: where the configuration came from (for log messages).
    """

    hook: str = "vsa"
    options: Mapping[str, Any] = field(default_factory=dict)
    source: str = "code"

    def __post_init__(self) -> None:
        if self.hook not in HOOKS:
            raise ValueError(
                f"tritter-comm hook must be one of {', '.join(HOOKS)}, got {self.hook!r} "
                f"(from {self.source})"
            )
        unknown = sorted(set(self.options) - set(STATE_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown tritter-comm option(s) {', '.join(unknown)} (from {self.source}); "
                f"valid: hook, {', '.join(STATE_OPTIONS)}"
            )
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if self.enabled:
            try:
                VSAState(None, **self.options)  # validates every value with VSAState's messages
            except (TypeError, ValueError) as e:
                raise ValueError(f"bad tritter-comm configuration (from {self.source}): {e}") from e

    @property
    def enabled(self) -> bool:
        return self.hook != "none"

    def make_state(self, process_group: Any = None) -> VSAState:
        """A fresh hook state with these options."""
        if not self.enabled:
            raise ValueError("this configuration installs no hook (hook: none)")
        return VSAState(process_group, **self.options)

    def replace(self, **options: Any) -> "CommConfig":
        """A copy with ``options`` overriding (``hook=`` included)."""
        hook = options.pop("hook", self.hook)
        return CommConfig(hook, {**self.options, **options}, self.source)

    def describe(self) -> str:
        if not self.enabled:
            return "none"
        return ":".join(["vsa", *(f"{k}={v!r}" for k, v in self.options.items())])

    # -- parsing ------------------------------------------------------------------------------

    @classmethod
    def parse(cls, spec: str, *, source: Optional[str] = None) -> "CommConfig":
        """``"vsa"``, ``"none"`` or ``"vsa:mode=int2:start_iter=50"``."""
        source = source or f"spec {spec!r}"
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
        return cls(hook.strip().lower() or "vsa", options, source)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "mapping") -> "CommConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"tritter-comm configuration must be a mapping, got {type(data).__name__} "
                             f"(from {source})")
        data = dict(data)
        hook = str(data.pop("hook", "vsa")).lower()
        return cls(hook, data, source)

    @classmethod
    def from_file(cls, path: "str | os.PathLike[str]") -> "CommConfig":
        path = Path(path)
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
        return cls.from_mapping(data, source=str(path))


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
