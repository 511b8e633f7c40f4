"""The unit every pipeline backend yields and the trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One batch: normalised NCHW images, labels, dataset indices and the augmentation applied.

    `epoch` is the augmentation epoch the batch was generated for, so (index, epoch)
    identifies the exact view of every sample (the teacher cache keys on it).
    """

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    aug: torch.Tensor
    epoch: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])
