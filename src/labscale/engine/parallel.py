"""Where model calls run: in this process (`LOCAL`), or sharded over the processes of a data-parallel launch.

    accelerate launch --num_processes 4 -m labscale run experiment.yaml     (or torchrun … -m labscale run …)

Every process validates the experiment and loads the models (each its own copy, on its own GPU: LOCAL_RANK). The
main process (rank 0) alone opens the database, plans, reads the cache, scores, and writes; the others only
answer model calls. Each batch the main process would send to a local model becomes `width` batches of the same
size, consecutive in the main process's longest-first order: batch i goes to process i (scatter), the results
come back in order (gather), and the batch is committed before the next. So every process sees exactly the
batches a single process would have run — greedy outputs, log-likelihoods and therefore scores are identical to
one process — and a killed launch loses at most the batches in flight, as before. Remote (API) models are called
by the main process alone: more processes would not make an API faster.

Collectives run over gloo (CPU tensors of pickled requests and results: small next to the model work), also on
GPU machines, with a long timeout because a process waits in a collective while the main process scores or calls
an API. A worker's failure is sent back and raised in the main process; when the main process stops (done, or an
error), it releases the workers (`finish`) and they exit 0.

Fine-tuning inside a data-parallel `labscale run` is not supported (train with `accelerate launch -m labscale
finetune`, then evaluate the adapter), nor is `device_map: auto` (one process would spread a model over every
GPU the others use); both are refused before any work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from labscale.errors import ConfigError, ModelError
from labscale.models.base import GenerationRequest, GenerationResult, LoglikelihoodRequest, LoglikelihoodResult, \
    ModelBackend

COLLECTIVE_TIMEOUT = timedelta(hours=24)


class Executor:
    """Model calls in this process."""

    width = 1  # processes a batch is spread over
    is_main = True
    processes = 1

    def width_for(self, backend: ModelBackend) -> int:
        return 1

    def generate(self, backend: ModelBackend, requests: list[GenerationRequest],
                 per_process: int) -> list[GenerationResult]:
        return backend.generate(requests)

    def loglikelihood(self, backend: ModelBackend, requests: list[LoglikelihoodRequest],
                      per_process: int) -> list[LoglikelihoodResult]:
        return backend.loglikelihood(requests)

    def close(self, backend: ModelBackend) -> None:
        backend.close()

    def finish(self) -> None:
        """Release the workers (data-parallel): the main process is done."""


LOCAL = Executor()


@dataclass
class WorkerFailure:
    rank: int
    kind: str
    message: str


class DataParallel(Executor):
    """The main process's and the workers' side of the protocol in the module docstring."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.width = world
        self.processes = world
        self.is_main = rank == 0
        self._finished = False

    def width_for(self, backend: ModelBackend) -> int:
        return 1 if backend.info.is_remote else self.world

    # -------------------------------------------------------------------------------------- main process

    def _round(self, op: str, backend: ModelBackend, shards: list[list] | None) -> list:
        import torch.distributed as dist

        messages = [(op, backend.info.name, shard) for shard in shards] if shards is not None else \
            [(op, backend.info.name, None)] * self.world
        mine: list = [None]
        dist.scatter_object_list(mine, messages, src=0)
        own_op, _, own_requests = mine[0]
        try:
            own = self._call(backend, own_op, own_requests)
        except BaseException as e:  # noqa: BLE001 - gather first, so the workers are not left waiting
            own = WorkerFailure(0, type(e).__name__, str(e))
            error: BaseException | None = e
        else:
            error = None
        gathered: list = [None] * self.world
        dist.gather_object(own, gathered, dst=0)
        if error is not None:
            raise error
        for g in gathered:
            if isinstance(g, WorkerFailure):
                raise ModelError(f"process {g.rank} of the data-parallel launch failed on model "
                                 f"'{backend.info.name}': {g.kind}: {g.message}",
                                 "fix the cause and run the same command again (finished work is stored)")
        return gathered

    def _split(self, requests: list, per_process: int) -> list[list]:
        return [requests[i * per_process: (i + 1) * per_process] for i in range(self.world)]

    def generate(self, backend, requests, per_process):
        if self.width_for(backend) == 1:
            return backend.generate(requests)
        return [r for part in self._round("generate", backend, self._split(requests, per_process)) for r in part]

    def loglikelihood(self, backend, requests, per_process):
        if self.width_for(backend) == 1:
            return backend.loglikelihood(requests)
        return [r for part in self._round("loglikelihood", backend, self._split(requests, per_process))
                for r in part]

    def close(self, backend) -> None:
        if self.width_for(backend) == 1:
            backend.close()
        else:
            self._round("close", backend, None)

    def finish(self) -> None:
        import torch.distributed as dist

        if self.is_main and not self._finished:
            self._finished = True
            dist.scatter_object_list([None], [None] * self.world, src=0)

    # ------------------------------------------------------------------------------------------ workers

    @staticmethod
    def _call(backend: ModelBackend, op: str, requests):
        if op == "generate":
            return backend.generate(requests) if requests else []
        if op == "loglikelihood":
            return backend.loglikelihood(requests) if requests else []
        backend.close()
        return None

    def serve(self, backends: dict[str, ModelBackend]) -> None:
        """A worker: answer the main process's calls until it finishes."""
        import torch.distributed as dist

        while True:
            box: list = [None]
            dist.scatter_object_list(box, None, src=0)
            if box[0] is None:
                return
            op, name, requests = box[0]
            try:
                out = self._call(backends[name], op, requests)
            except BaseException as e:  # noqa: BLE001 - reported by the main process
                out = WorkerFailure(self.rank, type(e).__name__, str(e)[:500])
            dist.gather_object(out, None, dst=0)

    def agree(self, problem: str | None) -> list[str | None]:
        """Every process's problem (None: ready), so that all go on or all stop together."""
        import torch.distributed as dist

        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, problem)
        return everyone


def data_parallel() -> DataParallel | None:
    """The launch this process is part of (WORLD_SIZE > 1, as accelerate launch and torchrun set it), its
    process group initialised over gloo; None for a plain single process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return DataParallel(dist.get_rank(), dist.get_world_size())


def check_parallel(models: list, adaptations: list) -> None:
    """What a data-parallel `labscale run` cannot do, refused before any work (see the module docstring)."""
    if adaptations:
        raise ConfigError("fine-tuning (adaptations:) cannot run inside a data-parallel `labscale run`",
                          "train first with `accelerate launch -m labscale finetune …`, then list the adapter as an "
                          "adapter:<folder> model, or run this experiment as one process")
    for spec in models:
        if getattr(spec, "device_map", None):
            raise ConfigError(f"model '{spec.label}' sets device_map: auto, which spreads one copy over every GPU; "
                              "a data-parallel launch gives each process a whole copy",
                              "remove device_map (data parallel) or run as one process (model parallel)")

