"""Launching a run in several processes from Python (a notebook): torchrun, one process per GPU."""
from __future__ import annotations

import subprocess
import sys

from .config import TrainConfig, to_argv
from .resume import resolve
from .runfolder import RunFolder


def torchrun_command(cfg: TrainConfig, nproc: int) -> list:
    """The command that trains cfg's run in nproc processes, continuing what its folder already holds."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    resume = ["--resume"] if cfg.out and RunFolder(cfg.out).exists() else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "hdkdlib.train", *to_argv(cfg), *resume]


def torchrun(cfg: TrainConfig, nproc: int) -> bool:
    """Train cfg's run with torchrun unless its folder holds it finished; True when it launched one. Raises
    CalledProcessError when the run fails (its ranks' errors are on the notebook's stderr)."""
    if not cfg.out:
        raise ValueError("a torchrun launch needs cfg.out: the run folder the processes train into")
    if RunFolder(cfg.out).finished():
        return False
    # a folder begun with other settings is refused here, before the processes start: resumed, they would fill
    # every setting the command leaves at its default from the folder's record and train with those
    command = torchrun_command(resolve(cfg).cfg, nproc)
    print(" ".join(command))
    subprocess.run(command, check=True)
    return True


def batch_per_process(batch_size: int, nproc: int) -> int:
    """Each process's share of a batch given in all (a recipe's batch, such as MSDNet's ImageNet 256, is the
    global one; TrainConfig.batch_size is per process). Refused unless it splits evenly."""
    if nproc < 1 or batch_size < 1:
        raise ValueError(f"batch_size and the process count must be >= 1, got {batch_size} and {nproc}")
    share, rest = divmod(batch_size, nproc)
    if rest or not share:
        raise ValueError(f"parameter 'batch_size': {batch_size} images in all do not split evenly over {nproc} "
                         f"processes (GPUs); give a multiple of {nproc}, e.g. {max(share, 1) * nproc}")
    return share
