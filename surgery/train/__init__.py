"""Bundled trainers: continued pretraining of grown models (`surgery train`), Gstack's growth
guideline (`surgery advise`) and held-out evaluation (`surgery eval`).

Needs the `train` extra (transformers, accelerate, matplotlib); the core does not import this.
"""

from surgery.train.advise import gstack_growth_tokens
from surgery.train.config import load_config
from surgery.train.run import TrainResult, train

__all__ = ["train", "load_config", "TrainResult", "gstack_growth_tokens"]
