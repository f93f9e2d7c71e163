"""``fit``: a thin multi-task training loop (optional — a model and a weighting method work in any loop).

A step is forward → weighting → backward → optimiser step, with no host synchronisation: per-task losses are summed
on the device and copied to the host only every ``log_every`` steps (for the progress bar) and at the epoch end.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import nn

from mtlfast.training import _ranks
from mtlfast.training._batches import model_device, model_tasks, split_batch, to_device
from mtlfast.training.delta_m import delta_m, metric_direction
from mtlfast.training.evaluate import autocast_context, evaluate
from mtlfast.training.history import EpochRecord, History
from mtlfast.training.loss_meter import LossMeter
from mtlfast.training.metrics import MetricsSpec, TaskMetrics, build_task_metrics


class EpochCallback(Protocol):
    """Anything with ``end_epoch()`` (e.g. a fine-tune / unfreeze schedule), called after every epoch."""

    def end_epoch(self) -> Any: ...


class _TrainStep:
    """One optimisation step on a batch; returns device tensors only (the total and the (T,) loss vector)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, weighting: Any, *, device: torch.device,
                 amp_dtype: torch.dtype | None, grad_clip: float | None, scheduler: Any,
                 extra_parameters: Sequence[nn.Parameter]):
        self.model, self.optimizer, self.weighting = model, optimizer, weighting
        self.device, self.amp_dtype, self.grad_clip, self.scheduler = device, amp_dtype, grad_clip, scheduler
        # Gradient methods in representation mode read dL_t/dh from the fused forward (no extra backward passes).
        self.per_task_input_grads = (
            bool(getattr(weighting, "requires_grads", False))
            and getattr(weighting, "mode", "representation") == "representation"
        )
        # All of them, not only those trainable now: a callback may unfreeze a backbone between epochs.
        self.clip_parameters = list(model.parameters())
        self.extra_parameters = list(extra_parameters)
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none.
        use_scaler = amp_dtype == torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None

    def __call__(self, inputs: Any, targets: Mapping[str, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.amp_dtype):
            if self.per_task_input_grads:
                out = self.model(inputs, targets, per_task_input_grads=True)
            else:
                out = self.model(inputs, targets)
        # Outside autocast: the weighting's Gram matrices and solvers must not run in half precision.
        total = out.loss if self.weighting is None else self.weighting(out)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
        else:
            total.backward()
        _ranks.average_gradients(self.extra_parameters)
        if self.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.clip_parameters, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # reads found-inf on the host: the one sync float16 needs
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return total, out.loss_vector


def fit(
    model: nn.Module,
    train_loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int = 1,
    weighting: Any = None,
    val_loader: Iterable[Any] | None = None,
    metrics: str | MetricsSpec | TaskMetrics | None = "auto",
    single_task_baselines: Mapping[str, Mapping[str, float]] | None = None,
    scheduler: Any = None,
    scheduler_interval: Literal["epoch", "step"] = "epoch",
    callbacks: Iterable[EpochCallback] = (),
    device: torch.device | str | None = None,
    progress: bool = True,
    log_every: int = 50,
    grad_clip: float | None = None,
    amp_dtype: torch.dtype | None = None,
) -> History:
    """Train a multi-task model for ``epochs`` epochs and return its :class:`~mtlfast.training.History`.

    Args:
        model: ``model(inputs, targets, *, per_task_input_grads=False)`` → ``MultiTaskOutput``, with ``.tasks``,
            ``.task_names`` and ``.predict(inputs)`` (``mf.MultiTaskHeads``, ``mtlfast.models``), possibly wrapped
            in DistributedDataParallel / torch.compile.
        train_loader: iterable of batches ``(inputs, targets)``: ``inputs`` a tensor (or a dict / list of tensors)
            of shape (B, ...), ``targets`` task name → target tensor (a task missing from the dict is skipped for
            that batch). Tensors are moved to ``device`` with ``non_blocking=True``.
        optimizer: over the model's parameters. A weighting method's learnable parameters (uncertainty
            weighting's log-variances, …) that are not in it are added as a new parameter group with the
            optimiser's defaults, with a warning; with a ``scheduler`` that is an error instead (the scheduler was
            built without that group): put them in the optimiser yourself.
        epochs: number of passes over ``train_loader``.
        weighting: ``total = weighting(out)`` (an ``mtlfast.weighting`` method or any callable); None → ``out.loss``
            (Σ λ_t L_t, the tasks' static weights). Gradient methods in ``"representation"`` mode get the forward
            called with ``per_task_input_grads=True``. Its ``end_epoch()`` (if any) runs after every epoch.
        val_loader: batches like ``train_loader``, evaluated after every epoch (``model.eval()``, no grad).
        metrics: per-task validation metrics: ``"auto"`` (by task kind: accuracy / macro-F1 / AUROC / RMSE / MAE,
            see :func:`~mtlfast.training.metrics.default_metrics`), a mapping task → {name: torchmetrics.Metric}
            (tasks not named get none), or None.
        single_task_baselines: task → metric → the single-task model's value; Δm (percent, > 0 = gain) is then
            reported every epoch. Needs ``val_loader``; directions come from the metrics' ``higher_is_better``.
        scheduler: an LR scheduler stepped once per epoch (``scheduler_interval="epoch"``; ReduceLROnPlateau gets
            the epoch's mean training total) or once per optimiser step (``"step"``).
        callbacks: objects whose ``end_epoch()`` runs after every epoch (after the weighting's and the scheduler).
        device: where to train (the model is moved there); default: where the model's parameters are.
        progress: a tqdm bar per epoch (rank 0 only) whose postfix shows the running per-task mean losses.
        log_every: steps between two host reads of the running losses (only when the bar is shown).
        grad_clip: max global gradient norm of the model's parameters (``clip_grad_norm_``), or None.
        amp_dtype: ``torch.bfloat16`` / ``torch.float16`` runs the forward under autocast (float16 on CUDA adds a
            GradScaler, whose step reads one flag on the host); the weighting runs outside autocast.

    Under DistributedDataParallel give each rank its shard of every batch (equal sizes): DDP averages the model's
    gradients, fit averages the weighting's learnable parameters' gradients, the weighting methods reduce what they
    derive from the batch, and the recorded losses are means over all ranks, so every rank returns the same History.
    """
    tasks = model_tasks(model)
    names = tuple(task.name for task in tasks)
    _check_arguments(epochs, log_every, grad_clip, scheduler, scheduler_interval, amp_dtype)
    callbacks = tuple(callbacks)
    for callback in callbacks:
        if not callable(getattr(callback, "end_epoch", None)):
            raise TypeError(f"mtlfast: callback {callback!r} has no end_epoch() method")
    if device is not None:
        device = torch.device(device)
        model.to(device)
    else:
        device = model_device(model)
    extra_parameters = _prepare_weighting(weighting, len(names), model, optimizer, scheduler, device)

    task_metrics = None if val_loader is None else build_task_metrics(tasks, metrics)
    if task_metrics is not None:
        task_metrics.to(device)
    directions = None
    if single_task_baselines is not None:
        if task_metrics is None:
            raise ValueError("mtlfast: single_task_baselines needs a val_loader and metrics to compare against")
        directions = task_metrics.higher_is_better()
        _check_baselines(single_task_baselines, task_metrics.names, directions)

    step = _TrainStep(model, optimizer, weighting, device=device, amp_dtype=amp_dtype, grad_clip=grad_clip,
                      scheduler=scheduler if scheduler_interval == "step" else None, extra_parameters=extra_parameters)
    show_bar = progress and _ranks.rank() == 0
    history = History(names)
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        meter = LossMeter(names)
        bar = _progress_bar(train_loader, epoch, epochs) if show_bar else None
        for batch in train_loader if bar is None else bar:
            inputs, targets = split_batch(batch)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            total, loss_vector = step(inputs, targets)
            meter.add(loss_vector, total, [targets.get(name) is not None for name in names])
            if bar is not None and meter.steps % log_every == 0:
                bar.set_postfix(_postfix(meter.running_means()[0]), refresh=False)
        if meter.steps == 0:
            raise ValueError("mtlfast: train_loader yielded no batch")
        train_loss, train_total = meter.epoch_means()  # the epoch's one host read of the training losses
        train_seconds = time.perf_counter() - started

        val_metrics: dict[str, dict[str, Any]] = {}
        gain = None
        if task_metrics is not None:
            values = evaluate(model, val_loader, task_metrics, device=device, amp_dtype=amp_dtype)
            val_metrics = {task: {name: _host(value) for name, value in named.items()}
                           for task, named in values.items()}
            if single_task_baselines is not None:
                gain = delta_m(val_metrics, single_task_baselines, directions)
        if bar is not None:
            bar.set_postfix(_postfix(train_loss), refresh=True)
            bar.close()

        end_epoch = getattr(weighting, "end_epoch", None)
        if callable(end_epoch):
            end_epoch()
        if scheduler is not None and scheduler_interval == "epoch":
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(train_total)
            else:
                scheduler.step()
        for callback in callbacks:
            callback.end_epoch()

        history.append(EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            train_total=train_total,
            val_metrics=val_metrics,
            delta_m=gain,
            task_weights=_task_weights(weighting, names),
            lr=_host(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else None,
            steps=meter.steps,
            epoch_time_s=time.perf_counter() - started,
            steps_per_s=meter.steps / train_seconds if train_seconds > 0 else float("inf"),
        ))
    return history


def _check_arguments(epochs: int, log_every: int, grad_clip: float | None, scheduler: Any, scheduler_interval: str,
                     amp_dtype: torch.dtype | None) -> None:
    for name, value in (("epochs", epochs), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"mtlfast: {name} must be a positive integer, got {value!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"mtlfast: grad_clip must be positive or None, got {grad_clip!r}")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"mtlfast: scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
    if scheduler_interval == "step" and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError("mtlfast: ReduceLROnPlateau steps on a metric once per epoch; use scheduler_interval='epoch'")
    if amp_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"mtlfast: amp_dtype must be torch.float16, torch.bfloat16 or None, got {amp_dtype}")


def _prepare_weighting(weighting: Any, num_tasks: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any, device: torch.device) -> list[nn.Parameter]:
    """Check the weighting, move it to ``device``, put its learnable parameters in the optimiser; returns those
    DistributedDataParallel does not reduce (the ones outside the model)."""
    if weighting is None:
        return []
    if not callable(weighting):
        raise TypeError(f"mtlfast: weighting must be callable (out → total loss), got {type(weighting).__name__}")
    expected = getattr(weighting, "num_tasks", None)
    if expected is not None and expected != num_tasks:
        raise ValueError(f"mtlfast: the weighting method was built for {expected} tasks, the model has {num_tasks}")
    if not isinstance(weighting, nn.Module):
        return []
    weighting.to(device)
    weighting.train()  # stateful methods (DWA) record the training losses only in training mode
    learnable = [p for p in weighting.parameters() if p.requires_grad]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in learnable if id(p) not in in_optimizer]
    if missing:
        if scheduler is not None:
            raise ValueError(
                f"mtlfast: {type(weighting).__name__} has {len(missing)} learnable parameter(s) that are not in the "
                "optimizer, and the scheduler was built without them: create the optimizer over "
                "[*model.parameters(), *weighting.parameters()] (or give them their own parameter group)"
            )
        warnings.warn(
            f"mtlfast: fit added {type(weighting).__name__}'s {len(missing)} learnable parameter(s) to the optimizer "
            "as a new parameter group with its default hyper-parameters; add them yourself to choose their "
            "learning rate",
            UserWarning,
            stacklevel=3,
        )
        optimizer.add_param_group({"params": missing})
    in_model = {id(p) for p in model.parameters()}
    return [p for p in learnable if id(p) not in in_model]


