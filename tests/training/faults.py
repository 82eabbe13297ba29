"""A fault injected into a training run from its config (tests only)."""

import lightning as L
import torch


class NaNOnRank(L.Callback):
    """Turns one image of the batch numbered `batch` (or of every batch from it on, `every`)
    into NaNs on rank `rank` only."""

    def __init__(self, rank: int = 1, batch: int = 3, every: bool = False) -> None:
        self.rank, self.batch, self.every = rank, batch, every

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        number = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        hit = number >= self.batch if self.every else number == self.batch
        if trainer.global_rank == self.rank and hit:
            batch["image"][0] = torch.nan
