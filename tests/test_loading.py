"""Checkpoint loading: containers, strictness, clear errors, Hydra model configs, diffusers (docs/models.md)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from deqir.models import (
    DDPMUNet,
    ddpm_config_to_diffusers,
    ddpm_key_to_diffusers,
    ddpm_state_dict_to_diffusers,
    init_random_,
    load_eps_model,
    save_eps_model,
)
from deqir.models import loading
from deqir.models.loading import KNOWN_MODELS
from manifests import golden_config, golden_io, golden_state_dict, manifest, save_golden_state_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "model"
CELEBA_URL = "https://image-editing-test-12345.s3-us-west-2.amazonaws.com/checkpoints/celeba_hq.ckpt"
ADM_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"


def model_cfg(name: str, **overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)
    return {**cfg, **overrides}


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    cfg = model_cfg("tiny_ddpm")
    return init_random_(DDPMUNet(**cfg["config"]), seed=7).state_dict()


def _x() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 3])


def _assert_loads_tiny(path: Path, sd: dict, **kw) -> None:
    cfg = model_cfg("tiny_ddpm", ckpt_path=str(path), **kw)
    model = load_eps_model(**cfg)
    for k, v in sd.items():
        assert torch.equal(model.net.state_dict()[k], v.float()), k


# ---------------------------------------------------------------------------------------------------------
# containers


@pytest.mark.parametrize("arch", ["ddpm", "adm"])
def test_golden_state_dicts_through_load_eps_model(tmp_path, arch):
    path = save_golden_state_dict(arch, tmp_path / f"{arch}_small_state_dict.pt")  # the fixture file, bit for bit
    model = load_eps_model(arch, golden_config(arch), path)
    io = golden_io(arch)
    with torch.no_grad():
        for case in ("case_a", "case_b"):
            out = model(io[case]["x"], io[case]["t"])
            torch.testing.assert_close(out, io[case]["out"][:, :3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wrap", ["flat", "module", "state_dict", "ema_and_model", "ddim_list", "compiled"])
def test_state_dict_containers(tmp_path, tiny_sd, wrap):
    decoy = {k: torch.zeros_like(v) for k, v in tiny_sd.items()}
    obj = {
        "flat": tiny_sd,
        "module": {f"module.{k}": v for k, v in tiny_sd.items()},
        "state_dict": {"state_dict": tiny_sd, "epoch": 3, "optimizer": {"lr": 0.1}},
        "ema_and_model": {"model": decoy, "ema": {f"module.{k}": v for k, v in tiny_sd.items()}, "step": 5},
        "ddim_list": [decoy, {"state": {}}, 10, 100, tiny_sd],
        "compiled": {f"_orig_mod.{k}": v for k, v in tiny_sd.items()},
    }[wrap]
    torch.save(obj, tmp_path / "w.pt")
    _assert_loads_tiny(tmp_path / "w.pt", tiny_sd)


def test_lightning_checkpoint_prefers_ema_and_reads_its_config(tmp_path):
    """A checkpoint shaped like our train.py's (Lightning): raw + EMA weights, hparams, loop state."""
    pl = pytest.importorskip("pytorch_lightning")
    from deqir.lit.training import DiffusionTrainingModule

    cfg = model_cfg("tiny_ddpm")
    module = DiffusionTrainingModule("ddpm", cfg["config"], cfg["schedule"])
    init_random_(module.ema, seed=3)
    ckpt = {"epoch": 0, "global_step": 3, "pytorch-lightning_version": pl.__version__,
            "state_dict": module.state_dict(),
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1}}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "x.ckpt", "best_model_score": None}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.999), "params": [0]}]}],
            "lr_schedulers": [{"base_lrs": [5e-4], "last_epoch": 3}], "hparams_name": "kwargs",
            "hyper_parameters": dict(module.hparams)}
    torch.save(ckpt, tmp_path / "last.ckpt")
    model = load_eps_model(ckpt_path=tmp_path / "last.ckpt")  # arch and config come from the checkpoint
    assert model.describe()["source"] == "Lightning checkpoint, EMA weights"
    assert model.describe()["config"] == cfg["config"]
    for k, v in module.ema.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v)


def test_deqir_model_file_is_cast_and_self_describing(tmp_path, tiny_sd):
    cfg = model_cfg("tiny_ddpm")
    path = save_eps_model(tmp_path / "m.pt", "ddpm", cfg["config"], tiny_sd, meta={"torch": torch.__version__})
    model = load_eps_model(ckpt_path=path)
    assert model.describe()["param_dtypes"] == ["float32"] and model.describe()["arch"] == "ddpm"
    for k, v in tiny_sd.items():
        assert torch.equal(model.net.state_dict()[k], v.half().float())


