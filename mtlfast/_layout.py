"""The static description of a group of tasks packed into one fused op call.

Everything here is plain Python ints/floats/strings (they become the op's int[]/float[]/str[] arguments, constant
under torch.compile) plus two small per-device tensors cached so a training step never rebuilds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtlfast.tasks import Task


class TaskLayout:
    """Column layout of tasks packed row-wise into one (S, D) head weight, S = Σ num_outputs."""

    def __init__(self, tasks: Sequence[Task]):
        if not tasks:
            raise ValueError("mtlfast: at least one task is required")
        names = [task.name for task in tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"mtlfast: duplicate task names {duplicates}")
        self.tasks: tuple[Task, ...] = tuple(tasks)
        self.names: tuple[str, ...] = tuple(names)
        self.kinds: tuple[int, ...] = tuple(int(task.kind) for task in tasks)
        offsets = [0]
        for task in tasks:
            offsets.append(offsets[-1] + task.num_outputs)
        self.col_offsets: tuple[int, ...] = tuple(offsets)
        self.ignore_index: tuple[int, ...] = tuple(task.ignored_class for task in tasks)
        self.params: tuple[float, ...] = tuple(task.param for task in tasks)
        self.index: dict[str, int] = {name: i for i, name in enumerate(names)}
        # 1 where a task's target has a trailing (num_outputs,) dim after the batch dims: the op's class_dims.
        self.class_dims: tuple[int, ...] = tuple(int(task.target_has_class_dim) for task in tasks)
        self._device_cache: dict[tuple, torch.Tensor] = {}
        self._task_spec = None
        self._task_spec_made = False
        # Computed eagerly: a cached_property takes a lock that torch.compile cannot trace.
        self._column_weights_cpu = self._pack_column_weights()

    def __getstate__(self) -> dict:
        # The extension's TaskSpec is a cache and cannot be pickled: copies and unpickled layouts make their own.
        state = self.__dict__.copy()
        state["_task_spec"], state["_task_spec_made"] = None, False
        return state

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_columns(self) -> int:
        return self.col_offsets[-1]

    def columns(self, task: int) -> slice:
        return slice(self.col_offsets[task], self.col_offsets[task + 1])

    def _pack_column_weights(self) -> torch.Tensor | None:
        per_task = [task.column_weights() for task in self.tasks]
        if all(w is None for w in per_task):
            return None
        return torch.cat(
            [w if w is not None else torch.ones(task.num_outputs, dtype=torch.float64) for w, task in zip(per_task, self.tasks)]
        )

    def col_task_cpu(self) -> torch.Tensor:
        widths = torch.tensor([t.num_outputs for t in self.tasks])
        return torch.repeat_interleave(torch.arange(self.num_tasks), widths)

    def col_weight_cpu(self) -> torch.Tensor | None:
        return None if self._column_weights_cpu is None else self._column_weights_cpu.clone()

    def _cached(self, key: tuple, make) -> torch.Tensor:
        # Per-device copies are made once, outside any compiled region: while torch.compile traces, tensors made
        # here would be fake, so they are rebuilt in the graph (small constants) instead of being cached.
        if torch.compiler.is_compiling():
            return make()
        cached = self._device_cache.get(key)
        if cached is None:
            cached = self._device_cache[key] = make()
        return cached

    def col_task(self, device: torch.device) -> torch.Tensor:
        """(S,) int64: the task owning each column."""
        return self._cached(("col_task", device), lambda: self.col_task_cpu().to(device))

    def col_weight(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """(S,) class weights / pos_weight per column in the accumulation dtype, or None when all are uniform."""
        if self._column_weights_cpu is None:
            return None
        return self._cached(("col_weight", device, dtype), lambda: self._column_weights_cpu.to(device=device, dtype=dtype))

    def task_spec(self):
        """The op's list arguments as one ``mtlfast._C.TaskSpec`` for the C++ eager path (made on first use; None
        without the extension)."""
        if not self._task_spec_made:
            from mtlfast.ops import task_spec  # noqa: PLC0415  (mtlfast.ops is imported after this module)

            self._task_spec = task_spec(
                self.kinds, self.col_offsets, self.class_dims, self.ignore_index, self.params, self.names
            )
            self._task_spec_made = True
        return self._task_spec

    def default_task_weights(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(T,) the tasks' own ``weight`` values as λ."""
        weights = [task.weight for task in self.tasks]
        return self._cached(("task_weights", device, dtype), lambda: torch.tensor(weights, dtype=dtype, device=device))

    def __repr__(self) -> str:
        return f"TaskLayout({', '.join(f'{n}:{t.num_outputs}' for n, t in zip(self.names, self.tasks))})"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (fp32 accumulation of half types)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