def _check_baselines(baselines: Mapping[str, Mapping[str, float]], available: Mapping[str, Sequence[str]],
                     directions: Mapping[str, Mapping[str, bool | None]]) -> None:
    if not isinstance(baselines, Mapping) or not baselines:
        raise ValueError("mtlfast: single_task_baselines must be a non-empty mapping task → {metric: value}")
    for task, named in baselines.items():
        if task not in available:
            raise ValueError(f"mtlfast: single_task_baselines names task {task!r}, which has no validation metric; "
                             f"tasks with metrics: {sorted(available)}")
        for metric in named:
            if metric not in available[task]:
                raise ValueError(f"mtlfast: single_task_baselines names metric {metric!r} of task {task!r}; "
                                 f"its metrics are {list(available[task])}")
            metric_direction(task, metric, directions)  # raises when the direction is unknown


def _progress_bar(loader: Iterable[Any], epoch: int, epochs: int):
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError("mtlfast: the progress bar needs tqdm (pip install tqdm), or pass progress=False") from error
    return tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=True, dynamic_ncols=True)


def _postfix(losses: Mapping[str, float]) -> dict[str, str]:
    return {name: f"{value:.4g}" for name, value in losses.items()}


def _host(value: Any) -> Any:
    """A tensor as a Python number (or nested list); anything else unchanged. Epoch-end use only."""
    return value.detach().tolist() if isinstance(value, torch.Tensor) else value


def _task_weights(weighting: Any, names: Sequence[str]) -> dict[str, float] | None:
    weights = getattr(weighting, "task_weights", None)
    if not isinstance(weights, torch.Tensor) or weights.numel() != len(names):
        return None
    return dict(zip(names, weights.detach().reshape(-1).tolist()))


__all__ = ["EpochCallback", "fit"]
