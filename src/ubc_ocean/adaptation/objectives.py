"""The training objectives of ``adapt.method``, each continuing from the configured encoder.

- ``dino``: self-distillation (Caron et al., 2021; DINOv2's image-level loss): a student and an EMA teacher
  with DINO projection heads; the teacher sees the global views, the student every view (multi-crop); the
  teacher's output is centred and sharpened. KoLeo (DINOv2) spreads the student's features when
  ``koleo_weight`` > 0. Loss, head, momentum update and KoLeo are lightly's.
- ``moco``: MoCo v3 (Chen et al., 2021): a projection and prediction head on the student, a momentum
  encoder, a symmetric InfoNCE loss; ``queue_size`` > 0 adds MoCo v2's queue of negatives (lightly's
  ``NTXentLoss`` memory bank).
- ``supcon``: weakly supervised contrastive learning in the spirit of INS (Li et al., 2022): a MoCo-style
  momentum encoder whose keys carry their slide's class as a weak label; a query's positives are every key
  of its class in the batch and in a labelled queue (optionally the running class prototypes). Written here:
  lightly's memory bank keeps no labels and lightly has no supervised contrastive loss.
- ``finetune``: a tile head on the slide's label, trained alone (phase 1), then with one more block
  unfrozen every ``unfreeze_every`` steps (phase 2, blocks at a tenth of ``lr``), then every weight at
  ``finetune_lr`` (phase 3, ``trainable=full``); ``lwf_weight`` > 0 adds learning without forgetting,
  (1 - cosine) between the student's features and the original encoder's.

Each objective owns a ``student`` module (the encoder being adapted plus its heads: what a data-parallel
wrapper wraps, called once per step) and reports the spread of the student's features
(:func:`feature_spread`), by which a collapsed run is told.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .trainable import blocks, final_modules, timm_module


def feature_spread(features: torch.Tensor) -> float:
    """How spread the L2-normalised features of a batch are: the mean per-dimension standard deviation
    times sqrt(D) (about 1 for directions spread evenly over the sphere, 0 when every tile maps to one)."""
    z = F.normalize(features.detach().float(), dim=1)
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[1]))


class Student(nn.Module):
    """The encoder and its heads, run on a list of views in one call: views of one size share a batch."""

    def __init__(self, encoder: nn.Module, *heads: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(heads)

    def forward(self, views: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Per view: the encoder's features, and each head's output (heads chained: the second head reads the
        first's output)."""
        features: list[torch.Tensor] = []
        start = 0
        while start < len(views):
            stop = start
            while stop < len(views) and views[stop].shape == views[start].shape:
                stop += 1
            batch = torch.cat(list(views[start:stop]))
            features += list(self.encoder(batch).float().chunk(stop - start))
            start = stop
        outputs = []
        x = torch.cat(features)
        for head in self.heads:
            x = head(x)
            outputs.append(list(x.chunk(len(views))))
        return features, outputs


