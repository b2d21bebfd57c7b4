"""One rank of a real 2-process DDP LoRA training on CPU (gloo), run by tests/test_ddp.py as its own process.

    RANK=r LOCAL_RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/ddp_rank.py SPEC_JSON

Ultralytics' trainer runs DDP only on GPUs (its launcher spawns one worker per CUDA device; on CPU its world size is
0). This process is such a worker with three CUDA-only calls replaced: `_setup_ddp` joins a gloo group instead
of NCCL on a GPU, the DDP wrapper gets no `device_ids` (a CPU module takes none), and the final validation picks
its device as a single process does (Ultralytics' validator asks CUDA for a DDP rank's device). Everything else is
Ultralytics' own training loop with the LoRA trainer: DistributedSampler, gradient all-reduce, loss scaling by the
world size, rank-0-only saving, the stop broadcast and LoRA's NaN agreement. The model is built before `train()` as
`lora_yolo.train` builds it for the launcher, and DDP then broadcasts rank 0's weights (the launcher pickles one
model for all). At the end each rank writes what it holds (adapter, EMA adapter, optimizer learning rates by kind)
and, for rank 1, every path under the run's project it wrote (Python's audit hooks) to OUT/rank{r}.pt, or the
error it stopped with to OUT/rank{r}.err.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from ultralytics.engine import validator

from lora_yolo import LoraConfig
from lora_yolo.checkpoint import load_model
from lora_yolo.errors import LoraYoloError
from lora_yolo.inject import LORA_SUFFIXES
from lora_yolo.trainer import TRAINERS

RANK = int(os.environ["RANK"])


def gloo_rank(trainer: type) -> type:
    """A LoRA trainer (`TRAINERS`) as a DDP worker on CPU."""

    class GlooRank(trainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.world_size = 2  # Ultralytics counts CUDA devices only

        def _setup_ddp(self) -> None:
            dist.init_process_group("gloo", rank=RANK, world_size=self.world_size)

    return GlooRank


def record_writes(folder: str) -> list[str]:
    """Files under `folder` this process opens for writing, renames or removes (Python's audit events)."""
    seen: list[str] = []
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & write_flags)
            paths = [args[0]] if writing else []
        elif event in {"os.rename", "os.replace", "os.remove", "shutil.rmtree"}:
            paths = [a for a in args if isinstance(a, (str, os.PathLike))]
        else:
            return
        seen.extend(str(p) for p in paths if os.path.abspath(p).startswith(folder))

    sys.addaudithook(hook)
    return seen


def main() -> None:
    spec = json.loads(sys.argv[1])
    writes = record_writes(os.path.abspath(spec["overrides"]["project"])) if RANK else []
    cpu_ddp = nn.parallel.DistributedDataParallel
    nn.parallel.DistributedDataParallel = lambda module, device_ids=None, **kw: cpu_ddp(module, **kw)
    backend = validator.AutoBackend  # a DDP rank's validator asks CUDA for its device: the CPU instead
    validator.get_torch_device_backend = lambda device_type: SimpleNamespace(current_device=lambda: 0)
    validator.AutoBackend = lambda *a, device=None, **kw: backend(*a, device=torch.device("cpu"), **kw)
    trainer_class = gloo_rank(TRAINERS[spec.get("kind", "detect")][0])
    trainer = trainer_class(overrides=spec["overrides"], lora=LoraConfig(**spec["lora"]))
    base = load_model(spec["overrides"]["model"])
    torch.manual_seed(RANK)  # different adapter inits: DDP must make them rank 0's
    trainer.model = trainer.get_model(cfg=base.yaml, weights=base)
    if spec.get("nan_rank") == RANK:

        def poison(t) -> None:
            if t.epoch == 1:
                t.loss = torch.tensor(float("nan"))

        trainer.add_callback("on_train_batch_end", poison)
    try:
        trainer.train()
    except LoraYoloError as e:
        with open(os.path.join(spec["out"], f"rank{RANK}.err"), "w") as f:
            f.write(str(e))
        return
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    names = {id(p): n for n, p in model.named_parameters()}
    kinds = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            kind = "B" if n.endswith("lora_B.weight") else "A" if n.endswith("lora_A.weight") else "other"
            kinds.setdefault(kind, set()).add(group["initial_lr"] if "initial_lr" in group else group["lr"])
    pick = lambda m: {n: t.detach().clone() for n, t in m.state_dict().items() if n.endswith(LORA_SUFFIXES)}  # noqa: E731
    full = {n: model.state_dict()[n].clone() for n in model.lora_meta["full"]}
    torch.save({"adapter": pick(model), "ema": pick(trainer.ema.ema), "full": full, "lrs": kinds, "writes": writes},
               os.path.join(spec["out"], f"rank{RANK}.pt"))  # fmt: skip


if __name__ == "__main__":
    try:
        main()  # an error it does not catch itself exits non-zero, as always
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # main() returned: everything is written. Skip the interpreter's teardown, where threads torch left behind can
    # still abort the process after destroy_process_group ("terminate called without an active exception", seen in
    # .ci/run on a rank that stopped on the NaN error).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
