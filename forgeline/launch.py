"""Launch a training stage with `accelerate launch`, the launch config named in the stage's YAML.

    python -m forgeline.launch tasks.pretrain [key=value ...]

reads `launch:` from configs/pretrain.yaml (a file in configs/accelerate/), gives each process
its share of the cores (OMP_NUM_THREADS), picks a free loopback port for multi-process runs and
execs `accelerate launch --config_file ... -m tasks.pretrain key=value ...`.
"""
from __future__ import annotations

import os
import socket
import sys
import time

import yaml

from forgeline.config import ConfigError, parse_overrides, read_yaml
from forgeline.paths import CONFIGS, config_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(module: str, launch: str, args: list[str], port: int | None = None) -> tuple[list[str], dict]:
    """The argv and environment that start `module` under the named accelerate config."""
    path = CONFIGS / "accelerate" / f"{launch}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONFIGS / "accelerate").glob("*.yaml"))
        raise ConfigError(f"launch={launch!r}: no {path}; known: {known}")
    acc = yaml.safe_load(path.read_text())
    nproc = int(acc.get("num_processes", 1))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    if nproc > 1:
        cmd += ["--main_process_port", str(port or free_port())]
    cmd += ["-m", module, *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return cmd, env


def matmul_peak_flops(dtype: torch.dtype = None, n: int = 1024, seconds: float = 0.5) -> float:  # noqa: F821
    """Measured FLOP/s of square matmuls on this device: the denominator of MFU on a CPU."""
    import torch

    dtype = dtype or torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m forgeline.launch tasks.<stage> [key=value ...]")
    module, args = argv[0], argv[1:]
    stage = module.rpartition(".")[2]
    launch = {**read_yaml(config_path(stage)), **parse_overrides(args)}.get("launch", "cpu")
    cmd, env = launch_command(module, launch, args)
    print("launch:", " ".join(cmd[1:]), flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
