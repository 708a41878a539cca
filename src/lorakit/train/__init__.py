"""Training: `train(cfg)` runs a config to a run folder (lorakit.train.run).

`train` is exported lazily so that importing a submodule (callbacks, speed) does not pull in the
Trainer stack."""

from __future__ import annotations

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from lorakit.train.run import train

        return train
    raise AttributeError(f"module 'lorakit.train' has no attribute {name!r}")
