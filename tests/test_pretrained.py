"""Pretrained starting points: backbone weights through timm's
loader in every format, their mean/std, the Hugging Face cache offline, s3:// through the
pipelines' cache, and a STEP model initialised from a Segmenter checkpoint.

No network: every file is written here from randomly initialised tensors, with the key
names and shapes of the real releases (timm state dicts, AugReg .npz, rstrudel/segmenter's
checkpoint.pth + variant.yml).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from step_model import ExitConfig, PolicyConfig, StepConfig
from step_model import build_step_model as _build_step_model
from step_model.backbone import build_encoder, create_vit

NAME = "vit_tiny_patch16_384"  # 192 wide, 12 blocks, 3 heads; default tag AugReg (mean 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
PLAIN = {"policy_mode": "none"}  # the plain ViT path: these tests are about the backbone


def build_step_model(cfg: StepConfig):
    return _build_step_model(cfg, PLAIN)


def random_vit(name: str, seed: int = 0) -> torch.nn.Module:
    """A timm ViT with its ImageNet head, every tensor random (timm's own init is slow here)."""
    vit = timm.create_model(name, pretrained=False, weight_init="skip")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return vit


def augreg_npz(vit: torch.nn.Module) -> dict[str, np.ndarray]:
    """The state dict under the names and layouts of the AugReg .npz releases (JAX/Flax:
    HWIO conv, (in, out) dense, per-head q/k/v), the inverse of timm's ``_load_weights``."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    d = vit.embed_dim
    h = vit.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(vit.blocks)):
        p, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = b + "MultiHeadDotProductAttention_1/"
        out[b + "LayerNorm_0/scale"], out[b + "LayerNorm_0/bias"] = sd[p + "norm1.weight"], sd[p + "norm1.bias"]
        out[b + "LayerNorm_2/scale"], out[b + "LayerNorm_2/bias"] = sd[p + "norm2.weight"], sd[p + "norm2.bias"]
        qkv_w, qkv_b = sd[p + "attn.qkv.weight"].reshape(3, d, d), sd[p + "attn.qkv.bias"].reshape(3, d)
        for j, n in enumerate(("query", "key", "value")):
            out[f"{mha}{n}/kernel"] = qkv_w[j].T.reshape(d, h, d // h)
            out[f"{mha}{n}/bias"] = qkv_b[j].reshape(h, d // h)
        out[mha + "out/kernel"] = sd[p + "attn.proj.weight"].reshape(d, h, d // h).transpose(1, 2, 0)
        out[mha + "out/bias"] = sd[p + "attn.proj.bias"]
        for r in range(2):
            out[f"{b}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{p}mlp.fc{r + 1}.weight"].T
            out[f"{b}MlpBlock_3/Dense_{r}/bias"] = sd[f"{p}mlp.fc{r + 1}.bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_weights(vit: torch.nn.Module, path) -> str:
    sd = {k: v.detach().clone().contiguous() for k, v in vit.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    elif path.suffix == ".npz":
        np.savez(path, **augreg_npz(vit))
    elif path.suffix == ".pth":
        torch.save({"model": sd, "epoch": 300}, path)  # DeiT-style: the state dict under "model"
    else:
        torch.save(sd, path)
    return str(path)


def assert_same_backbone(loaded: torch.nn.Module, source: torch.nn.Module) -> None:
    got = loaded.state_dict()
    want = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def step_cfg(**kw) -> StepConfig:
    kw.setdefault("backbone", NAME)
    return StepConfig(num_classes=kw.pop("num_classes", 5),
                      policy=PolicyConfig(pretrained=False),
                      exits=ExitConfig(blocks=kw.pop("exits", [])), **kw)


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    return random_vit(NAME)


# ---- 1. backbone weights -------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pth", ".bin"])
def test_every_format_loads_the_same_tensors(source, tmp_path, suffix: str) -> None:
    path = write_weights(source, tmp_path / f"weights{suffix}")
    assert_same_backbone(create_vit(NAME, weights=path), source)


def test_pos_embed_is_resampled_to_the_model_grid(source, tmp_path) -> None:
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    sd["pos_embed"] = torch.randn(1, 1 + 14 * 14, 192) * 0.02  # a 224-px table into a 384-px model
    path = tmp_path / "w224.safetensors"
    save_file(sd, str(path))
    vit = create_vit(NAME, weights=str(path))
    want = resample_abs_pos_embed(sd["pos_embed"], new_size=(24, 24), num_prefix_tokens=1)
    assert vit.pos_embed.shape == (1, 1 + 24 * 24, 192)
    torch.testing.assert_close(vit.pos_embed, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(vit.blocks[5].mlp.fc2.weight, sd["blocks.5.mlp.fc2.weight"], rtol=0, atol=0)


def test_mean_and_std_come_from_the_weights_config(source, tmp_path) -> None:
    npz = write_weights(source, tmp_path / "augreg.npz")
    augreg, cfg, _ = build_encoder(step_cfg(backbone=f"{NAME}.augreg_in21k_ft_in1k", backbone_weights=npz))
    # recorded in the config: a checkpoint rebuilt without the weight file normalises alike
    assert cfg.input_mean == (0.5, 0.5, 0.5) and cfg.input_std == (0.5, 0.5, 0.5)
    grey = torch.full((1, 3, 2, 2), 0.75)
    torch.testing.assert_close(augreg.normalize(grey), torch.full_like(grey, 0.5))

    # DeiT weights (ViT-Ti shapes; pos_embed resampled 24 -> 14) use ImageNet's mean/std
    deit, cfg, _ = build_encoder(step_cfg(backbone="deit_tiny_patch16_224.fb_in1k",
                                          backbone_weights=write_weights(source, tmp_path / "deit.pth")))
    assert cfg.input_mean == IMAGENET_MEAN
    torch.testing.assert_close(deit.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    # an explicit value wins over the weights' config
    mine, _, _ = build_encoder(step_cfg(backbone_weights=npz, input_mean=(0.1, 0.2, 0.3)))
    torch.testing.assert_close(mine.mean.flatten(), torch.tensor((0.1, 0.2, 0.3)))


def test_bad_weight_files_name_the_file_and_the_keys(source, tmp_path) -> None:
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    del sd["blocks.3.attn.qkv.weight"]
    sd["neck.extra"] = torch.zeros(3)
    bad = tmp_path / "partial.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(ValueError, match="partial.safetensors") as err:
        create_vit(NAME, weights=str(bad))
    assert "blocks.3.attn.qkv.weight" in str(err.value) and "neck.extra" in str(err.value)

    sd = {k: v.clone() for k, v in source.state_dict().items()}
    sd["norm.weight"] = torch.ones(384)  # a ViT-S final norm
    torch.save(sd, tmp_path / "vit_s.bin")
    with pytest.raises(ValueError, match=r"vit_s\.bin.*1 tensors of another shape.*norm\.weight \(\[384\] vs \[192\]\)"):
        create_vit(NAME, weights=str(tmp_path / "vit_s.bin"))

    arrays = augreg_npz(source)
    del arrays["Transformer/encoderblock_7/MlpBlock_3/Dense_1/kernel"]
    np.savez(tmp_path / "cut.npz", **arrays)
    with pytest.raises(ValueError, match=r"cut\.npz.*encoderblock_7/MlpBlock_3/Dense_1/kernel"):
        create_vit(NAME, weights=str(tmp_path / "cut.npz"))

    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        create_vit(NAME, weights=str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ValueError, match="no tag 'augreg_typo'"):
        create_vit(f"{NAME}.augreg_typo")


def test_hf_hub_name_loads_from_the_offline_cache(source, tmp_path, monkeypatch) -> None:
    """``hf-hub:ORG/NAME`` with ``HF_HUB_OFFLINE=1`` and a cache on disk in the hub's own
    layout (refs/main -> snapshots/<commit>/{config.json, model.safetensors})."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--step-test--vit-tiny-offline"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({
        "architecture": NAME, "num_classes": 1000, "num_features": 192, "global_pool": "token",
        "pretrained_cfg": {"tag": "offline_test", "custom_load": True, "input_size": [3, 384, 384],
                           "fixed_input_size": True, "crop_pct": 1.0, "interpolation": "bicubic",
                           "num_classes": 1000,
                           "mean": [0.25, 0.5, 0.75], "std": [0.3, 0.4, 0.5],
                           "first_conv": "patch_embed.proj", "classifier": "head"},
    }))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads these variables once, at import (earlier tests imported it)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))

    model = build_step_model(step_cfg(backbone_weights="hf-hub:step-test/vit-tiny-offline"))
    assert_same_backbone(model.encoder.vit, source)
    assert model.cfg.input_mean == (0.25, 0.5, 0.75) and model.cfg.input_std == (0.3, 0.4, 0.5)
    assert model.cfg.backbone_img_size == 384
    with pytest.raises(ValueError, match="holds a 'vit_tiny_patch16_384', but backbone is"):
        create_vit("vit_small_patch16_384", weights="hf-hub:step-test/vit-tiny-offline")


