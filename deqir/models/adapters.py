"""Adapters that turn foreign networks into the deqir ε-model contract ``eps = model(x, t)``.

* :class:`LearnedSigmaSplit`: keep the first C of 2C output channels (ADM ``learn_sigma``).
* :class:`AutocastEps`: run a network under ``torch.autocast`` and return float32.
* :class:`DiffusersEps`: any diffusers ``UNet2DModel`` (extra ``hub``).
* :class:`StridePadded`: any size for a UNet that needs sides divisible by its downsampling factor.
* :class:`EpsModel`: what :func:`deqir.models.load_eps_model` returns; all of the above in one module,
  plus the metadata (arch, config, schedule, source) of the loaded network.
* :func:`ddpm_state_dict_to_diffusers` / :func:`ddpm_config_to_diffusers`: the DDPM ``Model`` layout
  (``celeba_hq.ckpt``, :class:`DDPMUNet`) as a diffusers ``UNet2DModel`` (checkpoint-manifests (c)).
"""
from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deqir.models.common import as_timesteps


def num_params(module: nn.Module) -> int:
    """Number of parameter elements (meta tensors count too)."""
    return sum(p.numel() for p in module.parameters())


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class LearnedSigmaSplit(nn.Module):
    """ε from a learned-variance network: (B, 2C, H, W) -> the first C channels, (B, C, H, W).

    Args:
        model: network called as ``model(x, t)``.
        channels: C, the image channels (the output may also already have exactly C channels).
    """

    def __init__(self, model: nn.Module, channels: int):
        super().__init__()
        self.model, self.channels = model, channels

    def forward_with_variance(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Returns (ε (B, C, H, W), v (B, C, H, W) or None): v is the log-variance interpolation in [-1, 1]."""
        out = self.model(x, t)
        c = out.shape[1]
        if c == self.channels:
            return out, None
        if c != 2 * self.channels:
            raise ValueError(f"expected {self.channels} or {2 * self.channels} output channels, got {c}")
        return out[:, : self.channels], out[:, self.channels:]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.forward_with_variance(x, t)[0]


class AutocastEps(nn.Module):
    """Run ``model(x, t)`` under ``torch.autocast(dtype)`` (no autocast for float32); output float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model, self.compute_dtype = model, dtype

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        with _autocast(x.device, self.compute_dtype):
            out = self.model(x, t)
        return out.float()


class DiffusersEps(nn.Module):
    """A diffusers ``UNet2DModel`` as ``eps = model(x, t)`` (returns all of its output channels).

    Args:
        unet: a ``diffusers.UNet2DModel`` (or any module returning an object with ``.sample``).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        cfg = getattr(unet, "config", {})
        self.in_channels = int(cfg.get("in_channels", 3))
        self.out_channels = int(cfg.get("out_channels", self.in_channels))

    @classmethod
    def from_pretrained(cls, name_or_path: str, subfolder: str | None = None, **kwargs: Any) -> DiffusersEps:
        """Load ``UNet2DModel.from_pretrained`` (a local directory, or a hub id when online).

        A pipeline directory that keeps the UNet in ``unet/`` is detected when ``subfolder`` is None.
        """
        try:
            from diffusers import UNet2DModel
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("diffusers models need the 'hub' extra: pip install 'deqir[hub]'") from err

        root = Path(name_or_path).expanduser()
        if subfolder is None and root.is_dir() and not (root / "config.json").exists() \
                and (root / "unet" / "config.json").exists():
            subfolder = "unet"
        if subfolder:
            kwargs["subfolder"] = subfolder
        return cls(UNet2DModel.from_pretrained(str(root) if root.exists() else name_or_path, **kwargs))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x (B, C, H, W), t (B,) -> (B, out_channels, H, W)."""
        return self.unet(x, as_timesteps(t, x.shape[0], x.device)).sample


class StridePadded(nn.Module):
    """``eps = model(x, t)`` for any H x W: x is padded (reflect; replicate where a side is shorter than the pad)
    at the bottom and right to multiples of ``stride``, the UNet runs on that, ε is cropped back to H x W.

    The chain and its operator keep the photo's own size (docs/app.md, "Your own photos"); only the network
    sees the padded image. ``info`` and ``schedule`` are the wrapped model's.
    """

    def __init__(self, model: nn.Module, stride: int):
        super().__init__()
        self.model, self.stride = model, int(stride)
        self.info = getattr(model, "info", {})
        self.schedule = getattr(model, "schedule", None)

    def forward(self, x: Tensor, t: Tensor | int | float) -> Tensor:
        h, w = x.shape[-2:]
        ph, pw = -h % self.stride, -w % self.stride
        if ph == 0 and pw == 0:
            return self.model(x, t)
        mode = "reflect" if ph < h and pw < w else "replicate"
        eps = self.model(torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode), t)
        return eps[..., :h, :w]


