"""ε-models: the reference UNets, adapters to the ``eps = model(x, t)`` contract, and safe loading.

>>> from deqir.models import load_eps_model
>>> model = load_eps_model("adm", {"model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
...                               "attention_resolutions": [2], "channel_mult": [1, 2],
...                               "num_head_channels": 16}, "random")
>>> model(torch.zeros(2, 3, 32, 32), torch.tensor([999, 0])).shape  # learned sigma split off
torch.Size([2, 3, 32, 32])
"""
from __future__ import annotations

import torch  # noqa: F401  (doctest namespace)

from deqir.models.adapters import (
    AutocastEps,
    DiffusersEps,
    EpsModel,
    LearnedSigmaSplit,
    ddpm_config_to_diffusers,
    ddpm_key_to_diffusers,
    ddpm_state_dict_to_diffusers,
    num_params,
)
from deqir.models.adm_unet import ADMUNet
from deqir.models.ddpm_unet import DDPMUNet
from deqir.models.export import save_eps_model
from deqir.models.factory import ARCHITECTURES, build_model
from deqir.models.loading import (
    KNOWN_MODELS,
    RANDOM,
    extract_state_dict,
    fitting_configs,
    init_random_,
    known_model_configs,
    load_eps_model,
    load_weights,
    packaged_default_path,
    read_checkpoint,
)

__all__ = [
    "ADMUNet", "ARCHITECTURES", "AutocastEps", "DDPMUNet", "DiffusersEps", "EpsModel", "KNOWN_MODELS",
    "LearnedSigmaSplit", "RANDOM", "build_model", "ddpm_config_to_diffusers", "ddpm_key_to_diffusers",
    "ddpm_state_dict_to_diffusers", "extract_state_dict", "fitting_configs", "init_random_",
    "known_model_configs", "load_eps_model", "load_weights", "num_params", "packaged_default_path",
    "read_checkpoint", "save_eps_model",
]
