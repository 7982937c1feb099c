"""Zero-shot image restoration with DeqIR: ``python invert.py task=deblur`` (see docs/app.md).

Examples:
    python invert.py task=sr4 dataset=folder dataset.path=photos/ dataset.size=256
    python invert.py experiment=deqir_celeba_deblur dataset.path=$DATA/celeba_hq
    python invert.py --help                       # config groups and options

Outputs go to the Hydra run directory; rerunning into the same ``hydra.run.dir=...`` resumes.
Known input problems end with one ``error: ...`` line and exit status 2 (``DEQIR_TRACEBACK=1`` shows
the traceback).
"""
from __future__ import annotations

import os
import sys
import warnings

import hydra
from omegaconf import DictConfig


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if "Original Traceback" in text:  # raised inside a DataLoader worker: keep the original message
        text = [ln for ln in text.splitlines() if ln.strip()][-1]
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


# conf/hydra/launcher/submitit_slurm.yaml is typed by the plugin's schema of the same name (intended).
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")


@hydra.main(version_base="1.3", config_path="conf", config_name="invert")
def main(cfg: DictConfig) -> float | None:
    from deqir.lit.app import USER_ERRORS, run_invert
    from deqir.lit.stopping import RunStopped

    try:
        summary = run_invert(cfg)
    except RunStopped as stop:  # SIGTERM / SIGINT / SLURM pre-emption: finished images are kept
        if os.environ.get("DEQIR_TRACEBACK"):
            raise
        if stop.rank == 0:
            print(stop.message(), file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except USER_ERRORS as err:
        if os.environ.get("DEQIR_TRACEBACK"):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
    return None if not summary else summary.get("objective")  # what a sweeper optimises (objective/, docs/app.md)


if __name__ == "__main__":
    from deqir.lit.writer import run_dir_problem

    if (problem := run_dir_problem(sys.argv[1:])) is not None:  # before Hydra creates the run directory
        print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()
