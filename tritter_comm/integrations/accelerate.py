"""HuggingFace accelerate (and transformers' ``Trainer``): compression switched on by configuration.

One line in the training script, after the ``Accelerator`` (or the ``Trainer``) is made::

    import tritter_comm.integrations.accelerate as tc_accelerate

    accelerator = Accelerator()
    tc_accelerate.attach(accelerator)          # or attach(trainer) for transformers' Trainer
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

and the launch recipe says whether and how to compress::

    TRITTER_COMM_CONFIG=launch/tritter_comm.yaml accelerate launch --config_file ... train.py
    TRITTER_COMM=vsa:mode=int2 accelerate launch ...        # or a spec (tritter_comm.config)

With neither variable set (and no ``config=`` argument) ``attach`` leaves accelerate's exchange
alone and logs a warning, so the same script runs compressed or not by configuration alone.

What ``attach`` does, and why it is not done through accelerate's own options (checked against
accelerate 1.15):

- accelerate's comm-hook option, ``DistributedDataParallelKwargs.comm_hook``, is an enum
  (``no``/``fp16``/``bf16``/``power_sgd``/``batched_power_sgd``) whose ``register_comm_hook`` maps
  it to PyTorch's hooks; the config file loader refuses unknown keys (``ClusterConfig`` raises
  "had unknown keys"); and ``Accelerator(kwargs_handlers=...)`` looks each handler up by its exact
  class, so a subclass fails. So ``attach`` wraps ``accelerator.prepare`` on this one instance:
  every model it returns gets the hook that fits its wrapper: DDP ->
  :func:`tritter_comm.vsa_hook`; FSDP1 -> ``tritter_comm.hooks.vsa_fsdp_hook``; FSDP2 (``fully_shard``)
  -> ``tritter_comm.fsdp.enable``. Models prepared before ``attach`` get it too.
- Checkpoints: the residuals differ from rank to rank. ``register_for_checkpointing`` does not fit
  them: ``save_state`` pickles a registered object's ``state_dict()`` on the main process only
  (``checkpointing.save_custom_state`` -> ``utils.save``), and ``load_state`` loads that one file
  on every rank. So ``attach`` registers save/load pre-hooks that write and read one file per
  process, ``tritter_comm_state_{process_index}.pt`` next to accelerate's own
  ``random_states_{process_index}.pkl``; ``save_state()`` / ``load_state()`` carry it.
- ``Trainer`` does not call ``save_state``; ``attach(trainer)`` adds a ``TrainerCallback``
  (:class:`TritterCommCallback`) that writes the same files into each ``checkpoint-N`` folder and
  reads them back when training resumes from one.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Optional, Union

import torch
from torch import nn

from .._warnings import warn as _warn
from ..config import CommConfig, from_env
from ..hooks import VSAState
from ..hooks._dispatch import register, wrapper_of

logger = logging.getLogger(__name__)

__all__ = ["Attachment", "TritterCommCallback", "attach", "state_file"]  # noqa: F822 (__getattr__)

_FILE_VERSION = 1


def state_file(directory: "str | os.PathLike[str]", process_index: int) -> str:
    """The file of process ``process_index``'s hook states in a checkpoint folder."""
    return os.path.join(os.fspath(directory), f"tritter_comm_state_{process_index}.pt")


def _resolve(config: Union[None, str, dict, CommConfig]) -> Optional[CommConfig]:
    if config is None:
        return from_env()
    if isinstance(config, CommConfig):
        return config
    if isinstance(config, str):
        return CommConfig.parse(config)
    if isinstance(config, dict):
        return CommConfig.from_mapping(config, source="attach(config=...)")
    raise TypeError(f"config must be a spec string, a dict or a CommConfig, got {type(config).__name__}")


