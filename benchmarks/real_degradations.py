"""Restoring photos degraded *outside* deqir, beside the simulated ("inverse crime") rows, default model.

Each photo (the demo photos, or ``--folder``: the evaluation set, ``data/eval/128``, for claims) is cropped to
``--size`` x ``--width`` and degraded by code that is not deqir's operators: scipy.ndimage correlation with the
deblur task's kernel and ``mode="reflect"`` / ``"nearest"`` boundaries, PIL's GaussianBlur, the reflect blur
followed by JPEG at quality 90, PIL bicubic downsampling x4, JPEG at quality 90 restored by the inpainting tasks
(their masks drop pixels of a compressed photo); all saved as 8-bit pictures. ``deqir.restore`` restores them as a user's photos (``dataset=real``: the
valid-boundary blur, sigma_y estimated per photo). Columns: PSNR / LPIPS against the clean crop of the input
(the blurry photo; for SR its bicubic upscaling), of a baseline (deblurring: the same restoration with the
circular operator that deqir's simulations use, ``dataset.boundary=circular``; SR: PIL bicubic upscaling)
and of the restoration; the share of photos whose baseline / restoration was flagged inconsistent with its
input (the warning of ``per_image.csv``). The simulated rows
run ``deqir.evaluate`` (degraded by deqir's own operator) on the same crops.

    python benchmarks/real_degradations.py --json bench_results/real_degradations.json
    python benchmarks/real_degradations.py --folder data/eval/128 --images 24 --size 128 --width 112 --no-baseline
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402


def _blur_kernel() -> np.ndarray:
    from deqir.operators.registry import blur_kernel

    return blur_kernel("deblur_gauss", kernel_size=5, sigma=10.0).numpy()  # conf/task/deblur.yaml's kernel


def _to8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.round(a * 255), 0, 255).astype(np.uint8)


def scipy_blur(mode: str) -> Callable[[np.ndarray], np.ndarray]:
    import scipy.ndimage as ndi

    def run(x8: np.ndarray) -> np.ndarray:
        x, k = x8 / 255.0, _blur_kernel()
        return _to8(np.stack([ndi.correlate(x[..., c], k, mode=mode) for c in range(3)], axis=-1))

    return run


def pil_gaussian(radius: float) -> Callable[[np.ndarray], np.ndarray]:
    from PIL import Image, ImageFilter

    return lambda x8: np.asarray(Image.fromarray(x8).filter(ImageFilter.GaussianBlur(radius)))


def jpeg(quality: int, first: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    from PIL import Image

    def run(x8: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(first(x8)).save(buf, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))

    return run


def pil_bicubic_down(scale: int) -> Callable[[np.ndarray], np.ndarray]:
    from PIL import Image

    def run(x8: np.ndarray) -> np.ndarray:
        h, w = x8.shape[:2]
        return np.asarray(Image.fromarray(x8).resize((w // scale, h // scale), Image.Resampling.BICUBIC))

    return run


def pil_bicubic_up(y8: np.ndarray, scale: int) -> np.ndarray:
    from PIL import Image

    h, w = y8.shape[:2]
    return np.asarray(Image.fromarray(y8).resize((w * scale, h * scale), Image.Resampling.BICUBIC))


#: name -> (degradation, task, extra overrides, kind: "blur" | "sr4" | "inpaint")
DEGRADATIONS: dict[str, tuple[Callable, str, list[str], str]] = {
    "scipy reflect blur": (scipy_blur("reflect"), "deblur", [], "blur"),
    "scipy nearest blur": (scipy_blur("nearest"), "deblur", [], "blur"),
    "PIL GaussianBlur(1)": (pil_gaussian(1.0), "deblur_kernel",
                            ["task.params.kernel_path=null", "+task.params.kernel=gaussian",
                             "+task.params.kernel_size=7", "+task.params.sigma=1.0"], "blur"),
    "reflect blur + JPEG q90": (jpeg(90, scipy_blur("reflect")), "deblur", [], "blur"),
    "PIL bicubic x4 down": (pil_bicubic_down(4), "sr4", [], "sr4"),
    # a JPEG photo with pixels missing: the operator drops the pixels, the file's compression is not deqir's
    "JPEG q90, 50 % missing": (jpeg(90, np.asarray), "inpaint_random", [], "inpaint"),
    "JPEG q90, text mask": (jpeg(90, np.asarray), "inpaint_text", [], "inpaint"),
}
#: simulated rows: deqir's own operator (the benchmarks' "inverse crime"), through deqir.evaluate
SIMULATED = {"deqir deblur (simulated)": "deblur", "deqir sr4 (simulated)": "sr4"}


def crops(n: int, h: int, w: int, folder: Path | None = None) -> list[tuple[str, np.ndarray]]:
    """uint8 (h, w, 3) centre crops of the first n photos of ``folder`` (default: the demo photos)."""
    from deqir.datasets.images import read_image_uint8
    from deqir.lit.builders import samples_dir

    folder = samples_dir() if folder is None else Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--folder {folder} is not a directory; build the evaluation set with python data/eval_set.py")
    out = []
    for p in sorted(p for p in folder.iterdir() if p.suffix == ".png")[:n]:
        a = read_image_uint8(p)
        if a.shape[0] < h or a.shape[1] < w:
            raise ValueError(f"{p} is {a.shape[1]}x{a.shape[0]}, smaller than the crop {w}x{h}; lower --size / --width")
        top, left = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
        out.append((p.stem, np.ascontiguousarray(a[top : top + h, left : left + w])))
    return out


def _t(a8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a8)).permute(2, 0, 1).float() / 255.0


class Scores:
    """PSNR (8-bit, dB) and LPIPS (VGG, when its weights are available offline) against the clean crops."""

    def __init__(self):
        from deqir.metrics.perceptual import LPIPSMetric

        self.lpips = LPIPSMetric.create("vgg")

    def __call__(self, pred: torch.Tensor, clean: torch.Tensor) -> tuple[float, float | None]:
        from deqir.metrics.fidelity import psnr
        from deqir.utils.images import quantize

        pred = quantize(pred.clamp(0, 1))
        p = float(psnr(pred[None], clean[None]).mean())
        lp = float(self.lpips(pred[None], clean[None]).mean()) if self.lpips is not None else None
        return p, lp


def real_rows(args, score: Scores) -> list[dict]:
    import deqir

    photos = crops(args.images, args.size, args.width, args.folder)
    rows = []
    for name, (degrade, task, extra, kind) in DEGRADATIONS.items():
        if args.rows and name not in args.rows:
            continue
        over = [*args.override, *extra]
        acc: dict[str, list] = {k: [] for k in ("name", "in", "base", "out", "warn", "base_warn", "sigma")}
        start = time.perf_counter()
        for photo, x8 in photos:
            clean, y8 = _t(x8), degrade(x8)
            res = deqir.restore(_t(y8), task=task, overrides=over)
            acc["name"].append(photo)
            acc["out"].append(score(res.images[0], clean))
            acc["warn"].append(bool(res.stats[0].get("warning")))
            acc["sigma"].append(res.stats[0]["sigma_y"])
            if kind == "sr4":
                acc["in"].append(score(_t(pil_bicubic_up(y8, 4)), clean))
                acc["base"].append(acc["in"][-1])
            elif kind == "inpaint":  # the input: the measured pixels of the JPEG photo, zeros elsewhere (A+ y)
                acc["in"].append(score(res.inputs[0], clean))
            else:
                acc["in"].append(score(_t(y8), clean))
                if args.no_baseline:
                    continue
                base = deqir.restore(_t(y8), task=task, overrides=[*over, "dataset.boundary=circular"])
                acc["base"].append(score(base.images[0], clean))
                acc["base_warn"].append(bool(base.stats[0].get("warning")))
        note = {"sr4": "input = bicubic up", "inpaint": "input = A+ y"}.get(kind, "baseline = circular operator")
        rows.append(_row(name, task, note,
                         acc, time.perf_counter() - start, len(photos)))
    for name, task in SIMULATED.items():
        if args.rows and name not in args.rows:
            continue
        acc = {k: [] for k in ("name", "in", "base", "out", "warn", "base_warn", "sigma")}
        start = time.perf_counter()
        for photo, x8 in photos:
            clean = _t(x8)
            acc["name"].append(photo)
            res = deqir.evaluate(clean[None], task=task, overrides=[*args.override, "eval.lpips=null"])
            acc["in"].append(score(res.inputs[0], clean))
            acc["out"].append(score(res.images[0], clean))
        rows.append(_row(name, task, "input = A+ y picture", acc, time.perf_counter() - start, len(photos)))
    return rows


def _row(name: str, task: str, note: str, acc: dict, seconds: float, n: int) -> dict:
    def mean(key: str, j: int):
        vals = [v[j] for v in acc[key] if v[j] is not None]
        return float(np.mean(vals)) if vals else None

    return {"degradation": name, "task": task, "note": note, "images": n,
            "psnr_input": mean("in", 0), "lpips_input": mean("in", 1),
            "psnr_baseline": mean("base", 0) if acc["base"] else None,
            "lpips_baseline": mean("base", 1) if acc["base"] else None,
            "psnr_restored": mean("out", 0), "lpips_restored": mean("out", 1),
            "sigma_y": float(np.mean(acc["sigma"])) if acc["sigma"] else None,
            "flagged": f"{sum(acc['warn'])}/{n}" if acc["warn"] else None,
            "baseline_flagged": f"{sum(acc['base_warn'])}/{n}" if acc["base_warn"] else None,
            "seconds_per_image": seconds / n,
            "per_image": [{"name": nm, "psnr_input": acc["in"][i][0], "lpips_input": acc["in"][i][1],
                           "psnr_restored": acc["out"][i][0], "lpips_restored": acc["out"][i][1]}
                          for i, nm in enumerate(acc["name"])]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3, help="photos (the first N of --folder)")
    ap.add_argument("--folder", type=Path, default=None,
                    help="photos to degrade (default: the demo photos; claims: data/eval/128, >= 24 photos)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the circular-operator baseline (half the time)")
    ap.add_argument("--size", type=int, default=64, help="crop height")
    ap.add_argument("--width", type=int, default=56, help="crop width (not square on purpose)")
    ap.add_argument("--rows", nargs="*", default=None, help="only these rows (names as in the table)")
    ap.add_argument("--override", nargs="*", default=["sampler=sequential"],
                    help="invert.py overrides for every run (default: the sequential chain, CPU-friendly)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = real_rows(args, Scores())
    print_table(rows, [("degradation", "degradation", ""), ("task", "task", ""),
                       ("psnr_input", "input PSNR", ".2f"), ("lpips_input", "LPIPS", ".3f"),
                       ("psnr_baseline", "baseline PSNR", ".2f"), ("lpips_baseline", "LPIPS", ".3f"),
                       ("baseline_flagged", "flagged", ""),
                       ("psnr_restored", "restored PSNR", ".2f"), ("lpips_restored", "LPIPS", ".3f"),
                       ("sigma_y", "σ_y est.", ".4f"), ("flagged", "flagged", ""),
                       ("seconds_per_image", "s/img", ".1f")])
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"machine": machine_info(torch.device("cpu")), "settings": settings, "rows": rows}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