class EpsModel(nn.Module):
    """The deqir ε-model: ``eps = model(x, t)`` with x (B, C, H, W) on [-1, 1] and t (B,) steps 0...999.

    Returns float32 ε of shape (B, C, H, W), C = ``in_channels``; learned-variance channels are dropped.

    Args:
        net: the raw network (``net(x, t)`` -> (B, C or 2C, H, W)); its state dict has the reference keys.
        in_channels: C.
        dtype: autocast dtype for the forward pass (float32 = none). The ADM reference fp16 path is
            a property of ``net`` (``use_fp16``), not of this wrapper.
        info: metadata kept for :meth:`describe`: name, arch, config, source, ckpt_path.
        schedule: the training noise schedule ``{"name", "num_steps", "beta_start", "beta_end"}``.
    """

    def __init__(self, net: nn.Module, in_channels: int, dtype: torch.dtype = torch.float32,
                 info: Mapping[str, Any] | None = None, schedule: Mapping[str, Any] | None = None):
        super().__init__()
        self.net, self.in_channels, self.compute_dtype = net, in_channels, dtype
        self.info = dict(info or {})
        self.schedule = dict(schedule or {"name": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02})

    def raw(self, x: Tensor, t: Tensor | int | float) -> Tensor:
        """All output channels of the network, float32: (B, C or 2C, H, W)."""
        t = as_timesteps(t, x.shape[0], x.device)
        with _autocast(x.device, self.compute_dtype):
            out = self.net(x, t)
        return out.float()

    def forward(self, x: Tensor, t: Tensor | int | float) -> Tensor:
        out = self.raw(x, t)
        c = out.shape[1]
        if c not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(f"network returned {c} channels for {self.in_channels} input channels")
        return out[:, : self.in_channels]

    @property
    def learned_sigma(self) -> bool:
        out = getattr(self.net, "out_channels", self.in_channels)
        return int(out) == 2 * self.in_channels

    def describe(self) -> dict[str, Any]:
        """Plain-value summary: name, arch, source, ckpt_path, parameters, dtypes, channels, config."""
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in self.net.parameters()})
        return {**self.info, "num_params": num_params(self.net), "param_dtypes": dtypes,
                "compute_dtype": str(self.compute_dtype).replace("torch.", ""), "in_channels": self.in_channels,
                "learned_sigma": self.learned_sigma, "schedule": dict(self.schedule)}

    def extra_repr(self) -> str:
        return f"name={self.info.get('name')!r}, arch={self.info.get('arch')!r}, params={num_params(self.net):,}"


def diffusers_schedule(root: Path) -> dict[str, Any] | None:
    """The noise schedule from a local ``scheduler_config.json`` (pipeline layout or flat), if any."""
    names = {"linear": "linear", "scaled_linear": "quad", "squaredcos_cap_v2": "cosine"}
    for path in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if path.is_file():
            cfg = json.loads(path.read_text())
            if cfg.get("beta_schedule", "linear") in names:
                return {"name": names[cfg.get("beta_schedule", "linear")],
                        "num_steps": int(cfg.get("num_train_timesteps", 1000)),
                        "beta_start": float(cfg.get("beta_start", 1e-4)), "beta_end": float(cfg.get("beta_end", 0.02))}
    return None


# ---------------------------------------------------------------------------------------------------------
# DDPM ``Model`` layout <-> diffusers ``UNet2DModel`` (checkpoint-manifests (c), key-map rules)

_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
           "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ddpm_key_to_diffusers(key: str, num_levels: int) -> str:
    """One DDPM ``Model`` state-dict key -> the ``UNet2DModel`` key (``up.i`` -> ``up_blocks.(L-1-i)``)."""
    fixed = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
             "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
    module, _, leaf = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{leaf}"
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", module):
        side, level, kind, j, sub = m.groups()
        i = int(level) if side == "down" else num_levels - 1 - int(level)
        prefix = f"{side}_blocks.{i}"
        if kind == "block":
            return f"{prefix}.resnets.{j}.{_RESNET[sub]}.{leaf}"
        return f"{prefix}.attentions.{j}.{_ATTN[sub]}.{leaf}"
    if m := re.fullmatch(r"down\.(\d+)\.downsample\.conv", module):
        return f"down_blocks.{m.group(1)}.downsamplers.0.conv.{leaf}"
    if m := re.fullmatch(r"up\.(\d+)\.upsample\.conv", module):
        return f"up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{leaf}"
    if m := re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(\w+)", module):
        part, sub = m.groups()
        if part == "attn_1":
            return f"mid_block.attentions.0.{_ATTN[sub]}.{leaf}"
        return f"mid_block.resnets.{int(part[-1]) - 1}.{_RESNET[sub]}.{leaf}"
    raise ValueError(f"not a DDPM Model state-dict key: {key!r}")


def ddpm_state_dict_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a DDPM ``Model`` state dict to ``UNet2DModel`` keys; attention weights (C, C, 1, 1) -> (C, C)."""
    levels = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("down."))
    out = {}
    for key, value in state_dict.items():
        new = ddpm_key_to_diffusers(key, levels)
        if ".attentions." in new and new.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def ddpm_config_to_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`DDPMUNet` keyword arguments -> ``UNet2DModel`` keyword arguments of the same network."""
    if not config.get("resamp_with_conv", True):
        raise ValueError("UNet2DModel has no avg-pool DownBlock2D: resamp_with_conv=False cannot be converted")
    ch, mult = int(config.get("ch", 128)), list(config.get("ch_mult", (1, 1, 2, 2, 4, 4)))
    res, attn = int(config.get("resolution", 256)), set(config.get("attn_resolutions", (16,)))
    has_attn = [res // 2**i in attn for i in range(len(mult))]
    return {
        "sample_size": res, "in_channels": int(config.get("in_channels", 3)),
        "out_channels": int(config.get("out_ch", 3)), "center_input_sample": False,
        "time_embedding_type": "positional", "freq_shift": 1, "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "block_out_channels": [ch * m for m in mult], "layers_per_block": int(config.get("num_res_blocks", 2)),
        "mid_block_scale_factor": 1, "downsample_padding": 0, "dropout": float(config.get("dropout", 0.0)),
        "act_fn": "silu", "attention_head_dim": None, "norm_num_groups": 32, "norm_eps": 1e-6,
        "add_attention": bool(config.get("mid_attn", True)),
    }