class Attachment:
    """What :func:`attach` installed on one ``Accelerator``: one hook state per prepared model.

    Attributes:
        config: the configuration in force (None: none was found, nothing is compressed).
        states: the hook states, in the order the models were prepared.
    """

    def __init__(self, accelerator: Any, config: Optional[CommConfig]):
        self.accelerator = accelerator
        self.config = config
        self.states: list[VSAState] = []
        self._hooked: set[int] = set()  # id() of the models that have a hook

    @property
    def enabled(self) -> bool:
        return self.config is not None and self.config.enabled

    def stats(self) -> list[dict]:
        """``VSAState.stats()`` of each hooked model (this rank's counters)."""
        return [s.stats() for s in self.states]

    # -- hook installation ---------------------------------------------------------------------

    def install(self, model: Any) -> Optional[VSAState]:
        """Give ``model`` (as ``accelerator.prepare`` returned it) the hook its wrapper needs."""
        if not self.enabled or not isinstance(model, nn.Module):
            return None
        inner = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP/FSDP module
        if id(inner) in self._hooked:
            return None
        state = self._install(inner)
        if state is not None:
            self._hooked.add(id(inner))
            self.states.append(state)
            logger.info("tritter-comm: %s hook on %s (%s)", self.config.describe(),
                        type(inner).__name__, self.config.source)
        return state

    def _install(self, model: nn.Module) -> Optional[VSAState]:
        if wrapper_of(model) is None:
            logger.info("tritter-comm: %s is not wrapped for data parallelism (one process?); "
                        "nothing to compress", type(model).__name__)
            return None
        return register(model, self.config.vsa)

    # -- checkpoints ---------------------------------------------------------------------------

    def _process(self) -> tuple[int, int]:
        acc = self.accelerator
        return int(acc.process_index), int(acc.num_processes)

    def save(self, directory: "str | os.PathLike[str]") -> Optional[str]:
        """Write this process's hook states to ``directory`` (every process calls it)."""
        if not self.states:
            return None
        index, count = self._process()
        os.makedirs(directory, exist_ok=True)
        path = state_file(directory, index)
        torch.save({"version": _FILE_VERSION, "process_index": index, "num_processes": count,
                    "states": [s.state_dict() for s in self.states]}, path)
        logger.debug("tritter-comm: saved %d hook state(s) to %s", len(self.states), path)
        return path

    def load(self, directory: "str | os.PathLike[str]") -> bool:
        """Restore this process's hook states from ``directory``; False if it holds none."""
        if not self.states:
            return False
        index, count = self._process()
        path = state_file(directory, index)
        if not os.path.isfile(path):
            logger.warning(
                "tritter-comm: %s has no hook state for process %d (%s): the residuals start "
                "empty and compression restarts after start_iter steps", directory, index,
                os.path.basename(path))
            return False
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("version") != _FILE_VERSION:
            raise ValueError(f"{path}: not a tritter-comm state file of version {_FILE_VERSION}")
        if data["num_processes"] != count:
            raise ValueError(
                f"{path} was saved by a job of {data['num_processes']} processes and this job has "
                f"{count}: residuals are per process, so a job resumes with the same process count")
        if len(data["states"]) != len(self.states):
            raise ValueError(
                f"{path} holds {len(data['states'])} hook state(s) and this job hooked "
                f"{len(self.states)} model(s): prepare the same models in the same order")
        for s, sd in zip(self.states, data["states"]):
            s.load_state_dict(sd)
        logger.debug("tritter-comm: loaded %d hook state(s) from %s", len(self.states), path)
        return True

    def _save_pre_hook(self, models, weights, output_dir) -> None:
        self.save(output_dir)

    def _load_pre_hook(self, models, input_dir) -> None:
        self.load(input_dir)


def _check_accelerator(accelerator: Any) -> None:
    from accelerate.utils import DDPCommunicationHookType, DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA):
        raise ValueError(
            f"tritter-comm does not support accelerate's {kind} mode (it hooks DDP, FSDP1 and "
            "FSDP2); set TRITTER_COMM=none for this job")
    handler = getattr(accelerator, "ddp_handler", None)
    if handler is not None and handler.comm_hook != DDPCommunicationHookType.NO:
        raise ValueError(
            f"accelerate is configured with its own DDP comm hook ({handler.comm_hook}) and "
            "tritter-comm with its hook; DDP takes one: drop comm_hook from "
            "DistributedDataParallelKwargs, or set TRITTER_COMM=none")


def _same(a: CommConfig, b: CommConfig) -> bool:
    return a.hook == b.hook and dict(a.options) == dict(b.options)