def test_safetensors_and_config_autodetection(tmp_path, tiny_sd):
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(tiny_sd, str(tmp_path / "w.safetensors"))
    model = load_eps_model(ckpt_path=tmp_path / "w.safetensors")  # no config: the tiny_ddpm yaml fits
    assert model.describe()["config"] == model_cfg("tiny_ddpm")["config"]


def test_packaged_default_path(tmp_path, monkeypatch, tiny_sd):
    default = KNOWN_MODELS["default"]
    sd = init_random_(DDPMUNet(**default["config"]), seed=0).state_dict()
    save_eps_model(tmp_path / "default_ema_fp16.pt", "ddpm", default["config"], sd)
    monkeypatch.setattr(loading, "packaged_default_path", lambda: tmp_path / "default_ema_fp16.pt")
    model = load_eps_model(**OmegaConf.to_container(OmegaConf.load(CONF / "default.yaml")))
    assert model.describe()["name"] == "default" and model(*_x()).shape == (2, 3, 32, 32)
    monkeypatch.setattr(loading, "packaged_default_path", lambda: tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match="packaged default weights are missing"):
        load_eps_model()
    with pytest.raises(ValueError, match="packaged default weights"):
        load_eps_model("adm", None, None)


def test_non_strict_loading_allows_missing_keys(tmp_path, tiny_sd):
    partial = {k: v for k, v in tiny_sd.items() if not k.startswith("conv_out")}
    torch.save(partial, tmp_path / "p.pt")
    with pytest.raises(ValueError, match="2 missing keys"):
        load_eps_model(**model_cfg("tiny_ddpm", ckpt_path=str(tmp_path / "p.pt")))
    model = load_eps_model(**model_cfg("tiny_ddpm", ckpt_path=str(tmp_path / "p.pt"), strict=False))
    assert torch.equal(model.net.state_dict()["conv_in.weight"], tiny_sd["conv_in.weight"])


# ---------------------------------------------------------------------------------------------------------
# errors


def test_wrong_architecture_names_counts_keys_and_the_fitting_config(tmp_path, tiny_sd):
    torch.save(tiny_sd, tmp_path / "ddpm.pt")
    with pytest.raises(ValueError) as err:
        load_eps_model(**model_cfg("tiny_adm", ckpt_path=str(tmp_path / "ddpm.pt")))
    msg = str(err.value)
    n_adm = len(loading._meta_model("adm", model_cfg("tiny_adm")["config"]).state_dict())
    assert "\n" not in msg and f"{n_adm} missing keys (time_embed.0.weight" in msg
    assert f"{len(tiny_sd)} unexpected keys (temb.dense.0.weight" in msg
    assert "fits the known model config 'tiny_ddpm' (arch 'ddpm')" in msg


def test_full_size_mismatch_is_recognised_without_real_weights(tmp_path):
    """A meta-tensor copy of the celeba_hq.ckpt layout (no data) loaded as the ADM: the hint names celeba_hq_ddpm."""
    sd = loading._meta_model("ddpm", KNOWN_MODELS["celeba_hq_ddpm"]["config"]).state_dict()
    torch.save(sd, tmp_path / "celeba_layout.pt")
    with pytest.raises(ValueError, match=r"566 missing keys .* 450 unexpected keys .* 'celeba_hq_ddpm'"):
        load_eps_model(**model_cfg("imagenet256_adm", ckpt_path=str(tmp_path / "celeba_layout.pt")))


def test_shape_mismatch_and_unknown_layout(tmp_path, tiny_sd):
    torch.save(tiny_sd, tmp_path / "w.pt")
    cfg = model_cfg("tiny_ddpm", ckpt_path=str(tmp_path / "w.pt"))
    cfg["config"]["out_ch"] = 6
    expected = r"2 shape mismatches \(conv_out.weight: file \(3, 32, 3, 3\) vs model \(6, 32, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        load_eps_model(**cfg)
    odd = {k: v for k, v in tiny_sd.items() if not k.startswith("mid.attn_1")}
    torch.save(odd, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="No known model config fits it"):
        load_eps_model(**model_cfg("tiny_ddpm", ckpt_path=str(tmp_path / "odd.pt")))
    with pytest.raises(ValueError, match="cannot tell the architecture"):
        load_eps_model(ckpt_path=tmp_path / "odd.pt")


@pytest.mark.parametrize(("name", "file", "url"), [("celeba_hq_ddpm", "celeba_hq.ckpt", CELEBA_URL),
                                                  ("imagenet256_adm", "256x256_diffusion_uncond.pt", ADM_URL)])
