"""Multi-process invert.py on the CPU (gloo): 2 processes give the outputs of 1, over images and over timesteps."""
from __future__ import annotations

import csv
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from app_support import pixels, run_cli

# solver pinned: solver=auto times the machine, and these tests compare independent runs with each other
TINY_CLI = ["debug=tiny", "dataset.limit=3", "sampler.timesteps=4", "solver=anderson", "solver.max_iter=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(x, t):
    return torch.tanh(x) * (1 + t.view(-1, 1, 1, 1).float() / 1000)


def _evaluator_worker(rank: int, port: int, out_dir: str) -> None:
    from deqir.lit.distributed import TimestepParallelEvaluator, gather_objects

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # 5 slots: padded to 2 x 3
        t = torch.arange(5) * 100
        ev = TimestepParallelEvaluator(_model, max_batch=2)
        eps = ev(x, t)
        ok = torch.equal(eps, _model(x, t)) and ev.local_evals == 3 and ev.calls == 1
        gathered = gather_objects({"rank": rank, "ok": ok})
        if rank == 0:
            torch.save(gathered, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def test_timestep_evaluator_splits_and_gathers(tmp_path):
    mp.spawn(_evaluator_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt")
    assert [r["rank"] for r in result] == [0, 1] and all(r["ok"] for r in result)


def _rows(run):
    with open(run / "per_image.csv") as f:
        return list(csv.DictReader(f))


def _same_outputs(a, b) -> None:
    ra, rb = _rows(a), _rows(b)
    assert [r["name"] for r in ra] == [r["name"] for r in rb] == ["astronaut", "chelsea", "coffee"]
    for x, y in zip(ra, rb):
        assert x["rounds"] == y["rounds"] and x["nfe"] == y["nfe"]
        # Slots split across ranks go through the UNet in smaller batches, and CPU convolutions round
        # differently per batch size; the random tiny UNet amplifies that last-bit noise, hence rel 1e-4 and
        # at most one 8-bit level. Inputs and targets involve no UNet: they must be identical.
        for col in ("psnr", "ssim", "consistency"):
            assert float(x[col]) == pytest.approx(float(y[col]), rel=1e-4), col
        assert float(x["residual"]) == pytest.approx(float(y["residual"]), rel=1e-2)
        ia, ib = pixels(a / "images" / f"{x['name']}.png"), pixels(b / "images" / f"{x['name']}.png")
        assert np.abs(ia.astype(int) - ib.astype(int)).max() <= 1
        for sub in ("inputs", "targets"):
            np.testing.assert_array_equal(pixels(a / sub / f"{x['name']}.png"), pixels(b / sub / f"{x['name']}.png"))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    proc = run_cli([*TINY_CLI, f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("timesteps", [False, True], ids=["images", "timesteps"])
def test_two_processes_match_one(single_run, tmp_path, timesteps):
    run = tmp_path / "ddp"
    proc = run_cli([*TINY_CLI, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                    f"parallel.timesteps={str(timesteps).lower()}", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    _same_outputs(single_run, run)
    assert "3 images" in proc.stdout
    # one summary line, printed once (rank 0 only)
    assert sum("images |" in ln for ln in proc.stdout.splitlines()) == 1


@pytest.mark.slow
def test_two_nodes_on_localhost_match_one_process(single_run, tmp_path):
    """Multi-node without SLURM (docs/app.md "Multi-GPU and clusters"): two processes as two nodes on localhost
    (MASTER_ADDR / MASTER_PORT / NODE_RANK, num_nodes=2 x devices=1), timestep-parallel over gloo, give one
    process's results up to batch round-off (inputs and targets byte for byte)."""
    import subprocess
    import sys

    from app_support import REPO

    run, port = tmp_path / "nodes", _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    procs = []
    for node in (0, 1):
        env = {**base, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "NODE_RANK": str(node)}
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "invert.py"), *TINY_CLI, "trainer=ddp", "trainer.accelerator=cpu",
             "trainer.num_nodes=2", "trainer.devices=1", "parallel.timesteps=true", f"hydra.run.dir={run}"],
            cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    for sub in ("images", "inputs", "targets"):
        names = sorted(p.name for p in (single_run / sub).glob("*.png"))
        assert names == ["astronaut.png", "chelsea.png", "coffee.png"]
    # the same contract as two processes on one node: slots split across the nodes go through the UNet in smaller
    # batches, so restored images agree to batch round-off (at most one 8-bit level); inputs/targets are identical
    _same_outputs(single_run, run)
    assert [sum("images |" in ln for ln in out.splitlines()) for out, _ in outs] == [1, 0]  # node 0 reports
