"""num_samples = K (several restorations per image) and task=generate (unconditional generation) through invert.py."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from app_support import TINY, pixels, read_csv, run_cli, run_inprocess
from deqir.lit.samples import check_num_samples, pairwise_lpips, sample_seed, summarize_samples

SEQ = [*TINY, "sampler=sequential", "task=inpaint_random"]


# ------------------------------------------------------------------------------------------- num_samples
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same two images restored with K = 1 and K = 3 (sequential chain: no solver round-off)."""
    root = tmp_path_factory.mktemp("samples")
    run_inprocess(SEQ, root / "k1")
    run_inprocess([*SEQ, "num_samples=3"], root / "k3")
    return root / "k1", root / "k3"


def test_sample_files_mean_std_and_columns(runs):
    _, run = runs
    rows = read_csv(run / "per_image.csv")
    assert [r["name"] for r in rows] == ["astronaut", "chelsea"]
    for r in rows:
        assert r["num_samples"] == "3"
        assert not (run / "images" / f"{r['name']}.png").exists()
        samples = np.stack([pixels(run / "images" / f"{r['name']}_{k}.png") for k in range(3)]).astype(np.float64)
        assert (samples[0] != samples[1]).any() and (samples[1] != samples[2]).any()  # independent noise
        mean = pixels(run / "mean" / f"{r['name']}.png").astype(np.float64)
        assert np.abs(mean - samples.mean(0)).max() <= 2.0  # the mean of the samples (before 8-bit rounding)
        std = pixels(run / "std" / f"{r['name']}.png").astype(np.float64)
        assert std.std() > 0 and float(r["sample_std"]) > 0
        target = pixels(run / "targets" / f"{r['name']}.png").astype(np.float64)
        mse = np.mean((mean - target) ** 2) / 255**2
        assert float(r["psnr_of_mean"]) == pytest.approx(10 * math.log10(1 / mse), abs=0.05)
        assert int(r["nfe"]) == 3 * 4 and int(r["rounds"]) == 4  # all samples' work, the longest's rounds
    assert (run / "grid.png").is_file()
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["n_images"] == 2 and "psnr_of_mean" in summary


def test_sample_zero_is_the_one_sample_run(runs):
    k1, k3 = runs
    for name in ("astronaut", "chelsea"):
        a = pixels(k1 / "images" / f"{name}.png").astype(int)
        b = pixels(k3 / "images" / f"{name}_0.png").astype(int)
        assert np.abs(a - b).max() <= 1  # same noise; batch composition only changes round-off
        assert np.array_equal(pixels(k1 / "inputs" / f"{name}.png"), pixels(k3 / "inputs" / f"{name}.png"))


def test_samples_resume_and_refuse_other_k(runs, tmp_path):
    import shutil

    _, src = runs
    run = tmp_path / "run"
    shutil.copytree(src, run)
    kept = (run / "records" / "000000.json").stat().st_mtime_ns
    before = pixels(run / "images" / "chelsea_2.png")
    (run / "images" / "chelsea_2.png").unlink()  # killed while writing image 1's samples
    run_inprocess([*SEQ, "num_samples=3"], run)
    assert (run / "records" / "000000.json").stat().st_mtime_ns == kept  # image 0 not redone
    assert np.array_equal(pixels(run / "images" / "chelsea_2.png"), before)  # image 1 redone identically
    with pytest.raises(ValueError, match="different settings.*num_samples"):
        run_inprocess([*SEQ, "num_samples=2"], run)


def test_samples_with_the_deq_solver(tmp_path):
    run_inprocess([*TINY, "num_samples=2", "dataset.limit=1"], tmp_path / "run")
    rows = read_csv(tmp_path / "run" / "per_image.csv")
    assert len(rows) == 1 and rows[0]["num_samples"] == "2"
    assert all((tmp_path / "run" / "images" / f"astronaut_{k}.png").is_file() for k in range(2))


