"""Type stubs of the convnets package (see convnets/__init__.py for the documentation)."""

import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Tuple, Union

import torch

_Path = Union[str, "os.PathLike[str]"]

CUDA: bool

class Error(RuntimeError):
    """A dataset, a record or the loader failed; the message says which (a damaged record
    names its shard and index)."""

class Loader:
    """Batches of one rank from a packed dataset (or a TFRecord folder), as torch tensors;
    iterating runs one epoch, the next iter() the next epoch."""

    device: torch.device
    def __init__(
        self,
        path: _Path,
        split: str = "train",
        batch_size: int = 256,
        device: Union[Literal["auto", "cpu", "cuda"], str, torch.device] = "auto",
        transform: Literal["train", "eval"] = "train",
        image_size: int = 224,
        dtype: torch.dtype = torch.float16,
        channels_last: bool = True,
        seed: int = 0,
        threads: int = 0,
        hw_decoder_load: Optional[float] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        drop_last: Optional[bool] = None,
        shuffle: Optional[bool] = None,
        on_bad_record: Literal["error", "skip"] = "error",
        label_offset: int = 1,
    ) -> None: ...
    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(images [B, 3, S, S], labels [B] int64) for the rest of the current epoch."""
    def __len__(self) -> int:
        """Batches per epoch of this rank."""
    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
    def state_dict(self) -> Dict[str, int]:
        """{"epoch": int, "batch": int}: the next batch."""
    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continues exactly from a state_dict()."""
    def stats(self) -> Dict[str, Any]:
        """The loader's counters as of the last batch."""
    def skipped(self) -> List[Dict[str, Any]]:
        """Records skipped (on_bad_record="skip") since the last call."""
    def close(self) -> None:
        """Stops the loader's threads now."""
    def __enter__(self) -> "Loader": ...
    def __exit__(self, *exc: object) -> None: ...

class Dataset:
    """A packed dataset folder."""

    path: Path
    splits: Dict[str, int]
    classes: List[str]
    class_names: List[str]
    def __init__(self, path: _Path) -> None: ...
    @property
    def num_classes(self) -> int: ...
    def __len__(self) -> int: ...

def pack_imagenet(
    input: _Path,
    output: _Path,
    *,
    format: Literal["auto", "folder", "tfrecord"] = "auto",
    val_labels: Optional[_Path] = None,
    label_offset: int = 1,
    train_shards: Optional[int] = None,
    val_shards: Optional[int] = None,
    shard_size: int = ...,
    seed: int = 0,
    threads: int = 0,
    max_side: Optional[int] = None,
    quality: int = 95,
    awkward: Literal["reencode", "skip"] = "reencode",
    decode_check: bool = True,
    strict: bool = False,
) -> Dict[str, Any]:
    """Packs an ImageNet or TFRecord folder into a dataset folder, as `convnets
    pack-imagenet` does; returns the pack report."""