def _frozen_copy_in_place(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def _frozen_copy(module: nn.Module) -> nn.Module:
    return _frozen_copy_in_place(copy.deepcopy(module))


def _hidden(width: int) -> int:
    """Projection heads' hidden width: 2048 for a wide encoder, less for a small one."""
    return int(min(2048, max(256, 4 * width)))


def _decay_groups(modules: Sequence[nn.Module], lr: float, weight_decay: float) -> list[dict]:
    """Parameter groups: weights decayed, biases and norms (1-D) not."""
    params = [p for module in modules for p in module.parameters()]
    unique = list({id(p): p for p in params}.values())
    return [{"params": [p for p in unique if p.ndim > 1], "base_lr": lr, "weight_decay": weight_decay},
            {"params": [p for p in unique if p.ndim <= 1], "base_lr": lr, "weight_decay": 0.0}]


class Objective(nn.Module):
    """What every method offers the trainer."""

    student: Student
    uses_labels = False

    def __init__(self) -> None:
        super().__init__()
        self.call_student: Callable[[Sequence[torch.Tensor]], tuple] | None = None  # a data-parallel wrapper

    def run_student(self, views: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        return (self.call_student or self.student)(views)

    def param_groups(self, adapt: Mapping) -> list[dict]:
        return _decay_groups([self.student], float(adapt["lr"]), float(adapt["weight_decay"]))

    def train_mode(self) -> None:
        """Training mode, except the batch norms of frozen layers, which keep their statistics (eval mode) as
        they keep their weights; a teacher's layers follow the student's, a frozen original stays in eval."""
        self.train()
        for module in self.student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()):
                module.eval()
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            for mine, theirs in zip(self.student.modules(), teacher.modules(), strict=True):
                theirs.training = mine.training
        original = getattr(self, "original", None)
        if original is not None:
            original.eval()

    def apply_phase(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Set what trains at ``step``; True when that changed (a data-parallel wrapper is rebuilt)."""
        return False

    def after_backward(self, step: int) -> None:
        """After the backward pass, before the optimiser step (gradients may be dropped)."""

    def after_step(self, step: int, total: int) -> None:
        """After the optimiser step (momentum updates)."""

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor, step: int) -> tuple[torch.Tensor, float]:
        """The loss of one batch and the spread of the student's features on the first view."""
        raise NotImplementedError


class MomentumObjective(Objective):
    """An objective with an EMA teacher of the student (momentum cosine-scheduled from ``momentum`` to 1)."""

    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum

    def make_teacher(self, *heads: Callable[[], nn.Module]) -> None:
        """The teacher: a copy of the student (its heads built anew by ``heads`` and loaded: DINO's head uses
        weight normalisation, which ``deepcopy`` refuses), frozen."""
        teacher = Student(copy.deepcopy(self.student.encoder), *(make() for make in heads))
        teacher.load_state_dict(self.student.state_dict())
        self.teacher = _frozen_copy_in_place(teacher)

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        update_momentum(self.student, self.teacher, cosine_schedule(step, max(total, 1), self.momentum, 1.0))


class Dino(MomentumObjective):
    def __init__(self, encoder: nn.Module, width: int, adapt: Mapping, global_views: int) -> None:
        from lightly.loss import DINOLoss, KoLeoLoss
        from lightly.models.modules import DINOProjectionHead

        super().__init__(float(adapt["momentum"]))
        out_dim = int(adapt["dino_out_dim"])
        freeze = int(adapt["dino_freeze_last_layer_steps"])

        def head() -> nn.Module:
            with warnings.catch_warnings():  # lightly's head uses the old weight_norm: a FutureWarning per build
                warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
                return DINOProjectionHead(width, _hidden(width), 256, out_dim, freeze_last_layer=freeze)

        self.student = Student(encoder, head())
        self.make_teacher(head)
        # lightly counts the teacher temperature's warm-up in "epochs": here steps (the loss is given the step)
        self.criterion = DINOLoss(out_dim, warmup_teacher_temp=float(adapt["dino_warmup_teacher_temp"]),
                                  teacher_temp=float(adapt["dino_teacher_temp"]),
                                  warmup_teacher_temp_epochs=int(adapt["dino_teacher_temp_warmup_steps"]),
                                  student_temp=float(adapt["dino_student_temp"]))
        self.koleo_weight = float(adapt["koleo_weight"])
        self.koleo = KoLeoLoss()
        self.global_views = global_views

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor, step: int) -> tuple[torch.Tensor, float]:
        with torch.no_grad():
            _, (teacher_out,) = self.teacher(views[: self.global_views])
        features, (student_out,) = self.run_student(views)
        loss = self.criterion([t.float() for t in teacher_out], [s.float() for s in student_out], epoch=step)
        if self.koleo_weight > 0:
            koleo = sum(self.koleo(f) for f in features[: self.global_views]) / self.global_views
            loss = loss + self.koleo_weight * koleo
        return loss, feature_spread(features[0])

    def after_backward(self, step: int) -> None:
        """DINO holds the head's last layer still for the first ``dino_freeze_last_layer_steps`` steps (its
        gradients dropped): the prototypes move only once the features feeding them have begun to settle."""
        self.student.heads[0].cancel_last_layer_gradients(step)


class MoCo(MomentumObjective):
    def __init__(self, encoder: nn.Module, width: int, adapt: Mapping) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import BYOLPredictionHead, MoCoProjectionHead

        super().__init__(float(adapt["momentum"]))
        hidden = _hidden(width)
        heads = (lambda: MoCoProjectionHead(width, hidden, 256, num_layers=2, batch_norm=True),
                 lambda: BYOLPredictionHead(256, hidden, 256))
        self.student = Student(encoder, *(make() for make in heads))
        self.make_teacher(*heads)
        queue = int(adapt["queue_size"])
        self.criterion = NTXentLoss(temperature=float(adapt["moco_temperature"]),
                                    memory_bank_size=(queue, 256) if queue else 0)

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor, step: int) -> tuple[torch.Tensor, float]:
        with torch.no_grad():
            _, (keys, _) = self.teacher(views[:2])
        features, (_, queries) = self.run_student(views[:2])
        loss = 0.5 * (self.criterion(queries[0], keys[1]) + self.criterion(queries[1], keys[0]))
        return loss, feature_spread(features[0])