def test_summarize_samples_aggregates_and_scores_the_mean():
    g = torch.Generator().manual_seed(0)
    B, K = 2, 3
    x0 = torch.rand(B * K, 3, 8, 8, generator=g)
    target = torch.rand(B, 3, 8, 8, generator=g)
    rows = [{"name": f"n{b}_{k}", "index": b, "psnr": 10.0 + k, "rounds": 2 + k, "nfe": 5, "residual": 0.1,
             "status": "converged" if k else "max_iter", "seconds": 1.0} for b in range(B) for k in range(K)]

    class Suite:
        lpips = staticmethod(lambda a, b: (a - b).abs().mean(dim=(1, 2, 3)))

        def compute(self, x, t):
            return {"psnr": -10 * torch.log10(((x - t) ** 2).mean(dim=(1, 2, 3)))}

    out, mean, std = summarize_samples(rows, x0, target, K, Suite(), ["n0", "n1"])
    ref_mean = x0.reshape(B, K, 3, 8, 8).mean(1)
    assert torch.allclose(mean, ref_mean)
    for b, row in enumerate(out):
        assert row["psnr"] == pytest.approx(11.0) and row["rounds"] == 4 and row["nfe"] == 15
        assert row["status"] == "max_iter" and row["num_samples"] == K
        assert row["psnr_of_mean"] == pytest.approx(float(-10 * torch.log10(((ref_mean[b] - target[b]) ** 2).mean())))
        s = x0.reshape(B, K, 3, 8, 8)[b]
        pairs = [(s[i] - s[j]).abs().mean() for i, j in ((0, 1), (0, 2), (1, 2))]
        assert row["diversity_lpips"] == pytest.approx(float(sum(pairs) / 3), rel=1e-6)
    assert pairwise_lpips(x0[:2], Suite.lpips) == pytest.approx(float((x0[0] - x0[1]).abs().mean()), rel=1e-6)
    assert std.shape == mean.shape and float(std.min()) >= 0


def test_sample_seeds_are_distinct_and_sample_zero_is_the_image():
    assert sample_seed(12345, 0) == 12345
    seeds = {sample_seed(s, k) for s in range(50) for k in range(8)}
    assert len(seeds) == 400


@pytest.mark.parametrize("value,mode,task,match", [
    (0, "restore", "deblur", "positive integer"), (2.5, "restore", "deblur", "positive integer"),
    (2, "invert", "deblur", "mode=restore"), (2, "restore", "generate", "task.num_images")])
def test_bad_num_samples(value, mode, task, match):
    with pytest.raises(ValueError, match=match):
        check_num_samples(value, mode, task)


