"""The adaptation training loop: steps, schedule, mixed precision, checkpoints, time cap, data parallelism.

One loop serves every objective. The learning rate warms up linearly over ``adapt.warmup_steps`` and decays
on a cosine to zero at ``adapt.steps`` (each parameter group scaled from its own ``base_lr``). Every
``checkpoint_every`` steps process 0 writes ``checkpoint.pt`` (objective with heads, teacher, queues and
centre; optimiser; loss scaler; loss history; validation state) atomically; a rerun with the same settings
continues from it. ``max_minutes`` ends the run early, after a checkpoint, with what was learned so far.

Under ``torchrun --nproc_per_node N`` each process trains on its own draw of tiles; the student is wrapped in
``DistributedDataParallel`` (rebuilt when ``finetune`` unfreezes blocks), so gradients are averaged across
processes and every replica stays identical.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ubc_ocean.device import autocast, grad_scaler
from ubc_ocean.io_utils import atomic_path

from .objectives import Objective

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Distributed:
    """This process's place among the data-parallel processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()


@dataclass
class TrainingState:
    """Everything a resumed run needs besides the modules and the optimiser."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    best_score: float | None = None
    best_step: int | None = None
    best_encoder: dict | None = None
    stale_checks: int = 0
    stopped_by: str | None = None
    resumed_from: int = 0


def learning_rate_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then a cosine to 0 at ``steps``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(path: Path, objective: Objective, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, state: TrainingState, signature: str) -> None:
    """Write the checkpoint atomically (a kill mid-write leaves the previous one)."""
    payload = {"signature": signature, "objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
               "scaler": scaler.state_dict(), "state": state.__dict__,
               "phase": getattr(objective, "phase", None)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, signature: str) -> dict | None:
    """The checkpoint at ``path`` when it was written by a run of the same settings, else ``None``."""
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("signature") != signature:
        log.warning("%s was written with other settings: adaptation starts over", path)
        return None
    return payload


@dataclass
class Trainer:
    """Runs ``objective`` for ``adapt.steps`` steps on ``batches`` (a function of the first step)."""

    objective: Objective
    adapt: dict
    device: torch.device
    folder: Path
    signature: str
    distributed: Distributed
    validate: Callable[[], float] | None = None  # finetune: validation balanced accuracy of the tile head
    state: TrainingState = field(default_factory=TrainingState)
    checkpoints: bool = True  # False: nothing written (a timing run)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(self.objective.param_groups(self.adapt))
        self.scaler = grad_scaler(self.device, self.adapt["precision"])
        self.checkpoint = self.folder / CHECKPOINT_FILE

    def resume(self) -> None:
        """Continue from this folder's checkpoint when its settings agree."""
        payload = load_checkpoint(self.checkpoint, self.signature)
        if payload is None:
            return
        self.objective.load_state_dict(payload["objective"])
        if payload.get("phase") is not None:  # the finetune phase that set which groups train
            self.objective.apply_phase(payload["state"]["step"], self.optimizer)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])
        self.state = TrainingState(**payload["state"])
        self.state.resumed_from = self.state.step
        self.state.stopped_by = None
        log.info("adaptation resumes at step %d of %d", self.state.step, self.adapt["steps"])

    def _wrap(self) -> None:
        """(Re)build the data-parallel wrapper around the student (its trainable parameters may change)."""
        if not self.distributed.active:
            return
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.objective.call_student = DistributedDataParallel(self.objective.student, device_ids=device_ids,
                                                              broadcast_buffers=False)

    def _stop_everywhere(self, stop: bool) -> bool:
        """One process's stop decision made every process's (the time cap and early stopping)."""
        if not self.distributed.active:
            return stop
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _validate(self, step: int) -> bool:
        """Record the validation score at ``step``; True when patience is spent."""
        if self.validate is None or not self.distributed.main:
            return False
        score = self.validate()
        self.state.history.append({"step": step, "validation_balanced_accuracy": score})
        if self.state.best_score is None or score > self.state.best_score:
            self.state.best_score, self.state.best_step, self.state.stale_checks = score, step, 0
            self.state.best_encoder = {k: v.detach().cpu().clone()
                                       for k, v in self.objective.student.encoder.state_dict().items()}
        else:
            self.state.stale_checks += 1
        log.info("step %d: validation balanced accuracy %.3f (best %.3f at step %s)", step, score,
                 self.state.best_score, self.state.best_step)
        return self.state.stale_checks >= int(self.adapt["patience"])

    def run(self, batches: Callable[[int], Iterable[tuple[list[torch.Tensor], torch.Tensor]]]) -> TrainingState:
        """Train from the current step to ``adapt.steps`` (or the time cap, or early stopping)."""
        adapt, state = self.adapt, self.state
        total = int(adapt["steps"])
        cap = float(adapt["max_minutes"]) * 60 if adapt["max_minutes"] else math.inf
        started = time.monotonic()
        changed = self.objective.apply_phase(state.step, self.optimizer)
        self.objective.train_mode()
        if changed or self.objective.call_student is None:
            self._wrap()
        losses: list[float] = []
        spreads: list[float] = []
        bar = tqdm(total=total, initial=state.step, desc=f"adapting ({adapt['method']})", unit="step",
                   dynamic_ncols=True, disable=not self.distributed.main)
        window_start = time.monotonic()
        for views, labels in batches(state.step):
            step = state.step
            if self.objective.apply_phase(step, self.optimizer):
                self.objective.train_mode()
                self._wrap()
                log.info("step %d: finetune phase %s", step, getattr(self.objective, "phase", None))
            factor = learning_rate_factor(step, total, int(adapt["warmup_steps"]))
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            views = [v.to(self.device, non_blocking=True) for v in views]
            labels = labels.to(self.device, non_blocking=True)
            with autocast(self.device, adapt["precision"]):
                loss, spread = self.objective(views, labels, step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"adaptation loss is {loss.item()} at step {step}: lower adapt.lr or use "
                                         "adapt.precision=fp32")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.objective.after_backward(step)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.objective.after_step(step, total)
            state.step = step + 1
            losses.append(float(loss.detach()))
            spreads.append(spread)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            stop = False
            if state.step % int(adapt["log_every"]) == 0 or state.step == total:
                now = time.monotonic()
                state.history.append({"step": state.step, "loss": sum(losses) / len(losses),
                                      "lr": self.optimizer.param_groups[0]["lr"],
                                      "feature_spread": sum(spreads) / len(spreads),
                                      "steps_per_s": len(losses) / max(now - window_start, 1e-9),
                                      "elapsed_s": state.elapsed_s + now - started})
                losses, spreads, window_start = [], [], now
            if self.validate is not None and (state.step % int(adapt["validation_every"]) == 0 or state.step == total):
                stop = self._validate(state.step)
                if stop:
                    state.stopped_by = "early_stopping"
            if time.monotonic() - started >= cap:
                stop, state.stopped_by = True, state.stopped_by or "max_minutes"
            stop = self._stop_everywhere(stop)
            if stop or state.step % int(adapt["checkpoint_every"]) == 0 or state.step == total:
                self._checkpoint(started)
            if stop:
                state.stopped_by = state.stopped_by or "another process"
                break
        bar.close()
        if state.stopped_by is None and state.step >= total:
            state.stopped_by = "steps"
        state.elapsed_s += time.monotonic() - started
        return state

    def replicas_agree(self) -> bool:
        """Whether every process ends with the same encoder weights (data parallelism kept them in step);
        trivially true for one process."""
        if not self.distributed.active:
            return True
        with torch.no_grad():
            total = torch.stack([p.detach().double().sum() for p in self.objective.student.encoder.parameters()]).sum()
        gathered = [torch.zeros_like(total) for _ in range(self.distributed.world)]
        dist.all_gather(gathered, total)
        return all(torch.allclose(value, gathered[0], rtol=1e-9, atol=1e-9) for value in gathered)

    def _checkpoint(self, started: float) -> None:
        if not (self.distributed.main and self.checkpoints):
            return
        elapsed = self.state.elapsed_s
        self.state.elapsed_s = elapsed + time.monotonic() - started
        try:
            save_checkpoint(self.checkpoint, self.objective, self.optimizer, self.scaler, self.state, self.signature)
        finally:
            self.state.elapsed_s = elapsed


def distributed_from_environment() -> Distributed:
    """Join ``torchrun``'s process group when it started this process (``WORLD_SIZE`` > 1): NCCL on GPUs,
    gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size())
