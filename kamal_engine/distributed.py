"""One recipe on several processes: distributed data parallel (README, "Several GPUs or processes").

``kamal run RECIPE --nproc N`` (and the app's "all N GPUs") run :func:`run_recipe
<kamal_engine.runner.run_recipe>` with ``nproc=N``: the calling process becomes rank 0 and starts
ranks 1..N-1 (:func:`start_ranks`), each a ``python -m kamal_engine.rank_worker`` process that gets
the recipe on its standard input. ``torchrun --nproc-per-node N -m kamal_engine.cli run RECIPE``
starts the same ranks itself (on one node or across nodes with its rendezvous); the runner joins
the process group from torchrun's environment (:func:`join`).

What each rank does (:class:`World`):

* every rank loads the same inputs and runs the same pipeline; the teachers are never wrapped (they
  are frozen and have no trainable parameters);
* each epoch's order is drawn once from the phase's generator, the same on every rank, and split
  by :class:`~torch.utils.data.DistributedSampler`; a rank's step takes ``ceil(batch_size / N)``
  images, so one step sees the recipe's ``batch_size`` across the ranks and the learning rate means
  what it means in one process (:meth:`World.batches`);
* a phase's trainable modules (a student block with its filters, the TargetNet, the student) are
  wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` for its steps
  (:meth:`World.objective`): the gradients are averaged across the ranks in the backward pass, and
  the buffers (batch-norm statistics) are rank 0's;
* a data-free method (``dafl``, ``dual-gan``) draws its latent codes per rank (:meth:`RunContext.rank_draw
  <kamal_engine.methods.common.RunContext.rank_draw>`), so each rank generates its own share of a
  step's images; its generator is wrapped as the student's parts are;
* the logged losses of every step are averaged (:meth:`World.average`), passes over the whole set
  (filtered-ka's converged losses) split by rank and summed (:meth:`World.share`, :meth:`World.sum`);
* only rank 0 reads the checkpoint (``--resume``; the others get its state) and writes (checkpoints,
  ``metrics.csv``, events, ``report.json``, the student, the ONNX file) and evaluates on the
  validation set; the other ranks write nothing at all, on this machine or another.

NCCL on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``), gloo on the CPU (the CPU's cores shared out
among the ranks of a node).
"""

from __future__ import annotations

import math
import os
import pickle
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .errors import KamalError

TIMEOUT = timedelta(minutes=30)  # a rank waiting this long for the others (rank 0 evaluating, exporting) fails