def test_s3_weights_are_downloaded_once(source, seg_state, tmp_path, monkeypatch, s3_bucket) -> None:
    import boto3

    from pipelines.common.model import build_model

    monkeypatch.setenv("STEP_WEIGHTS_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3")
    s3.upload_file(write_weights(source, tmp_path / "w.safetensors"), s3_bucket, "weights/vit.safetensors")
    uri = f"s3://{s3_bucket}/weights/vit.safetensors"
    data = step_cfg(backbone_weights=uri).to_dict()

    model = build_model(data, PLAIN)
    assert_same_backbone(model.encoder.vit, source)
    assert model.cfg.backbone_weights == uri  # the record keeps the URI, not the cache path
    cached = list((tmp_path / "cache").rglob("vit.safetensors"))
    assert len(cached) == 1
    s3.delete_object(Bucket=s3_bucket, Key="weights/vit.safetensors")
    assert_same_backbone(build_model(data, PLAIN).encoder.vit, source)  # from the cache, no S3 read

    # init_from: the checkpoint and the variant.yml beside it
    write_segmenter(tmp_path / "seg", seg_state)
    for name in ("checkpoint.pth", "variant.yml"):
        s3.upload_file(str(tmp_path / "seg" / name), s3_bucket, f"runs/seg/{name}")
    spec = f"segmenter:s3://{s3_bucket}/runs/seg"
    model = build_model(step_cfg(decoder="mask", init_from=spec).to_dict(), PLAIN)
    assert model.cfg.init_from == spec
    assert model.cfg.backbone_img_size == 128  # read from the downloaded variant.yml
    assert torch.equal(model.decoder.cls_emb, seg_state["decoder.cls_emb"])


