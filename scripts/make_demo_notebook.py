"""Writes notebooks/demo.ipynb (generated, so it stays reviewable as code) and executes it in place.

    python scripts/make_demo_notebook.py            # write and execute (the committed notebook has its outputs)
    python scripts/make_demo_notebook.py --no-execute

Executing is what ``jupyter nbconvert --to notebook --execute --inplace notebooks/demo.ipynb`` does, done with
nbclient (a dev dependency) so nbconvert is not needed.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "demo.ipynb"
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

CELLS = [
    md("""# deqir demo: DeqIR restoration on a CPU with the embedded default model

Zero-shot restoration with a pretrained diffusion model: the whole T-step DDNM sampling chain is solved as
**one fixed point** (Cao et al., *Deep Equilibrium Diffusion Restoration with Parallel Sampling*, CVPR 2024),
every solver round evaluating the ε-model on all T timesteps in one batch.

1. Inpaint an image with half of its pixels missing: the pseudo-inverse A⁺y, the sequential chain, the DEQ
   fixed point (PSNR to the ground truth).
2. Watch the solver reach the sequential chain round by round.
3. Optimise the initial noise x_T through the equilibrium (implicit gradients) to steer a colorization.

Every setting comes from the configuration `python invert.py task=inpaint_random` composes
(`deqir.compose_config`, docs/api.md); the model is deqir's embedded default (a ~1 M-parameter natural-image
patch prior trained by `train.py`, model card `deqir/weights/README.md`). Small images (48×48, T = 25, and
32×32, T = 8) keep it under a minute on an idle 2-core CPU."""),
    code("""%matplotlib inline
import matplotlib.pyplot as plt
import torch
from omegaconf import OmegaConf

import deqir
from deqir.datasets.images import center_crop_resize, read_image, to_tensor
from deqir.samplers.deq import sample_deq
from deqir.samplers.sequential import chain_start, draw_chain_noise, sample_sequential
from deqir.lit.builders import build_chain, build_model, build_operator, chain_settings, samples_dir
from deqir.metrics import psnr
from deqir.utils.images import to_unit

torch.set_num_threads(1)  # small tensors: one thread is fast and immune to oversubscription (README)


def load(name, size):
    \"\"\"A sample image, centre-cropped and resized, as a (1, 3, size, size) tensor on [-1, 1].\"\"\"
    return to_tensor(center_crop_resize(read_image(samples_dir() / f"{name}.png"), size))[None] * 2 - 1