@pytest.mark.slow
def test_samples_two_processes_match_one(runs, tmp_path):
    _, single = runs
    run = tmp_path / "ddp"
    proc = run_cli([*SEQ, "num_samples=3", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                    f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("astronaut", "chelsea"):
        for k in range(3):
            a = pixels(single / "images" / f"{name}_{k}.png").astype(int)
            b = pixels(run / "images" / f"{name}_{k}.png").astype(int)
            assert np.abs(a - b).max() <= 1
    assert [r["name"] for r in read_csv(run / "per_image.csv")] == ["astronaut", "chelsea"]


# ------------------------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    run = tmp_path_factory.mktemp("generate") / "run"
    run_inprocess([*TINY, "task=generate", "task.num_images=2"], run)
    return run


def test_generate_writes_images_without_inputs_or_targets(generated):
    rows = read_csv(generated / "per_image.csv")
    assert [r["name"] for r in rows] == ["sample_00000", "sample_00001"]
    assert "psnr" not in rows[0] and "consistency" not in rows[0]
    assert not (generated / "inputs").exists() and not (generated / "targets").exists()
    a, b = (pixels(generated / "images" / f"{r['name']}.png") for r in rows)
    assert a.shape == (32, 32, 3) and (a != b).any()
    assert (generated / "grid.png").is_file()


def test_generate_more_images_extends_the_run(generated, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(generated, run)
    kept = (run / "records" / "000001.json").stat().st_mtime_ns
    run_inprocess([*TINY, "task=generate", "task.num_images=3"], run)
    assert (run / "records" / "000001.json").stat().st_mtime_ns == kept
    assert [r["name"] for r in read_csv(run / "per_image.csv")] == ["sample_00000", "sample_00001", "sample_00002"]


def test_generate_deq_equals_sequential(tmp_path):
    base = [*TINY, "task=generate", "task.num_images=1", "solver=picard", "solver.max_iter=4", "solver.tol=0"]
    run_inprocess(base, tmp_path / "deq")
    run_inprocess([*base, "sampler=sequential"], tmp_path / "seq")
    a = pixels(tmp_path / "deq" / "images" / "sample_00000.png").astype(int)
    b = pixels(tmp_path / "seq" / "images" / "sample_00000.png").astype(int)
    assert np.abs(a - b).max() <= 1


def test_generate_refuses_optimisation(tmp_path):
    with pytest.raises(ValueError, match="task=generate"):
        run_inprocess([*TINY, "task=generate", "mode=optimize_init", "trainer.inference_mode=false"], tmp_path / "r")


@pytest.mark.slow
def test_generate_cli_summary(tmp_path):
    proc = run_cli(["debug=tiny", "task=generate", "task.num_images=2", "solver=anderson",
                    f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generate [deq] | 2 images" in proc.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["operator"] == "none (unconditional generation)"


@pytest.mark.parametrize("name", ["ddnm", "ddrm", "pigdm", "diffpir", "dps"])
def test_every_chain_generates_and_ddnm_is_plain_ddim(name):
    """With nothing measured every chain runs (its data term vanishes); DDNM is the chain without an operator."""
    from tiny_models import TinyEps

    from deqir.chains import make_step
    from deqir.diffusion.chain import make_chain
    from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid
    from deqir.samplers.sequential import draw_chain_noise, sample_sequential
    from deqir.operators import make_operator

    model, T = TinyEps(), 5
    coeffs = make_chain(NoiseSchedule.create(), SamplingGrid.create(T), etw=1.0, nw=1.0)
    gens = [torch.Generator().manual_seed(b) for b in range(2)]
    x_T, z = draw_chain_noise((2, 3, 8, 8), T, gens, per_step_noise=True, dtype=torch.float64)
    op = make_operator("generate", (3, 8, 8)).double()
    y = op.A(torch.zeros(2, 3, 8, 8, dtype=torch.float64))
    fn = make_step(name, coeffs, operator=op, y=y, z=z, sigma_y=0.0)
    x0, _ = sample_sequential(model, coeffs, x_T, operator=op, y=y, z=z, step_fn=fn)
    assert torch.isfinite(x0).all() and x0.shape == x_T.shape
    if name == "ddnm":
        ref, _ = sample_sequential(model, coeffs, x_T, z=z)
        assert (x0 - ref).abs().max() < 1e-12


def test_python_api_generate_and_samples(generated):
    import deqir

    result = deqir.generate(2, overrides=TINY)
    assert result.images.shape == (2, 3, 32, 32) and result.inputs is None and result.samples is None
    for i, r in enumerate(read_csv(generated / "per_image.csv")):
        saved = pixels(generated / "images" / f"{r['name']}.png").astype(int)
        ours = (result.images[i].permute(1, 2, 0).numpy() * 255).round().astype(int)
        assert np.abs(saved - ours).max() <= 1  # the CLI's images
    restored = deqir.evaluate(torch.rand(1, 3, 32, 32), task="sr2", overrides=[*TINY, "num_samples=2"])
    assert restored.samples.shape == (1, 2, 3, 32, 32)
    assert torch.allclose(restored.images, restored.samples.mean(dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="deqir.generate"):
        deqir.Restorer(task="generate", overrides=TINY).restore(torch.rand(1, 3, 32, 32))