# ---- 2. a STEP model from a trained Segmenter -----------------------------------------


@pytest.fixture(scope="module")
def seg_state() -> dict[str, torch.Tensor]:
    return segmenter_state()


def segmenter_state(n_cls: int = 5, grid: int = 8, dec_layers: int = 2) -> dict[str, torch.Tensor]:
    """rstrudel/segmenter's ``Segmenter(encoder=VisionTransformer, decoder=MaskTransformer)``
    state dict for ViT-Ti (d_model 192, 12 blocks, d_ff 768) trained at 16*grid pixels."""
    gen = torch.Generator().manual_seed(3)
    d, ff = 192, 768

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * 0.02

    def block(p: str) -> dict[str, torch.Tensor]:  # segm/model/blocks.py Block
        return {f"{p}.norm1.weight": t(d), f"{p}.norm1.bias": t(d),
                f"{p}.norm2.weight": t(d), f"{p}.norm2.bias": t(d),
                f"{p}.attn.qkv.weight": t(3 * d, d), f"{p}.attn.qkv.bias": t(3 * d),
                f"{p}.attn.proj.weight": t(d, d), f"{p}.attn.proj.bias": t(d),
                f"{p}.mlp.fc1.weight": t(ff, d), f"{p}.mlp.fc1.bias": t(ff),
                f"{p}.mlp.fc2.weight": t(d, ff), f"{p}.mlp.fc2.bias": t(d)}

    sd = {"encoder.cls_token": t(1, 1, d), "encoder.pos_embed": t(1, 1 + grid * grid, d),
          "encoder.patch_embed.proj.weight": t(d, 3, 16, 16), "encoder.patch_embed.proj.bias": t(d)}
    for i in range(12):
        sd.update(block(f"encoder.blocks.{i}"))
    sd.update({"encoder.norm.weight": t(d), "encoder.norm.bias": t(d),
               "encoder.head.weight": t(1000, d), "encoder.head.bias": t(1000)})
    for i in range(dec_layers):
        sd.update(block(f"decoder.blocks.{i}"))
    sd.update({"decoder.cls_emb": t(1, n_cls, d), "decoder.proj_dec.weight": t(d, d),
               "decoder.proj_dec.bias": t(d), "decoder.proj_patch": t(d, d),
               "decoder.proj_classes": t(d, d), "decoder.decoder_norm.weight": t(d),
               "decoder.decoder_norm.bias": t(d), "decoder.mask_norm.weight": t(n_cls),
               "decoder.mask_norm.bias": t(n_cls)})
    return sd