def attach(target: Any, config: Union[None, str, dict, CommConfig] = None) -> Attachment:
    """Compress the gradient exchange of every model ``target`` prepares.

    Args:
        target: an ``accelerate.Accelerator``, or a ``transformers.Trainer`` (its accelerator is
            used, and a :class:`TritterCommCallback` is added for checkpoints).
        config: a spec (``"vsa:mode=int2"``), a dict (the keys of a config file) or a
            :class:`~tritter_comm.config.CommConfig`; None reads ``TRITTER_COMM`` /
            ``TRITTER_COMM_CONFIG`` (see :mod:`tritter_comm.config`). Neither: no compression.

    Call it before or after ``accelerator.prepare``, but before the first backward pass. Every
    rank must run it with the same configuration (a mismatch fails on every rank at the first
    compressed step). Calling it again on the same accelerator returns the same attachment.

    Returns:
        the :class:`Attachment` (``.states`` holds one ``VSAState`` per hooked model).
    """
    if hasattr(target, "accelerator") and hasattr(target, "add_callback"):  # a Trainer
        attachment = attach(target.accelerator, config)
        if not any(isinstance(cb, _callback_class()) for cb in target.callback_handler.callbacks):
            target.add_callback(_callback_class()(attachment))
        return attachment
    accelerator = target
    existing: Optional[Attachment] = getattr(accelerator, "_tritter_comm", None)
    if existing is not None:
        new = _resolve(config) if config is not None else None
        if new is not None and (existing.config is None or not _same(new, existing.config)):
            raise ValueError("tritter-comm is already attached to this accelerator with another "
                             "configuration")
        return existing
    cfg = _resolve(config)
    attachment = Attachment(accelerator, cfg)
    accelerator._tritter_comm = attachment
    if cfg is None:
        _warn("tritter-comm: attach() found no configuration (TRITTER_COMM and "
              "TRITTER_COMM_CONFIG are unset): gradients go uncompressed. Set TRITTER_COMM=vsa "
              "to compress, or pass the configuration to attach().")
        return attachment
    if not cfg.enabled:
        logger.info("tritter-comm: hook none (%s): accelerate's exchange is left alone", cfg.source)
        return attachment
    _check_accelerator(accelerator)

    original = accelerator.prepare

    @functools.wraps(original)
    def prepare(*args: Any, **kwargs: Any):
        out = original(*args, **kwargs)
        for obj in out if isinstance(out, tuple) else (out,):
            attachment.install(obj)
        return out

    accelerator.prepare = prepare
    for model in getattr(accelerator, "_models", ()):  # prepared before attach()
        attachment.install(model)
    accelerator.register_save_state_pre_hook(attachment._save_pre_hook)
    accelerator.register_load_state_pre_hook(attachment._load_pre_hook)
    return attachment


@functools.lru_cache(maxsize=1)
def _callback_class() -> type:
    try:
        from transformers import TrainerCallback
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    except ImportError as e:
        raise ImportError("TritterCommCallback needs transformers: pip install transformers") from e

    class TritterCommCallback(TrainerCallback):
        """Saves and restores the hook states with ``Trainer``'s checkpoints.

        ``attach(trainer)`` adds it; the hooks themselves come from the attachment's wrapped
        ``trainer.accelerator.prepare``. Each process writes ``tritter_comm_state_{i}.pt`` into
        ``checkpoint-N`` on save, and reads it back when ``train(resume_from_checkpoint=...)``
        starts from ``checkpoint-N`` of ``args.output_dir``.
        """

        def __init__(self, attachment: Attachment):
            self.attachment = attachment

        def _folder(self, args, state) -> str:
            return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

        def on_save(self, args, state, control, **kwargs):
            self.attachment.save(self._folder(args, state))

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step > 0:  # resumed: Trainer loaded trainer_state.json of checkpoint-N
                self.attachment.load(self._folder(args, state))

    return TritterCommCallback


def __getattr__(name: str):
    # TritterCommCallback subclasses transformers' TrainerCallback: made on first use, so that
    # importing this module does not import transformers.
    if name == "TritterCommCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