def batch_count(n: int, batch_size: int) -> int:
    """Batches of ``batch_size`` in an epoch of ``n`` images, a last one of fewer than 2 dropped."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


@dataclass(frozen=True)
class World:
    """The processes of one run and this one's place among them (``backend`` empty: one process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def distributed(self) -> bool:
        return bool(self.backend)

    @property
    def main(self) -> bool:
        """Rank 0, the one that writes and evaluates."""
        return self.rank == 0

    def local_batch(self, batch_size: int) -> int:
        """Images per step on this rank: ``ceil(batch_size / size)``, at least 2 (batch norm in train mode)."""
        return max(2, math.ceil(batch_size / self.size))

    def batches(self, n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """This rank's index batches of one epoch over ``n`` images: the epoch's shuffle is seeded from
        ``generator`` (the same draw on every rank) and split by ``DistributedSampler`` (which pads so
        every rank has as many); a last batch of fewer than 2 images is dropped on every rank alike."""
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        sampler = DistributedSampler(range(n), num_replicas=self.size, rank=self.rank, shuffle=True, seed=seed)
        order = torch.tensor(list(sampler), dtype=torch.long)
        local = self.local_batch(batch_size)
        for start in range(0, len(order), local):
            idx = order[start:start + local]
            if len(idx) >= 2:
                yield idx

    def steps_per_epoch(self, n: int, batch_size: int) -> int:
        """The number of batches :meth:`batches` gives (the same on every rank)."""
        return batch_count(math.ceil(n / self.size), self.local_batch(batch_size))

    def share(self, n: int) -> range:
        """This rank's contiguous part of ``range(n)``, for passes over the whole set (:meth:`sum` after)."""
        per = math.ceil(n / self.size)
        return range(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (a CPU tensor back; one process: itself)."""
        if not self.distributed:
            return tensor
        work = tensor.detach().to(self.device(), torch.float64)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.cpu().to(tensor.dtype)

    def average(self, values: dict) -> dict:
        """A step's logged values (floats or 0-d tensors) averaged over the ranks (every rank logs the
        same keys), as 0-d tensors."""
        if not self.distributed:
            return values
        keys = sorted(values)
        vector = torch.stack([torch.as_tensor(values[k]).detach().to(self.device(), torch.float64).reshape(())
                              for k in keys])
        dist.all_reduce(vector, op=dist.ReduceOp.SUM)  # stays on the device: the step loop syncs (StepLoop)
        return {k: v / self.size for k, v in zip(keys, vector)}

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def device(self) -> torch.device:
        """Where the collectives' tensors live: this rank's GPU with NCCL, the CPU with gloo."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def objective(self, trainable: Sequence[nn.Module], loss: Callable, find_unused: bool = False):
        """``loss(idx) -> (value, logged)`` as a step function whose backward pass averages the gradients of
        ``trainable``'s parameters over the ranks: the modules in one :class:`Objective` wrapped in
        ``DistributedDataParallel`` (rank 0's weights and buffers are broadcast to the others at the start).
        ``find_unused``: some parameters may get no gradient in a step (DDP then looks for them after each
        forward pass and reduces a zero gradient for them). One process: ``loss`` itself."""
        if not self.distributed:
            return loss
        module = Objective(trainable, loss)
        on_gpu = self.backend == "nccl"
        return DistributedDataParallel(module, device_ids=[self.local_rank] if on_gpu else None,
                                       output_device=self.local_rank if on_gpu else None,  # buffers: rank 0's
                                       find_unused_parameters=find_unused)

    def settle(self, modules: Sequence[nn.Module]) -> None:
        """After a phase: every rank gets rank 0's weights and buffers of ``modules`` (batch-norm statistics
        drift apart in the last step, whose forward pass each rank took on its own images)."""
        if not self.distributed:
            return
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.is_floating_point() or tensor.dtype == torch.long:
                    data = tensor.data.to(self.device())
                    dist.broadcast(data, src=0)
                    tensor.data.copy_(data.to(tensor.device))


class Objective(nn.Module):
    """A phase's trainable modules, registered in one module, whose forward is the phase's step loss:
    what :meth:`World.objective` wraps in ``DistributedDataParallel``. The loss uses the very same
    module objects, so their parameters are the ones DDP reduces; nothing else is registered."""

    def __init__(self, trainable: Sequence[nn.Module], loss: Callable):
        super().__init__()
        self.parts = nn.ModuleList(trainable)
        self._loss = loss

    def forward(self, idx: torch.Tensor):
        return self._loss(idx)


SINGLE = World()


def current() -> World:
    """This process's world: the initialised process group, or one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())


def wants_cuda(device_request: str) -> bool:
    return device_request != "cpu" and torch.cuda.is_available()


def join(device_request: str) -> World:
    """Join the process group the environment describes (``WORLD_SIZE`` > 1, as torchrun and
    :func:`start_ranks` set it): NCCL when the run is on CUDA, gloo on the CPU; one process otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise KamalError("this PyTorch build has no torch.distributed; run without --nproc")
    cuda = wants_cuda(device_request)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:  # the node's cores shared out among its ranks (torch would give each rank all of them)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        _threads.append(torch.get_num_threads())  # given back by leave()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return current()


_threads: list[int] = []  # this process's thread count before join() shared the cores out


def leave() -> None:
    """Leave the process group (if any) and give the process its threads back."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _threads:
        torch.set_num_threads(_threads.pop())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """Ranks 1..N-1 of a run started from this process (rank 0): :func:`start_ranks`."""

    def __init__(self, procs: list[subprocess.Popen], saved_env: dict[str, str | None]):
        self.procs, self.saved_env = procs, saved_env

    def finish(self, ok: bool, grace: float = 30.0) -> list[int | None]:
        """Wait for the other ranks (they end after the last collective); when rank 0 failed or was
        cancelled they are stopped (they write nothing). This process's environment is restored."""
        codes = []
        for proc in self.procs:
            if not ok and proc.poll() is None:
                proc.terminate()
            try:
                codes.append(proc.wait(grace if ok else 10))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return codes


ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def worker_command(parent: int) -> list[str]:
    """The command of a rank > 0: ``python -m kamal_engine.rank_worker PARENT``; in the bundle (no Python
    there) its ``kamal`` program with the same words after it (``packaging/entry-kamal.py``)."""
    if getattr(sys, "frozen", False):
        return [str(Path(sys.executable).resolve().parent / "kamal"), "-m", "kamal_engine.rank_worker", str(parent)]
    return [sys.executable, "-m", "kamal_engine.rank_worker", str(parent)]


def start_ranks(nproc: int, payload: dict[str, Any], device_request: str) -> Ranks:
    """Start ranks 1..``nproc``-1 on this machine, each a worker process given ``payload`` (the recipe and
    the run's options) on its standard input, and make this process rank 0 of the group (its environment
    set as torchrun would; :func:`join` then initialises the group). CUDA runs need ``nproc`` GPUs."""
    if nproc < 1:
        raise KamalError(f"--nproc must be 1 or more (got {nproc})")
    if wants_cuda(device_request) and torch.cuda.device_count() < nproc:
        raise KamalError(f"--nproc {nproc} on CUDA needs {nproc} GPUs, and {torch.cuda.device_count()} are present; "
                         f"use --nproc {torch.cuda.device_count()} or fewer, or device = \"cpu\"")
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
              "LOCAL_WORLD_SIZE": str(nproc)}
    saved = {key: os.environ.get(key) for key in ENV_KEYS}
    blob = pickle.dumps(payload)
    procs = []
    for rank in range(1, nproc):
        env = {**os.environ, **common, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        proc = subprocess.Popen(worker_command(os.getpid()), stdin=subprocess.PIPE, env=env)
        proc.stdin.write(blob)
        proc.stdin.close()
        procs.append(proc)
    os.environ.update({**common, "RANK": "0", "LOCAL_RANK": "0"})
    return Ranks(procs, saved)
