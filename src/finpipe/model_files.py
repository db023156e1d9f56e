"""A fitted model's folder: `weights.pt` (the net's state dict) and `model.json` (the rest).

Every domain's fitted model saves itself this way (scaler, vocabulary, centroids and the like
go in the JSON), and MLflow ships the folder as the pyfunc model's artifact. A model made of
other models (the market ensemble) has only `model.json` and a sub-folder per member.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Self, TypeVar

import torch
from torch import nn

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
METADATA_FILE = "model.json"


def save_model_files(directory: Path, net: nn.Module, metadata: dict) -> None:
    """Write `net`'s state dict and `metadata` (with the format version) into `directory`.

    Each file is written beside its final name and renamed into place, so a reader never
    sees half a file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    torch.save(net.state_dict(), weights.with_suffix(".tmp"))
    os.replace(weights.with_suffix(".tmp"), weights)
    save_model_metadata(directory, metadata)


def save_model_metadata(directory: Path, metadata: dict) -> None:
    """Write `metadata` (with the format version) as `directory`/model.json, through a
    temporary file renamed into place."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    described = directory / METADATA_FILE
    payload = {"format_version": FORMAT_VERSION, **metadata}
    described.with_suffix(".tmp").write_text(json.dumps(payload, indent=2))
    os.replace(described.with_suffix(".tmp"), described)


def read_model_metadata(directory: Path, what: str, *, with_weights: bool = True) -> dict:
    """Return the metadata `save_model_files` (or, `with_weights=False`, `save_model_metadata`)
    wrote into `directory` (a saved `what` model).

    Raises FileNotFoundError when a file is missing, ValueError for another format.
    """
    directory = Path(directory)
    weights, described = directory / WEIGHTS_FILE, directory / METADATA_FILE
    for path in (weights, described) if with_weights else (described,):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {directory} does not hold a saved {what} model "
                f"(expected {f'{WEIGHTS_FILE} and ' if with_weights else ''}{METADATA_FILE})"
            )
    data = json.loads(described.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{described}: format_version {data.get('format_version')!r}, this finpipe reads "
            f"{FORMAT_VERSION}; retrain the model"
        )
    return data


NetT = TypeVar("NetT", bound=nn.Module)


def load_weights(net: NetT, directory: Path) -> NetT:
    """Load the saved state dict of `directory` into `net`; return it on CPU in eval mode.

    Raises ValueError when the weights are not those of the net its metadata describes (a
    folder mixing two models' files): every parameter must be there, with its shape."""
    path = Path(directory) / WEIGHTS_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as mismatch:
        summary = str(mismatch).splitlines()[1:2] or [str(mismatch)]
        raise ValueError(
            f"{path} does not hold the weights of the net {Path(directory) / METADATA_FILE} "
            f"describes ({summary[0].strip().rstrip('.')}): the folder mixes two models' "
            "files; save the model again, or retrain it"
        ) from mismatch
    return net.eval()


class SavesNetAndMetadata(ABC):
    """Mixed into each domain's fitted model: the folder it saves and reads back.

    `save` writes `net` and `to_dict()` with the training history; `load` reads the folder and
    rebuilds the model with the class's `from_saved(data, directory)`.
    """

    saved_as: ClassVar[str]  # the model's name in messages about its folder
    net: nn.Module
    history: list[dict]
    best_epoch: int

    @abstractmethod
    def to_dict(self) -> dict:
        """The model's own metadata (all but weights and history)."""

    @classmethod
    @abstractmethod
    def from_saved(cls, data: dict, directory: Path) -> Self:
        """Rebuild the model from `to_dict`'s data and its folder."""

    def save(self, directory: Path) -> None:
        """Write `weights.pt` (state dict) and `model.json` (the rest) into `directory`."""
        trained = {"history": self.history, "best_epoch": self.best_epoch}
        save_model_files(directory, self.net, {**self.to_dict(), **trained})

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a model written by `save`; the net comes back on CPU in eval mode."""
        return cls.from_saved(read_model_metadata(directory, cls.saved_as), Path(directory))
