"""A trainable table in host RAM: the rows stay off the compute device while training.

The weight is a CPU `nn.Parameter` (pinned when CUDA is present) that `model.to(device)`
leaves where it is. A lookup gathers each distinct row once on the host (a sparse
embedding lookup, so the backward pass yields a sparse row gradient on the host) and
uploads the rows with the one pinned, non_blocking idiom; autograd brings the row
gradients back to the host. The table's optimizer (sparse-row Adam, role "table") then
runs on the host with its moments beside the rows, touching only the rows read.
On CPU this is the device table's computation exactly (tested: identical losses).

`HostTableStepper` overlaps that host step with other work: the training loop hands the
table optimizer's step (and its zero_grad) to a worker thread right after the gradients are
final, steps the dense optimizers meanwhile, and starts the next step (batch sampling,
hashing, the embedding, the blocks before the first Engram layer); each host table waits
for the step before its next lookup, and a checkpoint waits before it reads the rows. The
learning rate of the step is fixed when it is handed over, so the schedule cannot race
it. Only rows read after the update are ever used: the losses stay identical (tested).

Shape legend: U distinct rows of this call, D row width.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from engram_lm.memory.host import upload
from engram_lm.memory.prefetch import single_threaded_worker
from engram_lm.memory.table import MemoryTable


STEP_TIMEOUT_S = 600.0


class HostTrainableTable(MemoryTable):
    tier = "ram-trainable"

    def __init__(self, weight: torch.Tensor, device: torch.device | str = "cpu", *, dedup: bool | None = None) -> None:
        """dedup: gather each distinct row once before the upload (default: when the compute
        device is not the host; on CPU the plain lookup is the device table's, bit for bit)."""
        super().__init__()
        self.device = torch.device(device)
        self.dedup = dedup
        host = weight.detach().to("cpu").clone()
        if torch.cuda.is_available():
            host = host.pin_memory()
        self.weight = nn.Parameter(host)  # the same name as DenseTable's: checkpoints are interchangeable
        self.num_rows, self.dim = host.shape
        self.pending_update: Future | None = None  # the table optimizer's step, running on a worker

    def _apply(self, fn, recurse=True):
        """Keep the rows on the host when the model moves; follow the compute device only."""
        probe = fn(torch.empty(0))
        if probe.device.type != "meta":
            self.device = probe.device
        return self

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        self.check_rows(rows)
        pending, self.pending_update = self.pending_update, None
        if pending is not None:  # rows are read only after the last update has landed
            pending.result(timeout=STEP_TIMEOUT_S)
        if not (self.dedup if self.dedup is not None else self.device.type != "cpu"):
            return F.embedding(rows, self.weight, sparse=True)
        unique_U, inverse = torch.unique(rows.reshape(-1).cpu(), return_inverse=True)
        rows_UD = F.embedding(unique_U, self.weight, sparse=True)  # each distinct row read once
        return upload(rows_UD, self.device).index_select(0, inverse.to(self.device)).view(*rows.shape, self.dim)

    def placement(self) -> dict:
        return {"tier": self.tier, "rows": self.num_rows, "dim": self.dim, "trainable": True, "where": "host RAM",
                "bytes": self.weight.numel() * self.weight.element_size()}  # fmt: skip


def tables_to_host(model: nn.Module, device: torch.device | str) -> int:
    """Replace every Engram DenseTable of `model` by a HostTrainableTable; returns how many."""
    from engram_lm.memory.dense import DenseTable

    count = 0
    for block in getattr(model, "blocks", []):
        engram = getattr(block, "engram", None)
        if engram is not None and isinstance(engram.memory, DenseTable):
            engram.memory = HostTrainableTable(engram.memory.weight, device=device)
            count += 1
    return count


class HostTableStepper:
    """Runs the table optimizer's step on a worker thread, overlapped with the dense
    optimizers' steps and the start of the next forward. `for_model` returns None unless
    every parameter of the table optimizer is a host table's weight."""

    def __init__(self, optimizer: torch.optim.Optimizer, tables: list[HostTrainableTable]) -> None:
        self.optimizer, self.tables = optimizer, tables
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-table-step",
                                            initializer=single_threaded_worker)  # fmt: skip
        self._future: Future | None = None

    @classmethod
    def for_model(cls, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> HostTableStepper | None:
        optimizer = optimizers.get("table")
        tables = [m for m in model.modules() if isinstance(m, HostTrainableTable)]
        if optimizer is None or not tables:
            return None
        host = {id(t.weight) for t in tables}
        if any(id(p) not in host for g in optimizer.param_groups for p in g["params"]):
            return None  # a device-resident table (OverEncoding) shares the optimizer: step it in place
        return cls(optimizer, tables)

    def others(self, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, torch.optim.Optimizer]:
        """The optimizers the caller still steps (and schedules) itself: all but this one."""
        return {k: o for k, o in optimizers.items() if o is not self.optimizer}

    def launch(self, lr_multiplier: float) -> None:
        """Start the step at this step's learning rate; the tables wait for it on their next lookup."""
        self.wait()

        def step() -> None:
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_multiplier
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        self._future = self._executor.submit(step)
        for table in self.tables:
            table.pending_update = self._future

    def _take(self) -> Future | None:
        future, self._future = self._future, None
        for table in self.tables:
            table.pending_update = None
        return future

    def wait(self) -> None:
        """Until the last step has landed (before a checkpoint, at the end); re-raises its error."""
        future = self._take()
        if future is not None:
            future.result(timeout=STEP_TIMEOUT_S)

    def close(self) -> None:
        """Stop the worker. Errors surface in `wait` and in the next lookup, not here (the
        training loop waits at its last checkpoint)."""
        self._take()
        self._executor.shutdown(wait=True)
