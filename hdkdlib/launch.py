"""Launching a run in several processes from Python (a notebook): torchrun, one process per GPU."""
from __future__ import annotations

import signal
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
    # a folder begun (or finished) with other settings is refused here, before the processes start: resumed, they
    # would fill every setting the command leaves at its default from the folder's record and train with those
    plan = resolve(cfg)
    if plan.action == "load":
        return False
    command = torchrun_command(plan.cfg, nproc)
    print(" ".join(command))
    run_to_end(command)
    return True


def run_to_end(command: list, grace: float = 60.0) -> None:
    """Run command; CalledProcessError if it fails. Interrupted (the notebook's stop button), it is asked to stop
    with SIGTERM, which torchrun passes on to its ranks (they save a checkpoint and exit), and killed only after
    `grace` seconds: killed at once, torchrun would leave its ranks, in sessions of their own, training on."""
    process = subprocess.Popen(command)
    try:
        code = process.wait()
    except BaseException:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    if code:
        raise subprocess.CalledProcessError(code, command)


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
