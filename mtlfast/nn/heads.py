"""MultiTaskHeads: every task head of a model, and every task loss, in one fused op per input."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtlfast._layout import TaskLayout, accumulation_dtype
from mtlfast.functional import Present, Targets, fused_multi_task_loss
from mtlfast.tasks import DEFAULT_INPUT, Task


class _LazySplit(Mapping[str, torch.Tensor]):
    """name → per-task tensor, split from one packed tensor only when read (no per-task work in the step)."""

    def __init__(self, packed: torch.Tensor, names: Sequence[str], split: Any):
        self._packed, self._names, self._split, self._parts = packed, tuple(names), split, None

    def _materialise(self) -> dict[str, torch.Tensor]:
        if self._parts is None:
            self._parts = dict(zip(self._names, self._split(self._packed)))
        return self._parts

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._materialise()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"{{{', '.join(self._names)}}}"


class MultiTaskOutput:
    """What :meth:`MultiTaskHeads.forward` returns.

    Attributes:
        loss: Σ λ_t·L_t over the tasks present in the batch, a scalar tensor.
        loss_vector: (T,) per-task losses in ``heads.task_names`` order (0 for absent tasks).
        losses: name → scalar loss tensor, only for tasks present in the batch (differentiable, no host sync).
        logits: name → logits, when requested.
        input_grads: name → dL_t/dh (unweighted, same shape as that task's input), when requested.

    :meth:`input_gram` gives the (T, T) Gram matrix of those gradients, what gradient-balancing methods consume.
    """

    def __init__(self, loss, loss_vector, names: Sequence[str], present: Present | Sequence[bool], logits=None,
                 input_grads=None, input_grad_groups=None):
        self.loss = loss
        self.loss_vector = loss_vector
        if present is None or all(present):
            self.losses: Mapping[str, torch.Tensor] = _LazySplit(loss_vector, names, torch.unbind)
        else:
            rows = [i for i, here in enumerate(present) if here]
            self.losses = _LazySplit(loss_vector, [names[i] for i in rows], lambda v: [v[i] for i in rows])
        self.logits = logits
        self.input_grads = input_grads
        self._input_grad_groups = input_grad_groups

    def input_gram(self) -> torch.Tensor:
        """(T, T) matrix of <dL_s/dh, dL_t/dh> over the whole batch, in task order (float32, float64 for float64
        inputs). Tasks reading different inputs have independent gradients (0 off-diagonal)."""
        if self._input_grad_groups is None:
            raise ValueError("mtlfast: input_gram() needs the forward call to pass per_task_input_grads=True")
        num_tasks = self.loss_vector.shape[0]
        gram = None
        for task_index, grads in self._input_grad_groups:
            flat = grads.flatten(1)
            flat = flat if flat.dtype == torch.float64 else flat.float()
            block = flat @ flat.T
            if task_index is None:  # one group holding every task in order
                return block
            if gram is None:
                gram = block.new_zeros(num_tasks, num_tasks)
            gram = gram.index_put((task_index.unsqueeze(1), task_index.unsqueeze(0)), block)
        return gram

    def __repr__(self) -> str:
        return f"MultiTaskOutput(loss={self.loss!r}, tasks={list(self.losses)})"


class _PackedHeads(nn.Module):
    """One input's task heads packed row-wise: weight (S, D), bias (S,)."""

    def __init__(self, layout: TaskLayout, in_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.layout = layout
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(layout.num_columns, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(layout.num_columns, device=device, dtype=dtype)) if bias else None
        # The layout's per-column tables as buffers: they follow .to(device) and are graph inputs under compile.
        self.register_buffer("col_task", layout.col_task_cpu().to(device), persistent=False)
        col_weight = layout.col_weight_cpu()
        self.register_buffer("col_weight", None if col_weight is None else col_weight.to(device), persistent=False)

    @torch.no_grad()
    def reset_task(self, task: int) -> None:
        # The bounds of nn.Linear(D, C_t): kaiming_uniform(a=√5) = U(±1/√D) for the weight, U(±1/√D) for the bias.
        rows = self.layout.columns(task)
        nn.init.kaiming_uniform_(self.weight[rows], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            self.bias[rows].uniform_(-bound, bound)


class MultiTaskHeads(nn.Module):
    """Drop-in task heads: ``nn.ModuleDict({name: nn.Linear(D, C_t)})`` plus every loss, fused.

    Args:
        in_features: D, or a mapping input name → D when tasks read different representations
            (``Classification("ner", 9, input="tokens")``).
        tasks: the task specs; their ``weight`` gives the initial λ (``heads.task_weights``, a (T,) buffer you may
            replace with a learnable ``nn.Parameter`` or update in place).
        bias: whether heads have a bias.
        chunk_rows: rows per chunk for large heads ("auto", an int, or None to never chunk).
        recompute_logits: for large heads, recompute the logits in the backward (least memory, one more GEMM);
            None: on CUDA yes, on the CPU no (see :func:`mtlfast.functional.multi_task_loss`).

    ``state_dict()`` has exactly the keys and shapes of the ModuleDict of Linear layers (``"topic.weight"``,
    ``"topic.bias"``, …) and ``load_state_dict`` accepts one. Internally each input's heads are one (S, D) parameter.
    """

    def __init__(
        self,
        in_features: int | Mapping[str, int],
        tasks: Sequence[Task],
        *,
        bias: bool = True,
        chunk_rows: int | str | None = "auto",
        recompute_logits: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        tasks = list(tasks)
        TaskLayout(tasks)  # validates names once for the whole set
        inputs = list(dict.fromkeys(task.input for task in tasks))
        if isinstance(in_features, Mapping):
            missing = [name for name in inputs if name not in in_features]
            if missing:
                raise ValueError(f"mtlfast: in_features has no size for inputs {missing}")
            sizes = dict(in_features)
        else:
            sizes = {name: int(in_features) for name in inputs}
        self.inputs: tuple[str, ...] = tuple(inputs)
        self.tasks: tuple[Task, ...] = tuple(tasks)
        self.task_names: tuple[str, ...] = tuple(task.name for task in tasks)
        self.packed = nn.ModuleDict()
        # Each input's tasks keep their relative order; group_tasks[input] are their indices in self.tasks.
        group_tasks: dict[str, list[int]] = {}
        for name in inputs:
            members = [i for i, task in enumerate(tasks) if task.input == name]
            group_tasks[name] = members
            layout = TaskLayout([tasks[i] for i in members])
            self.packed[name] = _PackedHeads(layout, sizes[name], bias, device=device, dtype=dtype)
            self.packed[name].register_buffer("task_index", torch.tensor(members, device=device), persistent=False)
        grouped_order = [i for name in inputs for i in group_tasks[name]]
        # Losses come out group by group; this index puts them back in the order the tasks were given.
        restore = [grouped_order.index(i) for i in range(len(tasks))]
        self.register_buffer(
            "_restore_order", None if restore == list(range(len(tasks))) else torch.tensor(restore, device=device),
            persistent=False,
        )
        self._single_group = len(self.packed) == 1
        self.chunk_rows = chunk_rows
        self.recompute_logits = recompute_logits
        lam_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.register_buffer(
            "task_weights", torch.tensor([task.weight for task in tasks], dtype=lam_dtype, device=device),
            persistent=False,
        )
        self.reset_parameters()
        self.register_state_dict_post_hook(_per_task_state_dict)
        self.register_load_state_dict_pre_hook(_packed_state_dict)

    def reset_parameters(self) -> None:
        """Initialise every head as nn.Linear does, task by task in the given order, so a seeded model starts from
        the same values as the equivalent ``nn.ModuleDict`` of ``nn.Linear`` layers."""
        for task in self.tasks:
            group, t = self._locate(task.name)
            group.reset_task(t)

    # -- construction from existing heads ------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, heads: Mapping[str, nn.Linear], tasks: Sequence[Task], **kwargs: Any) -> MultiTaskHeads:
        """Convert ``{name: nn.Linear}`` (e.g. an ``nn.ModuleDict``) into fused heads with the same weights."""
        for task in tasks:
            if task.name not in heads:
                raise KeyError(f"mtlfast: task '{task.name}' has no head in the given modules")
            layer = heads[task.name]
            if layer.out_features != task.num_outputs:
                raise ValueError(
                    f"mtlfast: task '{task.name}': head has {layer.out_features} outputs, the task needs {task.num_outputs}"
                )
        first = heads[tasks[0].name]
        sizes = {task.input: heads[task.name].in_features for task in tasks}
        has_bias = all(heads[task.name].bias is not None for task in tasks)
        module = cls(sizes, tasks, bias=has_bias, device=first.weight.device, dtype=first.weight.dtype, **kwargs)
        module.load_state_dict({k: v for task in tasks for k, v in _linear_items(task.name, heads[task.name], has_bias)})
        return module

    # -- accessors -----------------------------------------------------------------------------------------------
    def head_weight(self, name: str) -> torch.Tensor:
        """(C_t, D) view of task ``name``'s weight inside the packed parameter."""
        group, t = self._locate(name)
        return group.weight[group.layout.columns(t)]

    def head_bias(self, name: str) -> torch.Tensor | None:
        group, t = self._locate(name)
        return None if group.bias is None else group.bias[group.layout.columns(t)]

    def _locate(self, name: str) -> tuple[_PackedHeads, int]:
        for group in self.packed.values():
            if name in group.layout.index:
                return group, group.layout.index[name]
        raise KeyError(f"mtlfast: no task named {name!r}; tasks are {list(self.task_names)}")

    def _inputs_of(self, h: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(h, torch.Tensor):
            if len(self.inputs) != 1:
                raise ValueError(f"mtlfast: tasks read several inputs {list(self.inputs)}; pass h as a dict")
            return {self.inputs[0]: h}
        missing = [name for name in self.inputs if name not in h]
        if missing:
            raise KeyError(f"mtlfast: no representation given for inputs {missing}")
        return {name: h[name] for name in self.inputs}

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        h: torch.Tensor | Mapping[str, torch.Tensor],
        targets: Targets,
        *,
        return_logits: bool = False,
        per_task_input_grads: bool = False,
    ) -> MultiTaskOutput:
        """Losses of every task with a target in ``targets`` (a mapping by task name; absent tasks are skipped).

        ``h`` is (..., D) or a mapping input name → (..., D_input); targets follow the batch shape of their input.
        """
        if self._single_group:  # the common case, kept free of per-task Python work
            if not isinstance(targets, Mapping):
                raise TypeError("mtlfast: MultiTaskHeads targets must be a mapping task name → tensor")
            input_name = self.inputs[0]
            group = self.packed[input_name]
            x = h if isinstance(h, torch.Tensor) else self._inputs_of(h)[input_name]
            # The group's tasks are all tasks, in order: the targets mapping goes down as given (unknown names and
            # missing targets are reported there, with the same messages as _present_tasks).
            out, present = self._group_loss(group, x, targets, self.task_weights, return_logits, per_task_input_grads)
            return MultiTaskOutput(
                out.total, out.losses, self.task_names, present,
                logits=_split_columns(out.logits, group.layout) if return_logits else None,
                input_grads=dict(zip(self.task_names, out.input_grads.unbind(0))) if per_task_input_grads else None,
                input_grad_groups=[(None, out.input_grads)] if per_task_input_grads else None,
            )
        given, present = self._present_tasks(targets)
        representations = self._inputs_of(h)
        by_name = dict(zip(self.task_names, given))
        totals, loss_vectors, logits, input_grads, grad_groups = [], [], {}, {}, []
        for input_name, group in self.packed.items():
            layout = group.layout
            x = representations[input_name]
            group_targets = [by_name[name] for name in layout.names]
            if all(t is None for t in group_targets):
                loss_vectors.append(torch.zeros(layout.num_tasks, dtype=accumulation_dtype(x.dtype), device=x.device))
                continue
            lam = self.task_weights.index_select(0, group.task_index)
            out, _ = self._group_loss(group, x, group_targets, lam, return_logits, per_task_input_grads)
            totals.append(out.total)
            loss_vectors.append(out.losses)
            if return_logits:
                logits.update(_split_columns(out.logits, layout))
            if per_task_input_grads:
                input_grads.update(zip(layout.names, out.input_grads.unbind(0)))
                grad_groups.append((group.task_index, out.input_grads))
        loss_vector = torch.cat(loss_vectors)
        if self._restore_order is not None:
            loss_vector = loss_vector.index_select(0, self._restore_order)
        return MultiTaskOutput(
            torch.stack(totals).sum(), loss_vector, self.task_names, present,
            logits=logits if return_logits else None,
            input_grads=input_grads if per_task_input_grads else None,
            input_grad_groups=grad_groups if per_task_input_grads else None,
        )

    def _group_loss(self, group: _PackedHeads, x: torch.Tensor, targets: Targets, task_weights: torch.Tensor,
                    return_logits: bool, per_task_input_grads: bool):
        return fused_multi_task_loss(
            x, group.weight, group.bias, targets, group.layout, task_weights,
            return_logits=return_logits, per_task_input_grads=per_task_input_grads, chunk_rows=self.chunk_rows,
            recompute_logits=self.recompute_logits, _tables=(group.col_task, group.col_weight),
        )

    def _present_tasks(self, targets: Targets) -> tuple[list, list[bool]]:
        """Every task's target (None when absent) and whether it has one, in task order, after checking that
        ``targets`` names only known tasks."""
        if not isinstance(targets, Mapping):
            raise TypeError("mtlfast: MultiTaskHeads targets must be a mapping task name → tensor")
        given = [targets.get(name) for name in self.task_names]
        present = [target is not None for target in given]
        if len(targets) != sum(present):  # some key is not a task, or maps to None
            unknown = sorted(set(targets) - set(self.task_names))
            if unknown:
                raise KeyError(f"mtlfast: targets given for unknown tasks {unknown}; tasks are {list(self.task_names)}")
        if not any(present):
            raise ValueError(f"mtlfast: no targets given for any task of {list(self.task_names)}")
        return given, present

    @torch.no_grad()
    def predict(self, h: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """name → logits: (..., C) for multi-output tasks, (...) for Binary and Regression(dim=1)."""
        return self.logits(h)

    def logits(self, h: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Differentiable logits of every head (one GEMM per input), split per task as in :meth:`predict`."""
        representations = self._inputs_of(h)
        result: dict[str, torch.Tensor] = {}
        for input_name, group in self.packed.items():
            packed = nn.functional.linear(representations[input_name], group.weight, group.bias)
            result.update(_split_columns(packed, group.layout))
        return {name: result[name] for name in self.task_names}

    def extra_repr(self) -> str:
        groups = ", ".join(f"{name}: D={g.in_features} {g.layout!r}" for name, g in self.packed.items())
        return f"{groups}, bias={next(iter(self.packed.values())).bias is not None}"


def _split_columns(packed: torch.Tensor, layout: TaskLayout) -> dict[str, torch.Tensor]:
    parts = torch.split(packed, [task.num_outputs for task in layout.tasks], dim=-1)
    return {
        task.name: part if task.target_has_class_dim or task.target_is_index else part.squeeze(-1)
        for task, part in zip(layout.tasks, parts)
    }


def _linear_items(name: str, layer: nn.Linear, with_bias: bool):
    yield f"{name}.weight", layer.weight
    if with_bias:
        yield f"{name}.bias", layer.bias


def _per_task_state_dict(module: MultiTaskHeads, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    packed = {}
    for input_name in module.packed:
        key = f"{prefix}packed.{input_name}."
        packed[input_name] = (state_dict.pop(key + "weight"), state_dict.pop(key + "bias", None))
    for task in module.tasks:  # the given task order, as a ModuleDict of Linear layers would list them
        group = module.packed[task.input]
        weight, bias = packed[task.input]
        rows = group.layout.columns(group.layout.index[task.name])
        state_dict[f"{prefix}{task.name}.weight"] = weight[rows]
        if bias is not None:
            state_dict[f"{prefix}{task.name}.bias"] = bias[rows]


def _packed_state_dict(module: MultiTaskHeads, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    # Heads absent from the checkpoint keep their current values and are reported under their public names
    # ("spam.weight"), so strict loading names them and non-strict (partial, e.g. transfer) loading still works.
    for input_name, group in module.packed.items():
        for part in ("weight", "bias"):
            current = getattr(group, part)
            if current is None:
                continue
            pieces = []
            for t, name in enumerate(group.layout.names):
                key = f"{prefix}{name}.{part}"
                expected = current[group.layout.columns(t)].shape
                if key in state_dict and state_dict[key].shape != expected:
                    error_msgs.append(
                        f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)} from "
                        f"checkpoint, the shape in current model is {tuple(expected)}."
                    )
                    state_dict.pop(key)
                    pieces.append(current.detach()[group.layout.columns(t)])
                elif key in state_dict:
                    pieces.append(state_dict.pop(key))
                else:
                    missing_keys.append(key)
                    pieces.append(current.detach()[group.layout.columns(t)])
            state_dict[f"{prefix}packed.{input_name}.{part}"] = torch.cat(pieces)