def write_segmenter(folder, state: dict[str, torch.Tensor], normalization: str = "deit") -> None:
    """checkpoint.pth + variant.yml as segm/train.py writes them (yaml.dump: the image_size
    tuple carries a !!python/tuple tag)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "n_cls": 5, "epoch": 63}, folder / "checkpoint.pth")
    net = {"backbone": NAME, "d_model": 192, "n_heads": 3, "n_layers": 12, "patch_size": 16,
           "image_size": (128, 128), "normalization": normalization, "distilled": False,
           "dropout": 0.0, "drop_path_rate": 0.1, "n_cls": 5,
           "decoder": {"name": "mask_transformer", "n_layers": 2, "drop_path_rate": 0.0,
                       "dropout": 0.1, "n_cls": 5}}
    text = yaml.dump({"net_kwargs": net, "dataset_kwargs": {"dataset": "ade20k", "crop_size": 128}})
    assert "!!python/tuple" in text
    (folder / "variant.yml").write_text(text)


def test_segmenter_checkpoint_initialises_encoder_and_decoder(seg_state, tmp_path) -> None:
    from pipelines.common.checkpoint import load_model, save_checkpoint

    state = seg_state
    write_segmenter(tmp_path / "seg", state)
    model = build_step_model(step_cfg(decoder="mask", exits=[4], init_from=f"segmenter:{tmp_path / 'seg'}"))
    own = model.state_dict()
    for key, value in state.items():
        if key.startswith("encoder.head."):
            continue
        dst = "encoder.vit." + key.removeprefix("encoder.") if key.startswith("encoder.") else key
        assert torch.equal(own[dst], value), key
    # the pos_embed table takes the Segmenter's 128-px grid (copied, not resampled); the
    # variant's "deit" normalisation replaces the backbone tag's 0.5
    assert model.cfg.backbone_img_size == 128 and model.cfg.input_mean == IMAGENET_MEAN

    images = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        want = model(images).logits
    assert want.shape == (1, 5, 48, 64) and torch.isfinite(want).all()
    # a checkpoint rebuilds without the Segmenter file (init_from cleared), same outputs
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    (tmp_path / "seg" / "checkpoint.pth").unlink()
    again, config = load_model(ckpt)
    assert config["init_from"].startswith("segmenter:")
    with torch.no_grad():
        torch.testing.assert_close(again(images).logits, want)


def test_segmenter_mismatches_name_the_keys(seg_state, tmp_path) -> None:
    state = dict(seg_state)
    write_segmenter(tmp_path / "seg", state)
    spec = f"segmenter:{tmp_path / 'seg' / 'checkpoint.pth'}"
    with pytest.raises(ValueError, match="set decoder: mask") as err:
        build_step_model(step_cfg(decoder="linear", init_from=spec))
    assert "unmatched keys ['decoder.blocks.0.norm1.weight'" in str(err.value)
    assert "missing keys ['decoder.head.weight', 'decoder.head.bias']" in str(err.value)

    with pytest.raises(ValueError, match=r"mis-shaped.*decoder\.cls_emb \(1, 5, 192\)"):
        build_step_model(step_cfg(decoder="mask", num_classes=7, init_from=spec))

    del state["decoder.proj_patch"]
    state["decoder.extra_norm.weight"] = torch.ones(3)
    write_segmenter(tmp_path / "cut", state)
    with pytest.raises(ValueError, match="checkpoint.pth") as err:
        build_step_model(step_cfg(decoder="mask", init_from=f"segmenter:{tmp_path / 'cut'}"))
    assert "decoder.extra_norm.weight" in str(err.value) and "decoder.proj_patch" in str(err.value)


def test_init_from_forms_are_validated() -> None:
    with pytest.raises(ValidationError, match="init_from") as err:
        StepConfig(init_from="/ckpt/checkpoint.pth")
    assert "segmenter:PATH" in str(err.value)
    with pytest.raises(ValidationError, match="not both"):
        StepConfig(init_from="segmenter:/ckpt", backbone_weights="/w.npz")
