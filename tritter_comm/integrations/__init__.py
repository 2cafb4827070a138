"""Integrations with training frameworks. Each is a module imported on its own, so that this
package never imports a framework the user does not use:

- :mod:`tritter_comm.integrations.accelerate`: HuggingFace accelerate and transformers' Trainer.
"""
