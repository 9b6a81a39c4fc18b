"""Precompute generation targets once, so that training does not run the target encoder every step.

Reads WebDataset shards through the data package's reader (generation samples only; bad samples are skipped
and counted there), encodes each sample's target image in batches, either as the 64 pooled EVA-CLIP features
(spec 4 / 7.1) or as VAE latents (the posterior mean, minus shift_factor, times scaling_factor), and writes
new shards of ``shard_size`` samples: the same keys with their txt / json and source images (src*) as read,
plus ``feat.npy`` (float32, (64, D) or (C, h, w)); the target image itself only with ``keep_images``.

``precompute.json`` in the output folder says what was done (encoder, target shape, sources, counts, skips).
It is rewritten after every shard together with the reader's position, so a run that stops resumes after its
last complete shard: the shards already written are neither read nor encoded again.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from blip3o_fast.data import GENERATION, DataStats, WebDataset, write_shard
from blip3o_fast.data.stats import MISSING_IMAGE
from blip3o_fast.data.webdataset import IMAGE_EXTS, TARGET_EXT, resolve_shards
from blip3o_fast.models.eva_clip import EVAVisionConfig, EVAVisionTower, preprocess

MANIFEST = "precompute.json"
FORMAT = "blip3o_fast.precompute/1"
TINY_EVA = "tiny-eva"
_SOURCE_IMAGE = re.compile(r"^src\d*\.")


class EVAFeatureEncoder:
    """Images -> (B, 64, width) pooled EVA-CLIP features, float32 on the CPU."""

    kind = "eva_clip"

    def __init__(self, tower: EVAVisionTower, source: str, seed: int | None = None):
        self.tower = tower
        self.source = source
        self.seed = seed  # of a random tower

    @classmethod
    def load(cls, source: str, device: str, dtype: torch.dtype, seed: int = 0) -> "EVAFeatureEncoder":
        if source == TINY_EVA:  # the same random tower training's "tiny" EVA builds from this seed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                tower = EVAVisionTower(EVAVisionConfig.tiny())
            return cls(tower.to(device=device, dtype=dtype).eval().requires_grad_(False), source, seed)
        return cls(EVAVisionTower.from_pretrained(source, device=device, dtype=dtype), source)

    def describe(self) -> dict[str, Any]:
        cfg = self.tower.config
        seed = {} if self.seed is None else {"seed": self.seed}
        dtype = str(self.tower.pos_embed.dtype).removeprefix("torch.")
        return {"kind": self.kind, "source": self.source, **seed, "dtype": dtype, "image_size": cfg.image_size,
                "width": cfg.width, "pool_kernel": cfg.pool_kernel}

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = preprocess(images, self.tower.config.image_size)
        pixels = pixels.to(device=self.tower.pos_embed.device, dtype=self.tower.pos_embed.dtype)
        return self.tower.encode_targets(pixels).float().cpu()


class VAELatentEncoder:
    """Images -> (B, C, R/f, R/f) latents of a diffusers AutoencoderKL, float32 on the CPU: the posterior
    mean (deterministic, unlike a training-time draw), minus shift_factor, times scaling_factor."""

    kind = "vae"

    def __init__(self, vae: torch.nn.Module, resolution: int, source: str):
        from blip3o_fast.training.targets import VAETargets  # the same preprocessing as online VAE targets

        self.online = VAETargets(vae, resolution, device=next(vae.parameters()).device)
        self.source = source

    @classmethod
    def load(cls, folder: Path, device: str, dtype: torch.dtype, resolution: int | None) -> "VAELatentEncoder":
        from diffusers import AutoencoderKL

        config = json.loads((folder / "config.json").read_text())
        # An fp16 VAE overflows where its config says force_upcast: such a VAE runs in fp32.
        vae_dtype = torch.float32 if dtype == torch.float16 and config.get("force_upcast") else dtype
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=vae_dtype).to(device)
        return cls(vae, resolution or int(vae.config.sample_size), str(folder))

    def describe(self) -> dict[str, Any]:
        vae = self.online.vae
        return {"kind": self.kind, "source": self.source, "dtype": str(vae.dtype).removeprefix("torch."),
                "image_size": self.online.resolution, "scaling_factor": self.online.scaling,
                "shift_factor": self.online.shift}

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        vae = self.online.vae
        pixels = torch.stack([self.online.preprocess(image) for image in images]).to(device=vae.device, dtype=vae.dtype)
        mean = vae.encode(pixels).latent_dist.mean
        return ((mean.float() - self.online.shift) * self.online.scaling).cpu()


class AutoencoderFeatureEncoder:
    """Images -> (B, 64, dim) feature tokens of a shapes autoencoder (the tiny shapes model's "CLIP
    features"), float32 on the CPU: the same preprocessing and encoding as its online targets."""

    kind = "shapes_autoencoder"

    def __init__(self, folder: Path, device: str):
        from blip3o_fast.training.targets import AutoencoderTargets

        self.online = AutoencoderTargets(str(folder), device)
        self.source = str(folder)

    def describe(self) -> dict[str, Any]:
        cfg = self.online.model.cfg
        return {"kind": self.kind, "source": self.source, "dim": cfg.dim, "image_size": cfg.resolution}

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        device = next(self.online.model.parameters()).device
        pixels = torch.stack([self.online.preprocess(image) for image in images]).to(device)
        return self.online.model.encode(pixels).float().cpu()


def vae_folder(path: Path) -> Path | None:
    """The AutoencoderKL folder at ``path`` (or its vae/ subfolder, as in a pixel decoder's folder), else None."""
    for folder in (path, path / "vae"):
        config = folder / "config.json"
        if config.is_file():
            try:
                if json.loads(config.read_text()).get("_class_name") == "AutoencoderKL":
                    return folder
            except ValueError:
                continue
    return None


def load_target_encoder(spec: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        image_size: int | None = None, seed: int = 0):
    """``tiny-eva`` (random tiny EVA tower), a diffusers AutoencoderKL folder, a shapes autoencoder folder,
    or an EVA-CLIP checkpoint
    (a .bin / .safetensors file, or a folder: jiuhai/eva_clip_vision_tower or a BLIP3o checkpoint)."""
    if spec != TINY_EVA:
        spec = os.path.abspath(spec)  # the manifest compares sources on resume
        if not Path(spec).exists():
            raise FileNotFoundError(f"encoder not found: {spec} (an EVA-CLIP checkpoint, a VAE folder or {TINY_EVA})")
        folder = vae_folder(Path(spec)) if Path(spec).is_dir() else None
        if folder is not None:
            return VAELatentEncoder.load(folder, device, dtype, image_size)
        from blip3o_fast.shapes.autoencoder import CONFIG_FILE as AUTOENCODER_CONFIG

        if (Path(spec) / AUTOENCODER_CONFIG).is_file():
            return AutoencoderFeatureEncoder(Path(spec), device)
    if image_size is not None:
        raise ValueError("image_size applies to a VAE only: the EVA tower's input size is fixed by its weights")
    return EVAFeatureEncoder.load(spec, device, dtype, seed)


class _ReaderKeepingMembers(WebDataset):
    """The data package's WebDataset reader, in writing order, also handing back each generation sample's
    raw members that the output shard keeps (bytes as read: no re-encoding of images or text)."""

    def __init__(self, shards: list[str], keep_images: bool):
        super().__init__(shards, tasks=(GENERATION,), shuffle_buffer=0, shuffle_shards=False, epochs=1,
                         rank=0, world_size=1)
        self.keep_images = keep_images

    def _kept(self, ext: str) -> bool:
        return ext in ("txt", "json") or bool(_SOURCE_IMAGE.match(ext)) or (self.keep_images and ext in IMAGE_EXTS)

    def _decode(self, record):
        sample = super()._decode(record)
        if sample is None:
            return None
        return sample, {ext: self._read(record, ext) for ext in record.members if self._kept(ext)}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _start_manifest(out: Path, params: dict) -> dict:
    """The manifest to continue from: the existing one when it was made with the same parameters."""
    path = out / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        old = {k: manifest.get(k) for k in params}
        if old != params:
            changed = sorted(k for k in params if old[k] != params[k])
            raise ValueError(f"{out} holds a precompute run with other settings ({', '.join(changed)}): "
                             "use another output folder or remove it")
        missing = [s["name"] for s in manifest["shards"] if not (out / s["name"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} lists shards that are missing: {missing}")
        return manifest
    return {"format": FORMAT, **params, "target": None, "shards": [], "count": 0,
            "skipped": {"total": 0, "counts": {}, "examples": {}}, "position": None, "complete": False}


def precompute(shards: str | list[str], output_dir: str | os.PathLike, encoder, *, batch_size: int = 32,
               shard_size: int = 1000, keep_images: bool = False, log=print) -> dict:
    """Encode the targets of every generation sample in ``shards`` into shards under ``output_dir``; returns
    the manifest (also written to output_dir/precompute.json)."""
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    sources = [os.path.abspath(p) for p in resolve_shards(shards)]
    if not sources:
        raise ValueError(f"no shards match {shards!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {"encoder": encoder.describe(), "sources": sources, "shard_size": shard_size, "keep_images": keep_images}
    manifest = _start_manifest(out, params)
    if manifest["complete"]:
        log(f"{out}: already complete ({manifest['count']} samples)")
        return manifest
    if manifest["shards"]:
        log(f"{out}: resuming after {len(manifest['shards'])} complete shards ({manifest['count']} samples)")

    reader = _ReaderKeepingMembers(sources, keep_images)
    reader.stats = DataStats.from_dict({**manifest["skipped"], "yielded": 0})  # skips before the resume point
    pending: list[tuple[Any, dict]] = []  # (sample, kept members) awaiting the encoder
    ready: list[dict] = []  # output samples awaiting their shard

    def encode_pending() -> None:
        if not pending:
            return
        features = encoder.encode([sample.image for sample, _ in pending])
        if manifest["target"] is None:
            manifest["target"] = {"member": TARGET_EXT, "shape": list(features.shape[1:]), "dtype": "float32"}
        ready.extend({"__key__": sample.key, **kept, TARGET_EXT: feature.numpy()}
                     for (sample, kept), feature in zip(pending, features))
        pending.clear()

    def write_ready(position: dict) -> None:
        """One shard of what is ready; the manifest then records where the reader stood after its last
        sample and the skips counted until then: what a resume starts from."""
        name = f"shard-{len(manifest['shards']):06d}.tar"
        write_shard(out / name, ready)
        manifest["shards"].append({"name": name, "count": len(ready)})
        manifest["count"] += len(ready)
        manifest["position"] = position
        manifest["skipped"] = _skips(reader.stats)
        _write_json(out / MANIFEST, manifest)
        log(f"wrote {name}: {len(ready)} samples ({manifest['count']} in all)")
        ready.clear()

    position = start = manifest["position"]
    for (sample, kept), position in reader.iterate(start):
        if sample.image is None:  # a precomputed target without its image: nothing to encode from
            reader.stats.skip(MISSING_IMAGE, sample.key, "no target image to encode")
            continue
        pending.append((sample, kept))
        shard_full = len(ready) + len(pending) == shard_size
        if shard_full or len(pending) == batch_size:
            encode_pending()
        if shard_full:
            write_ready(position)
    encode_pending()
    if ready:
        write_ready(position)
    manifest["skipped"] = _skips(reader.stats)
    manifest["complete"] = True
    _write_json(out / MANIFEST, manifest)
    skipped = manifest["skipped"]
    log(f"{out}: {manifest['count']} samples in {len(manifest['shards'])} shards, {skipped['total']} skipped"
        + (f" {skipped['counts']}" if skipped["total"] else ""))
    return manifest


def _skips(stats: DataStats) -> dict:
    d = stats.to_dict()
    return {"total": stats.skipped, "counts": d["counts"], "examples": d["examples"]}
