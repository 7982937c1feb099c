"""Plain-config -> objects for ``invert.py``: model, dataset, operator, chain and module settings.

Everything here takes plain Python values (``OmegaConf.to_container(cfg, resolve=True)``), never a
``DictConfig``, and raises ``ValueError`` / ``FileNotFoundError`` with one-line messages.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from deqir.chains import chain_params
from deqir.datasets.images import (IndexedImages, apply_limit, image_names, list_images, read_split_list,
                                   select_subset)
from deqir.deq.solvers import solver_options
from deqir.diffusion.chain import ChainCoefficients, make_chain
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid
from deqir.lit.restoration import ChainSettings, EvalSettings
from deqir.models import load_eps_model
from deqir.operators import Operator, make_operator
from deqir.utils.runtime import cpu_supports_bf16

DATASET_KINDS = ("samples", "folder", "celeba_hq", "imagenet_val", "real")
SAMPLERS = ("deq", "sequential")
_SOLVER_KEYS = ("name", "max_iter", "tol", "stop_mode")
_MODEL_KEYS = ("arch", "config", "ckpt_path", "dtype", "source", "strict", "seed", "schedule", "name", "hub_id",
               "subfolder")


def samples_dir() -> Path:
    """``data/samples`` of the source checkout (editable install)."""
    return Path(__file__).resolve().parents[2] / "data" / "samples"


def build_model(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """``load_eps_model`` with the ``model/`` keys (unknown keys are ignored, e.g. comments in configs)."""
    return load_eps_model(**{k: v for k, v in model_cfg.items() if k in _MODEL_KEYS}, device="cpu")


def resolve_model_dtype(model_dtype: str, model_cfg: dict[str, Any], accelerator: str) -> str:
    """The ε-model's compute dtype: ``auto`` = bfloat16 for a float32 model on a CPU with native bf16
    (AVX512-BF16/AMX, ~1.6x faster), else ``model.dtype``; ``model`` = ``model.dtype``; or an explicit dtype."""
    own = str(model_cfg.get("dtype", "float32"))
    if model_dtype == "model":
        return own
    if model_dtype != "auto":
        return str(model_dtype)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    return "bfloat16" if own in ("float32", "fp32") and on_cpu and cpu_supports_bf16() else own


def model_stride(model: torch.nn.Module) -> int:
    """Factor the image side must divide: 2 ** (number of downsamplings) of the UNet (1 if unknown)."""
    cfg = getattr(model, "info", {}).get("config") or {}
    for key in ("ch_mult", "channel_mult", "block_out_channels"):
        if key in cfg and cfg[key]:
            return 2 ** (len(cfg[key]) - 1)
    return 1


def image_shape(dataset_cfg: dict[str, Any]) -> tuple[int, int, int]:
    """(3, H, W) of the images to restore, from ``dataset.size`` (an int or [H, W])."""
    size = dataset_cfg.get("size")
    if size is None:
        raise ValueError("dataset.size must be set (the side of the restored images, e.g. dataset.size=128)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"dataset.size must be positive, got {size}")
    return 3, int(h), int(w)


def check_size(shape: tuple[int, int, int], model: torch.nn.Module) -> None:
    """The UNet needs sides divisible by its total downsampling factor."""
    stride = model_stride(model)
    for side in shape[1:]:
        if side % stride:
            lo, hi = side // stride * stride, (side // stride + 1) * stride
            raise ValueError(f"image size {shape[1]}x{shape[2]} does not fit the model: sides must be multiples of "
                             f"{stride} (its UNet downsamples {stride}x); use dataset.size={lo or hi} or {hi}")


#: What a task's required file parameter (``???`` in its yaml) holds, for the error that asks for it.
_REQUIRED_FILES = {"kernel_path": "the blur kernel file: .npy, .txt, .csv or .png", "mask_path":
                   "the mask PNG, the photo's size, white/nonzero = observed"}


def check_task_params(task_cfg: dict[str, Any]) -> None:
    """A task parameter its yaml leaves to the user (``???``, e.g. a kernel or mask file) must be set."""
    for key, value in (task_cfg.get("params") or {}).items():
        if value == "???":
            what = _REQUIRED_FILES.get(key, "a value")
            raise ValueError(f"task {task_cfg['name']} needs task.params.{key}=... ({what}); it is not set")


def build_operator(task_cfg: dict[str, Any], shape: tuple[int, int, int]) -> Operator:
    """``make_operator(task.name, shape, **task.params)`` in float32."""
    check_task_params(task_cfg)
    params = dict(task_cfg.get("params") or {})
    op = make_operator(str(task_cfg["name"]), shape, **params)
    return op.to(dtype=torch.float32)


def build_chain(sampler_cfg: dict[str, Any], schedule: dict[str, Any], op: Operator,
                sigma_y: float) -> ChainCoefficients:
    """Chain coefficients; sigma_y_eff = 2 sigma_y gain(A+) (sigma_y on [0, 1], the chain on [-1, 1])."""
    if not (isinstance(sigma_y, (int, float)) and math.isfinite(sigma_y) and sigma_y >= 0):
        raise ValueError(f"task.sigma_y must be a finite number >= 0 (the noise std on the [0, 1] scale), "
                         f"got {sigma_y}")
    sched = NoiseSchedule.create(**schedule)
    t_start = sampler_cfg.get("t_start")
    grid = SamplingGrid.create(int(sampler_cfg["timesteps"]), num_train_steps=sched.num_steps,
                               skip_type=str(sampler_cfg["skip_type"]), schedule=sched, rho=sampler_cfg["rho"],
                               t_start=None if t_start is None else t_start)
    sigma_eff = 2.0 * float(sigma_y) * (op.pinv_noise_gain() if sigma_y > 0 else 1.0)
    return make_chain(sched, grid, etw=float(sampler_cfg["etw"]), nw=float(sampler_cfg["nw"]),
                      sigma_y_eff=sigma_eff, noise_aware=bool(sampler_cfg["noise_aware"]))


def chain_settings(sampler_cfg: dict[str, Any], solver_cfg: dict[str, Any],
                   chain_cfg: dict[str, Any] | None = None) -> ChainSettings:
    """Sampler + solver (+ chain/) config -> :class:`ChainSettings` (solver extras become solver options).

    Chains other than ``ddnm`` exist only as steps, so they always use the map's ``step`` form, and they draw
    one fresh noise image per step (``sampler.per_step_noise`` is the DDNM chain's official-compatibility switch).
    """
    chain = dict(chain_cfg or {"name": "ddnm"})
    chain_name = str(chain.pop("name", "ddnm"))
    params = {k: v for k, v in chain.items() if v is not None}
    unknown = sorted(set(params) - set(chain_params(chain_name)) - {"clip_x0"})
    if unknown:
        raise ValueError(f"chain {chain_name!r} has no option(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(chain_params(chain_name) + ('clip_x0',))}")
    kind = str(sampler_cfg.get("name", "deq"))
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; valid: {', '.join(SAMPLERS)}")
    name = str(solver_cfg["name"])
    # solver=auto resolves to quasi_newton's schedule at run time (deqir.lit.autotune)
    valid = set(solver_options("quasi_newton" if name == "auto" else name)) - {"callback"}
    if name == "auto":
        valid.add("knee_factor")
    options = {k: v for k, v in solver_cfg.items() if k not in _SOLVER_KEYS and v is not None}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"solver {name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    max_iter = solver_cfg.get("max_iter")
    return ChainSettings(
        sampler=kind, solver=name,
        max_iter=int(max_iter) if max_iter is not None else int(sampler_cfg["timesteps"]),
        tol=float(solver_cfg["tol"]), stop_mode=str(solver_cfg["stop_mode"]),
        solver_options=options, init=str(sampler_cfg["init"]),
        coarse_steps=int(sampler_cfg["coarse_steps"]), max_batch=sampler_cfg["max_batch"],
        per_step_noise=bool(sampler_cfg["per_step_noise"]) or chain_name != "ddnm",
        # chains other than ddnm, and quasi_newton (auto), solve the step form: the same chain and fixed point
        form=str(sampler_cfg["form"]) if chain_name == "ddnm" and name not in ("quasi_newton", "auto") else "step",
        clip_x0=bool(sampler_cfg["clip_x0"]),
        chain=chain_name, chain_params=params,
    )


def eval_settings(eval_cfg: dict[str, Any], task_cfg: dict[str, Any], has_target: bool) -> EvalSettings:
    channel = str(eval_cfg.get("channel", "rgb"))
    if channel not in ("rgb", "y"):
        raise ValueError(f"eval.channel must be 'rgb' or 'y', got {channel!r}")
    lpips = eval_cfg.get("lpips")
    if lpips not in (None, "vgg", "alex", "squeeze"):
        raise ValueError(f"eval.lpips must be vgg, alex, squeeze or null, got {lpips!r}")
    return EvalSettings(crop_border=int(eval_cfg.get("crop_border", 0)), channel=channel,
                        lpips_net=lpips if has_target else None, lpips_weights=eval_cfg.get("lpips_weights"),
                        compare_sequential=bool(eval_cfg.get("compare_sequential", False)),
                        colorization=str(task_cfg["name"]) == "colorize")


def build_dataset(dataset_cfg: dict[str, Any], shape: tuple[int, int, int], op: Operator) -> IndexedImages:
    """The evaluation images of ``dataset/`` (kinds: samples, folder, celeba_hq, imagenet_val, real)."""
    kind = str(dataset_cfg.get("name", "folder"))
    paths, names = dataset_paths(dataset_cfg)
    crop = bool(dataset_cfg.get("crop", True))
    if kind == "real":
        m = tuple(op.measurement_shape)
        if len(m) != 3 or m[0] not in (1, 3):
            raise ValueError(f"real inputs need an operator whose measurements are images; {type(op).__name__} "
                             f"measures shape {m}")
        ds = IndexedImages(paths, names, size=(m[1], m[2]), crop=crop, mode="gray" if m[0] == 1 else "rgb", key="y")
    else:
        ds = IndexedImages(paths, names, size=(shape[1], shape[2]), crop=crop, key="image")
    ds.check_files()
    return ds


def dataset_paths(dataset_cfg: dict[str, Any]) -> tuple[list[Path], list[str]]:
    """The image files of ``dataset/`` (path, list, subset, limit) and their output names."""
    kind = str(dataset_cfg.get("name", "folder"))
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; valid: {', '.join(DATASET_KINDS)}")
    path = dataset_cfg.get("path")
    if kind == "samples" and path is None:
        path = samples_dir()
    if path is None or path == "???":
        raise ValueError(f"dataset {kind!r} needs dataset.path=DIR")
    root = Path(str(path)).expanduser()
    if dataset_cfg.get("list"):
        paths = read_split_list(dataset_cfg["list"], root)
    else:
        paths = list_images(root, recursive=bool(dataset_cfg.get("recursive", True)))
    paths = select_subset(paths, dataset_cfg.get("subset"))
    paths = apply_limit(paths, dataset_cfg.get("limit"))
    if not paths:
        raise ValueError(f"dataset {kind!r} at {root} selects no images (check dataset.subset / dataset.limit)")
    return paths, image_names(paths, root)


def signature(plain: dict[str, Any]) -> dict[str, Any]:
    """The settings that determine the per-image results (a resumed run must match them)."""
    keys = ("mode", "seed", "task", "dataset", "model", "sampler", "solver", "eval")
    if plain.get("mode", "restore") != "restore":
        keys += ("optimize", "gradient")
    sig = {k: plain.get(k) for k in keys}
    if isinstance(sig.get("solver"), dict) and (plain.get("sampler") or {}).get("name") == "sequential":
        sig["solver"] = None  # the sequential sampler ignores the solver
    if isinstance(sig.get("dataset"), dict):
        sig["dataset"] = {k: v for k, v in sig["dataset"].items() if k not in ("num_workers", "limit")}
    if isinstance(sig.get("eval"), dict):
        sig["eval"] = {k: v for k, v in sig["eval"].items() if k not in ("fid", "fid_weights")}
    if (plain.get("chain") or {}).get("name", "ddnm") != "ddnm":
        sig["chain"] = plain["chain"]  # (ddnm runs keep the signature they had before chain/ existed)
    if isinstance(sig.get("sampler"), dict):  # grid keys at their defaults keep older runs' signatures
        smp = dict(sig["sampler"])
        if smp.get("t_start") is None:
            smp.pop("t_start", None)
        if smp.get("skip_type") != "karras":
            smp.pop("rho", None)
        sig["sampler"] = smp
    if isinstance(sig.get("task"), dict):  # task=generate: more images extend a run
        sig["task"] = {k: v for k, v in sig["task"].items() if k != "num_images"}
    if int(plain.get("num_samples", 1)) != 1:
        sig["num_samples"] = int(plain["num_samples"])
    return sig


def optimization_kwargs(mode: str, plain: dict[str, Any], shape: tuple[int, int, int]) -> dict[str, Any]:
    """Extra constructor arguments of the ``optimize_init`` / ``invert`` modules (none for ``restore``)."""
    if mode == "restore":
        return {}
    chain = str((plain.get("chain") or {}).get("name", "ddnm"))
    # unconditional inversion (the default) runs plain DDIM whatever the task's chain; through the task's own
    # measurement it needs the DDNM chain
    with_operator = bool((plain.get("optimize") or {}).get("invert_with_operator"))
    if mode == "invert" and with_operator and chain != "ddnm":
        raise ValueError(f"mode=invert with optimize.invert_with_operator=true inverts through the DDNM chain only; "
                         f"got chain={chain} (add chain=ddnm)")
    from deqir.optim.init_opt import check_optimizable

    check_optimizable(chain)  # mode=optimize_init: every chain (pigdm / dps through double backward)
    from deqir.deq.grad import DEQGradientConfig
    from deqir.lit.optimization import OptimizationSettings

    opt_cfg = dict(plain.get("optimize") or {})
    grad_cfg = dict(plain.get("gradient") or {})
    reference = None
    if opt_cfg.get("reference_path"):
        reference = load_reference(str(opt_cfg["reference_path"]), shape)
    return {"optimization": OptimizationSettings.from_config(opt_cfg),
            "gradient": DEQGradientConfig(**grad_cfg), "reference": reference}


def load_reference(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """A reference image (any format PIL reads) centre-cropped and resized to ``shape``: (1, C, H, W) on [-1, 1]."""
    from deqir.datasets.images import read_image, to_tensor

    img = to_tensor(read_image(path))[None]
    h, w = img.shape[-2:]
    s = min(h, w)
    img = img[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    img = torch.nn.functional.interpolate(img, size=shape[1:], mode="bicubic", align_corners=False, antialias=True)
    return img.clamp(0, 1) * 2 - 1
