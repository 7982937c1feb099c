"""The ADM UNet (Dhariwal & Nichol 2021), state-dict layout of guided-diffusion's ``UNetModel``.

Module names, registration order and shapes follow checkpoint-manifests (b), so
``256x256_diffusion_uncond.pt`` loads with ``strict=True``. Constructor arguments are the ``UNetModel``
arguments with the same names and meanings (``attention_resolutions`` are downsample rates ``ds``, not
pixel sizes). Implemented from the manifest facts, not from the reference source.

``use_fp16=True`` reproduces the reference mixed-precision path (``convert_to_fp16``): the weight and bias
of every Conv1d/Conv2d inside ``input_blocks``, ``middle_block`` and ``output_blocks`` are stored in
float16; the input is cast to float16; GroupNorm computes in float32 and casts back; the embedding
projection is cast to the activation dtype; the attention softmax runs in float32; activations return
to the input dtype before ``out``. The torso dtype is read from the weights at call time, so
``model.float()`` turns the same module into the pure float32 network.

Extension that does not change the state dict: inputs of any size are reflect-padded to a multiple of
``2 ** (levels - 1)`` and cropped back.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deqir.diffusion.schedule import timestep_embedding
from deqir.models.common import as_timesteps, crop_to, pad_to_multiple


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C, eps=1e-5) computed in float32 and returned in the input dtype."""

    def __init__(self, channels: int):
        super().__init__(num_groups=32, num_channels=channels, eps=1e-5, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class Upsample(nn.Module):
    """Nearest x2, then an optional 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Strided 3x3 conv (``op``) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """GN-SiLU-[resample]-conv, embedding injection (add, or GN(h)(1 + scale) + shift), GN-SiLU-drop-conv, skip.

    Args:
        channels, out_channels: input and output channels. emb_channels: embedding width.
        up, down: resample both branches (nearest x2 / avg-pool) between the first GN-SiLU and conv.
        use_conv: 3x3 instead of 1x1 skip conv when channels change.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            kernel = 3 if use_conv else 1
            self.skip_connection = nn.Conv2d(channels, out_channels, kernel, padding=kernel // 2)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x (B, C, H, W), emb (B, E) -> (B, C_out, H', W')."""
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    """Multi-head dot-product attention on a packed (B, 3 H c, T) qkv; q and k each scaled by c^(-1/4).

    ``legacy=True``: channels grouped per head as [q_h | k_h | v_h] (``QKVAttentionLegacy``);
    ``legacy=False``: [all q | all k | all v] (``QKVAttention``, the new order). Softmax in float32.
    """

    def __init__(self, num_heads: int, legacy: bool = True):
        super().__init__()
        self.num_heads, self.legacy = num_heads, legacy

    def forward(self, qkv: Tensor) -> Tensor:
        b, width, length = qkv.shape
        c = width // (3 * self.num_heads)
        if self.legacy:
            q, k, v = qkv.reshape(b * self.num_heads, 3 * c, length).split(c, dim=1)
        else:
            q, k, v = (z.reshape(b * self.num_heads, c, length) for z in qkv.chunk(3, dim=1))
        s = 1.0 / math.sqrt(math.sqrt(c))
        w = torch.bmm((q * s).transpose(1, 2), k * s)  # (B H, T, S)
        w = torch.softmax(w.float(), dim=-1).to(w.dtype)
        a = torch.bmm(v, w.transpose(1, 2))  # (B H, c, T)
        return a.reshape(b, -1, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention: GN, 1x1 Conv1d ``qkv``, heads, 1x1 Conv1d ``proj_out``, residual."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            heads = num_heads
        elif channels % num_head_channels != 0:
            raise ValueError(f"channels {channels} are not divisible by num_head_channels {num_head_channels}")
        else:
            heads = channels // num_head_channels
        self.num_heads = heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttention(heads, legacy=not use_new_attention_order)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, hh * ww)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, hh, ww)


class EmbedSequential(nn.Sequential):
    """Sequential whose ResBlocks also receive the timestep embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """eps = model(x, t): x (B, in_channels, H, W) on [-1, 1], t (B,) integer steps -> (B, out_channels, H, W).

    With learned variance (``out_channels = 2 * in_channels``) the first half of the output channels is
    ε and the second half the variance interpolation v; :class:`deqir.models.adapters.LearnedSigmaSplit`
    keeps ε. Arguments are those of guided-diffusion's ``UNetModel``.

    Args:
        image_size: nominal resolution (kept for config compatibility; any size works).
        in_channels, model_channels, out_channels: channel counts.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attention_resolutions: downsample rates ``ds`` (1, 2, 4, ...) at which attention is added.
        dropout: dropout in the ResBlocks. channel_mult: channel multiplier per level.
        conv_resample: learned 3x3 conv in plain up/downsamplers. dims: must be 2.
        num_classes: class-conditional label embedding (then call ``model(x, t, y=labels)``).
        use_checkpoint: gradient checkpointing of every block (only when grad is enabled).
        use_fp16: store the torso convolutions in float16 (``convert_to_fp16``).
        num_heads, num_head_channels, num_heads_upsample: heads (``num_head_channels`` wins when not -1).
        use_scale_shift_norm: FiLM-style embedding injection. resblock_updown: resample inside ResBlocks.
        use_new_attention_order: [q|k|v] instead of the legacy per-head qkv layout.
    """

    def __init__(
        self,
        image_size: int = 256,
        in_channels: int = 3,
        model_channels: int = 256,
        out_channels: int = 6,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (8, 16, 32),
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if dims != 2:
            raise ValueError(f"only dims=2 is supported, got {dims}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_resolutions, channel_mult = set(attention_resolutions), tuple(channel_mult)
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        self.num_levels, self.use_checkpoint = len(channel_mult), use_checkpoint
        emb_dim = 4 * model_channels

        def res(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch_: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch_, heads, num_head_channels, use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(EmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)
        if use_fp16:
            self.convert_to_fp16()

    def _torso(self) -> tuple[nn.Module, ...]:
        return (self.input_blocks, self.middle_block, self.output_blocks)

    def convert_to_fp16(self) -> ADMUNet:
        """Store the weight and bias of every Conv1d/Conv2d in the torso in float16 (in place)."""
        return self._convert_torso(torch.float16)

    def convert_to_fp32(self) -> ADMUNet:
        """Undo :meth:`convert_to_fp16`."""
        return self._convert_torso(torch.float32)

    def _convert_torso(self, dtype: torch.dtype) -> ADMUNet:
        for part in self._torso():
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.to(dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype of the torso (float16 after :meth:`convert_to_fp16`)."""
        return self.input_blocks[0][0].weight.dtype

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Args: x (B, C, H, W); t (B,) or scalar timesteps; y (B,) class labels if ``num_classes``.

        Returns: (B, out_channels, H, W) in the dtype of ``x``.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass class labels y if and only if the model is class-conditional (num_classes)")
        t = as_timesteps(t, x.shape[0], x.device)
        x, size = pad_to_multiple(x, 2 ** (self.num_levels - 1))
        emb = timestep_embedding(t, self.model_channels, "adm").to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(emb)
        if y is not None:
            emb = emb + self.label_emb(y)

        hs, h = [], x.to(self.dtype)
        for block in self.input_blocks:
            h = self._run(block, h, emb)
            hs.append(h)
        h = self._run(self.middle_block, h, emb)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb)
        h = self.out(h.to(self.out[2].weight.dtype))
        return crop_to(h.to(x.dtype), size)

    def _run(self, block: EmbedSequential, h: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)
