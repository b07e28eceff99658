"""Devices: the one a command asks for (``resolve_device``), and torchrun's environment for training and many-scan
detection: one process per GPU (or CPU rank), rank 0 writes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import SACDiffError


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SACDiffError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise SACDiffError(f"device {device!r} unknown; choose auto, cpu or cuda")
    return torch.device(device)


class Distributed:
    """torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK); a no-op for a plain single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        self.active = self.world > 1
        if self.active:
            if device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self):
        if self.active and dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing; tearing gloo down under it aborts the other rank
            dist.destroy_process_group()