def show(images, titles):
    \"\"\"One row of [-1, 1] images with titles.\"\"\"
    fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images), 2.6))
    for ax, im, title in zip(axes, images, titles):
        ax.imshow(to_unit(im)[0].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    plt.show()


def db(a, b):
    \"\"\"PSNR in dB of two [-1, 1] images on the [0, 1] scale.\"\"\"
    return float(psnr(to_unit(a), to_unit(b), quantized=False)[0])"""),
    md("""## 1. Inpainting 50 % missing pixels: A⁺y, the sequential chain, the DEQ fixed point

`cfg` is the configuration of `python invert.py task=inpaint_random solver=quasi_newton` (the default
`solver=auto` would time this machine first and pick a schedule; `quasi_newton` is the parallel solve it
picks on a GPU). `chain_settings` turns it into the sampler's plain values, as `invert.py` does."""),
    code("""cfg = OmegaConf.to_container(deqir.compose_config("inpaint_random", ["solver=quasi_newton"]), resolve=True)
model = build_model(cfg["model"])                       # the embedded default weights
x = load("chelsea", 48)                                  # ground truth
op = build_operator(cfg["task"], tuple(x.shape[1:]))     # keeps a random half of the pixels
sigma_y = cfg["task"]["sigma_y"]
y = op.measure(x, sigma_y, torch.Generator().manual_seed(0))
coeffs = build_chain(cfg["sampler"], model.schedule, op, sigma_y)
st = chain_settings(cfg["sampler"], cfg["solver"], cfg["chain"])
x_T, z = draw_chain_noise(x.shape, len(coeffs), [torch.Generator().manual_seed(0)], st.per_step_noise)
x_T = chain_start(coeffs, x_T, operator=op, y=y)       # the task's grid starts from A+y diffused to t = 400
print(f"T = {len(coeffs)}, chain {st.chain} (etw {cfg['sampler']['etw']}, nw {cfg['sampler']['nw']}), "
      f"solver {st.solver} from init={st.init}, map form {st.form}")

x_seq, _ = sample_sequential(model, coeffs, x_T, operator=op, y=y, z=z, clip_x0=st.clip_x0)

to_seq = []                                              # per round: PSNR of the DEQ's x0 to the sequential x0
res = sample_deq(model, coeffs, x_T, operator=op, y=y, z=z, solver=st.solver, max_iter=st.max_iter, tol=st.tol,
                 stop_mode=st.stop_mode, options=st.solver_options, init=st.init, coarse_steps=st.coarse_steps,
                 form=st.form, clip_x0=st.clip_x0, callback=lambda info: to_seq.append(db(info["last_slot"], x_seq)))

pinv = op.A_pinv(y)
print(f"PSNR to ground truth: A+y {db(pinv, x):.2f} dB | sequential chain {db(x_seq, x):.2f} dB | "
      f"DEQ {db(res.x0, x):.2f} dB")
print(f"DEQ vs sequential chain: {db(res.x0, x_seq):.1f} dB apart after {res.stats.rounds} rounds "
      f"({res.nfe} model evaluations; sequential: {len(coeffs)})")
show([op.y_to_image(y), pinv, x_seq, res.x0, x],
     ["input y", f"A⁺y {db(pinv, x):.1f} dB", f"sequential {db(x_seq, x):.1f} dB", f"DEQ {db(res.x0, x):.1f} dB",
      "ground truth"])"""),
    md("""## 2. Convergence to the sequential chain

Each round evaluates the UNet once on the slots that have not converged yet (one batch); the quasi-Newton
sweep then propagates the correction down the chain (docs/solvers.md). The DEQ's x0 approaches the
sequential chain's until it is identical to 8-bit precision (≥ 45 dB is invisible). On a CPU a batch of
T slots costs about T sequential steps, so the wall-clock gain of DeqIR needs parallel hardware (a GPU)."""),
    code("""fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(range(1, len(to_seq) + 1), to_seq, "o-")
ax.axhline(45, color="gray", ls="--", lw=1)
ax.set(xlabel="solver round", ylabel="PSNR to the sequential x0 (dB)", title="DEQ fixed point → sequential chain")
fig.tight_layout()
plt.show()"""),
    md("""## 3. Initialization optimization: steer a colorization with a reference colour

Colorization keeps the gray value (A x0 = y holds for every x_T), so only colour lives in the null space.
Optimising x_T through the equilibrium against an L2 loss to a reference colour moves the colours toward it
(the paper's Fig. 5). Gradients come from the implicit function theorem (`gradient="ift"`, docs/gradients.md);
the chain is the colorize task's deterministic one, solved exactly by T Picard rounds."""),
    code("""from deqir.deq.grad import DEQGradientConfig
from deqir.optim import SolveConfig, optimize_init

# the colorize task's recommended chain (deterministic DDIM, x0 clipped), solved by Picard: exact after T rounds
ccfg = OmegaConf.to_container(deqir.compose_config("colorize", ["sampler.timesteps=8", "solver=picard"]),
                              resolve=True)
x = load("coffee", 32)
op = build_operator(ccfg["task"], tuple(x.shape[1:]))
y = op.measure(x, 0.0)
coeffs = build_chain(ccfg["sampler"], model.schedule, op, 0.0)
cst = chain_settings(ccfg["sampler"], ccfg["solver"], ccfg["chain"])
x_T, z = draw_chain_noise(x.shape, len(coeffs), [torch.Generator().manual_seed(1)], cst.per_step_noise)
x_T = chain_start(coeffs, x_T, operator=op, y=y)       # from the grey image diffused to t = 288
stop = dict(solver=cst.solver, max_iter=cst.max_iter, tol=cst.tol, stop_mode=cst.stop_mode, options=cst.solver_options)
unsteered = sample_deq(model, coeffs, x_T, operator=op, y=y, z=z, **stop, init=cst.init, form=cst.form,
                       clip_x0=cst.clip_x0).x0
reference = torch.tensor([-0.8, 0.6, -0.6]).view(1, 3, 1, 1).expand_as(x)   # a green reference colour
out = optimize_init(model, coeffs, x_T, losses={"reference": 1.0}, operator=op, y=y, z=z, reference=reference,
                    reference_kind="l2", steps=4, lr=0.05, solve=SolveConfig(**stop),
                    gradient=DEQGradientConfig(mode="ift"), map_form=cst.form, clip_x0=cst.clip_x0)
print("reference loss per step:", [round(h["loss"][0], 4) for h in out.history])
print(f"consistency ||A x0 - y||: {float((op.A(out.x0_best) - y).norm()):.1e} (the gray values are kept)")
show([op.y_to_image(y), unsteered, out.x0_best, reference, x],
     ["gray input", "from the drawn x_T", "from the optimised x_T", "reference colour", "ground truth"])"""),
]


def build() -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb["cells"] = CELLS
    nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def execute(nb: nbf.NotebookNode) -> float:
    from nbclient import NotebookClient

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return time.perf_counter() - t0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-execute", action="store_true", help="write the cells without outputs")
    args = parser.parse_args()
    nb = build()
    if not args.no_execute:
        print(f"executed in {execute(nb):.1f} s", file=sys.stderr)
    nbf.write(nb, str(NOTEBOOK))