def supervised_contrastive(queries: torch.Tensor, query_labels: torch.Tensor, keys: torch.Tensor,
                           key_labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) of L2-normalised ``queries`` against ``keys``:
    for each labelled query, the mean over its positives (keys of its label) of -log softmax over every
    labelled key. Keys labelled -1 (empty queue slots) take no part; queries without a positive none either."""
    valid = key_labels >= 0
    logits = (queries @ keys.T / temperature).masked_fill(~valid[None, :], float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (query_labels[:, None] == key_labels[None, :]) & valid[None, :] & (query_labels[:, None] >= 0)
    has = positives.any(dim=1)
    if not has.any():
        return queries.sum() * 0.0
    per_query = -(log_prob.masked_fill(~positives, 0.0)).sum(dim=1) / positives.sum(dim=1).clamp(min=1)
    return per_query[has].mean()


class SupCon(MomentumObjective):
    uses_labels = True

    def __init__(self, encoder: nn.Module, width: int, adapt: Mapping, classes: int) -> None:
        from lightly.models.modules import MoCoProjectionHead

        super().__init__(float(adapt["momentum"]))
        def head() -> nn.Module:
            return MoCoProjectionHead(width, _hidden(width), 128, num_layers=2, batch_norm=True)

        self.student = Student(encoder, head())
        self.make_teacher(head)
        self.temperature = float(adapt["supcon_temperature"])
        size = int(adapt["queue_size"])
        self.register_buffer("queue", torch.zeros(size, 128))
        self.register_buffer("queue_labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self.use_prototypes = bool(adapt["supcon_prototypes"])
        self.register_buffer("prototypes", torch.zeros(classes, 128))
        self.register_buffer("prototype_seen", torch.zeros(classes, dtype=torch.bool))

    @torch.no_grad()
    def _remember(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        for label in labels.unique():
            if label < 0:
                continue
            mean = F.normalize(keys[labels == label].mean(dim=0), dim=0)
            if self.prototype_seen[label]:
                mean = F.normalize(0.99 * self.prototypes[label] + 0.01 * mean, dim=0)
            self.prototypes[label] = mean
            self.prototype_seen[label] = True
        size = self.queue.shape[0]
        if size == 0:
            return
        keys, labels = keys[-size:], labels[-size:]
        index = (int(self.queue_pointer) + torch.arange(len(keys), device=keys.device)) % size
        self.queue[index] = keys
        self.queue_labels[index] = labels
        self.queue_pointer.fill_((int(self.queue_pointer) + len(keys)) % size)

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor, step: int) -> tuple[torch.Tensor, float]:
        with torch.no_grad():
            _, (keys,) = self.teacher(views[:2])
            keys = [F.normalize(k.float(), dim=1) for k in keys]
        features, (queries,) = self.run_student(views[:2])
        queries = [F.normalize(q.float(), dim=1) for q in queries]
        bank, bank_labels = [self.queue], [self.queue_labels]
        if self.use_prototypes:
            bank.append(self.prototypes)
            bank_labels.append(torch.where(self.prototype_seen, torch.arange(len(self.prototypes),
                                                                            device=labels.device), -1))
        loss = 0.0
        for query, key in ((queries[0], keys[1]), (queries[1], keys[0])):
            all_keys = torch.cat([key, *bank])
            all_labels = torch.cat([labels, *bank_labels])
            loss = loss + 0.5 * supervised_contrastive(query, labels, all_keys, all_labels, self.temperature)
        self._remember(keys[1], labels)
        return loss, feature_spread(features[0])  # type: ignore[return-value]


class FineTune(Objective):
    uses_labels = True

    def __init__(self, encoder: nn.Module, width: int, adapt: Mapping, classes: int) -> None:
        super().__init__()
        self.student = Student(encoder, nn.Linear(width, classes))
        self.lwf_weight = float(adapt["lwf_weight"])
        self.original = _frozen_copy(encoder).eval() if self.lwf_weight > 0 else None
        self.adapt = dict(adapt)
        self.blocks = blocks(encoder)
        self.finals = final_modules(encoder)
        self.phase: tuple[str, int] | None = None

    def param_groups(self, adapt: Mapping) -> list[dict]:
        lr, decay = float(adapt["lr"]), float(adapt["weight_decay"])
        in_blocks = {id(p) for block in [*self.blocks, *self.finals] for p in block.parameters()}
        stem = [p for p in timm_module(self.student.encoder).parameters() if id(p) not in in_blocks]
        groups = [{"params": list(self.student.heads.parameters()), "base_lr": lr, "weight_decay": decay,
                   "name": "head"}]
        groups += [{"params": list(block.parameters()), "base_lr": 0.0, "weight_decay": decay, "name": f"block{i}"}
                   for i, block in enumerate(self.blocks)]
        groups.append({"params": [p for m in self.finals for p in m.parameters()], "base_lr": 0.0,
                       "weight_decay": decay, "name": "final"})
        groups.append({"params": stem, "base_lr": 0.0, "weight_decay": decay, "name": "stem"})
        return groups

    def phase_at(self, step: int) -> tuple[str, int]:
        """``(phase, blocks unfrozen)`` at ``step`` (see the module's notes)."""
        adapt = self.adapt
        if step < int(adapt["head_steps"]):
            return "head", 0
        opened = 1 + (step - int(adapt["head_steps"])) // int(adapt["unfreeze_every"])
        limit = len(self.blocks) if adapt["trainable"] == "full" else min(int(adapt["last_blocks"]), len(self.blocks))
        if adapt["trainable"] == "full" and opened > len(self.blocks):
            return "full", len(self.blocks)
        return "unfreeze", min(opened, limit)

    def apply_phase(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        phase = self.phase_at(step)
        if phase == self.phase:
            return False
        self.phase = phase
        name, opened = phase
        lr, low = float(self.adapt["lr"]), float(self.adapt["finetune_lr"])
        first_open = len(self.blocks) - opened
        for group in optimizer.param_groups:
            which = group["name"]
            if name == "full":
                rate = low
            elif which == "head":
                rate = lr
            elif which == "final" or (which.startswith("block") and int(which[5:]) >= first_open):
                rate = lr * 0.1 if opened else 0.0
            else:
                rate = 0.0
            group["base_lr"] = rate
            for parameter in group["params"]:
                parameter.requires_grad_(rate > 0)
        return True

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor, step: int) -> tuple[torch.Tensor, float]:
        features, (logits,) = self.run_student(views[:1])
        loss = F.cross_entropy(logits[0].float(), labels)
        if self.original is not None:
            with torch.no_grad():
                reference = self.original(views[0]).float()
            loss = loss + self.lwf_weight * (1 - F.cosine_similarity(features[0], reference, dim=1)).mean()
        return loss, feature_spread(features[0])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """The tile head's class for each image (encoder in eval mode)."""
        was_training = self.student.training
        self.student.eval()
        out = [self.student([chunk])[1][0][0].argmax(dim=1) for chunk in images.split(batch_size)]
        if was_training:
            self.train_mode()
        return torch.cat(out)


def build_objective(method: str, encoder: nn.Module, width: int, adapt: Mapping, classes: int,
                    global_views: int) -> Objective:
    """The objective of ``adapt.method`` around ``encoder`` (its features ``width`` wide)."""
    if method == "dino":
        return Dino(encoder, width, adapt, global_views)
    if method == "moco":
        return MoCo(encoder, width, adapt)
    if method == "supcon":
        return SupCon(encoder, width, adapt, classes)
    if method == "finetune":
        return FineTune(encoder, width, adapt, classes)
    raise ValueError(f"unknown adapt.method {method!r}")