def test_missing_known_checkpoint_names_url_and_destination(tmp_path, monkeypatch, name, file, url):
    monkeypatch.setenv("DEQIR_CHECKPOINTS", str(tmp_path / "ckpts"))
    cfg = model_cfg(name)
    assert cfg["ckpt_path"] == f"{tmp_path}/ckpts/{file}"
    with pytest.raises(FileNotFoundError) as err:
        load_eps_model(**cfg)
    msg = str(err.value)
    assert url in msg and f"save it as {tmp_path}/ckpts/{file}" in msg and "\n" not in msg
    # a renamed copy is still recognised by its config
    with pytest.raises(FileNotFoundError, match=url):
        load_eps_model(cfg["arch"], cfg["config"], tmp_path / "renamed.pt")


def test_missing_unknown_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="Set model.ckpt_path to an existing file"):
        load_eps_model(**model_cfg("tiny_adm", ckpt_path=str(tmp_path / "nope.pt")))


class Payload:  # a pickled object that would run code on unpickling
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("kind", ["object_in_dict", "whole_module"])
def test_non_weights_only_pickle_is_refused(tmp_path, tiny_sd, kind):
    if kind == "object_in_dict":
        obj = {"state_dict": tiny_sd, "payload": Payload()}
    else:
        obj = DDPMUNet(**model_cfg("tiny_ddpm")["config"])
    torch.save(obj, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as err:
        load_eps_model(**model_cfg("tiny_ddpm", ckpt_path=str(tmp_path / "evil.pt")))
    msg = str(err.value)
    assert "refusing to load" in msg and "\n" not in msg
    if kind == "object_in_dict":  # a code-running global is named as such, with no hint to load it anyway
        assert re.search(r"would call (posix|nt|os)\.system", msg) and "do not load this file" in msg
    else:
        assert "never unpickles code" in msg and "plain state_dict" in msg


def test_garbage_file_and_bad_options(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_eps_model(**model_cfg("tiny_ddpm", ckpt_path=str(tmp_path / "junk.pt")))
    with pytest.raises(ValueError, match="unknown dtype"):
        load_eps_model(**model_cfg("tiny_ddpm", dtype="float8"))
    with pytest.raises(ValueError, match="unknown model source"):
        load_eps_model(**model_cfg("tiny_ddpm", source="pickle"))
    with pytest.raises(ValueError, match="unknown model architecture"):
        load_eps_model("unet", {}, "random")


# ---------------------------------------------------------------------------------------------------------
# Hydra model configs


def test_model_configs_share_one_schema_and_match_the_registry():
    base = set(OmegaConf.load(CONF / "default.yaml").keys())
    optional = {"source", "hub_id", "subfolder", "seed"}
    for path in sorted(CONF.glob("*.yaml")):
        keys = set(OmegaConf.load(path).keys())
        assert base <= keys <= base | optional, path.name
    for name in ("celeba_hq_ddpm", "imagenet256_adm", "default"):
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
        assert (cfg["arch"], cfg["config"]) == (KNOWN_MODELS[name]["arch"], KNOWN_MODELS[name]["config"]), name


def test_model_configs_compose_with_hydra():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf_train"), version_base="1.3"):  # train.py's tree
        for name in ("celeba_hq_ddpm", "imagenet256_adm", "diffusers", "tiny_ddpm", "tiny_adm"):
            cfg = compose(config_name="train", overrides=[f"model={name}"])
            assert cfg.model.name == name


# ---------------------------------------------------------------------------------------------------------
# diffusers


def test_ddpm_to_diffusers_key_map_matches_manifest():
    info = manifest("diffusers_unet2d_state_dicts.json")
    key_map = info["ddpm_model_to_diffusers_key_map"]["map"]
    keys = manifest("celeba_hq_ddpm.json")["state_dict"]
    assert {k: ddpm_key_to_diffusers(k, 6) for k in keys} == key_map
    converted = ddpm_config_to_diffusers(KNOWN_MODELS["celeba_hq_ddpm"]["config"])
    google = info["google_ddpm_celebahq_256"]["config"]
    public = {k: v for k, v in google.items() if not k.startswith("_")}
    assert {k: v for k, v in converted.items() if k in google} == public


def test_golden_ddpm_converted_to_diffusers_reproduces(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    config = golden_config("ddpm")
    sd = golden_state_dict("ddpm")
    unet = diffusers.UNet2DModel(**ddpm_config_to_diffusers(config))
    unet.load_state_dict({k: v.float() for k, v in ddpm_state_dict_to_diffusers(sd).items()}, strict=True)
    unet.save_pretrained(tmp_path / "pipe" / "unet")  # pipeline layout: the UNet lives in unet/
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}))
    model = load_eps_model(**model_cfg("diffusers", ckpt_path=str(tmp_path / "pipe"), schedule=None))
    assert model.describe()["schedule"]["name"] == "linear"
    io = golden_io("ddpm")
    with torch.no_grad():
        for case in ("case_a", "case_b"):
            torch.testing.assert_close(model(io[case]["x"], io[case]["t"]), io[case]["out"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("out_channels", [3, 6])
def test_tiny_local_unet2d_as_eps_model(tmp_path, out_channels):
    diffusers = pytest.importorskip("diffusers")
    config = dict(sample_size=16, in_channels=3, out_channels=out_channels, block_out_channels=[32, 64],
                  down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                  layers_per_block=1, attention_head_dim=8, norm_num_groups=8)
    unet = init_random_(diffusers.UNet2DModel(**config), seed=0).eval()
    unet.save_pretrained(tmp_path / "unet")
    model = load_eps_model(**model_cfg("diffusers", ckpt_path=str(tmp_path / "unet")))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([999, 3])
    with torch.no_grad():
        eps, ref = model(x, t), unet(x, t).sample
    assert eps.shape == (2, 3, 16, 16) and eps.dtype == torch.float32
    torch.testing.assert_close(eps, ref[:, :3])
    assert model.describe()["learned_sigma"] == (out_channels == 6)
    # a plain weights file + config, and random init, also work
    torch.save(unet.state_dict(), tmp_path / "w.pt")
    from_file = load_eps_model("diffusers", config, tmp_path / "w.pt")
    torch.testing.assert_close(from_file(x, t), eps)
    assert load_eps_model("diffusers", config, "random")(x, t).shape == (2, 3, 16, 16)


def test_diffusers_errors(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    with pytest.raises(FileNotFoundError, match="diffusers model directory not found"):
        load_eps_model(**model_cfg("diffusers", ckpt_path=str(tmp_path / "none")))

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr("diffusers.UNet2DModel.from_pretrained", offline)
    with pytest.raises(FileNotFoundError, match="without internet"):
        load_eps_model(**model_cfg("diffusers"))


# ---------------------------------------------------------------------------------------------------------
# refused files: one line that says what the file is, no torch warning lines


def test_corrupt_safetensors_and_renamed_pickles_are_one_line(tmp_path, tiny_sd):
    pytest.importorskip("safetensors")
    import pickle
    import struct

    (tmp_path / "huge_header.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(ValueError, match=r"huge_header\.safetensors is not a readable safetensors file") as err:
        load_eps_model(**model_cfg("tiny_ddpm", ckpt_path=str(tmp_path / "huge_header.safetensors")))
    assert "\n" not in str(err.value)
    (tmp_path / "renamed.safetensors").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(ValueError, match=r"it is a pickle, not safetensors: refused"):
        load_eps_model(**model_cfg("tiny_ddpm", ckpt_path=str(tmp_path / "renamed.safetensors")))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_raw_malicious_pickle_is_named_as_code_without_warnings(tmp_path, protocol):
    import pickle
    import warnings

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=protocol))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Detected pickle protocol" lines must not reach the user
        with pytest.raises(ValueError) as err:
            load_eps_model(**model_cfg("tiny_ddpm", ckpt_path=str(path)))
    msg = str(err.value)
    assert re.search(r"would call (posix|nt|os)\.system", msg) and "truncated" not in msg and "\n" not in msg
    data = pickle.dumps({"w": [1.0] * 50}, protocol=protocol)
    path.write_bytes(data[: len(data) // 2])  # a truncated pickle is still called truncated
    with pytest.raises(ValueError, match="truncated"):
        load_eps_model(**model_cfg("tiny_ddpm", ckpt_path=str(path)))


def test_fid_weights_are_read_once_weights_only(tmp_path, monkeypatch):
    """torch-fidelity unpickles an in-memory copy of the checked tensors, never the file a second time."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    import io

    from deqir.metrics.fid import FIDMetric

    path = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    calls, real_load = [], torch.load

    def spy(f, *args, **kwargs):
        calls.append((f, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: sd)
    assert FIDMetric.create(path, hub_dir=tmp_path, feature=64) is not None
    from_disk = [w for f, w in calls if not isinstance(f, io.IOBase)]
    assert from_disk == [True]  # one read of the file, weights-only
    assert any(isinstance(f, io.BytesIO) for f, _ in calls)  # torch-fidelity got the in-memory copy
