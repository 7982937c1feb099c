"""Train an eps-prediction diffusion model: ``python train.py [model=...] [train_data=folder train_data.folder=DIR]``.

Its configuration tree is ``conf_train/`` (``python train.py --help``). Resumable: rerun with the same ``hydra.run.dir=...`` and training continues from its last checkpoint.
The EMA weights are exported in fp16 to ``export_path``; that file loads in ``invert.py`` with
``model.ckpt_path=...``.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf_train", config_name="train")
def main(cfg: DictConfig) -> None:
    from deqir.lit.train_app import run_training

    run_training(cfg)


if __name__ == "__main__":
    main()
