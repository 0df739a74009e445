"""The shared base of every experiment config: the engine's schema (`zoo.engine.config.base_config`).

An experiment file calls `get_base_config(model=..., dataset=..., task=...)` and sets its own values.
"""
from zoo.engine.config import base_config as get_base_config

__all__ = ["get_base_config"]
