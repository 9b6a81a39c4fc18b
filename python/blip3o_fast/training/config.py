"""Training configuration: a TOML file read into dataclasses, with `--set section.key=value` overrides.

Every field has a default, so a config names only what differs. Sections:
  [model]     where the weights come from and what trains
  [objective] the losses and their targets
  [data]      shards / JSON files and how they mix
  [optim]     AdamW and the learning-rate schedule
  [train]     steps, batch, precision, parallelism, logging, checkpoints
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENERATION_OBJECTIVES = ("clip_flow", "clip_mse", "vae_flow", "none")
TRAINABLE_SETS = ("released", "full", "language", "dit_only")
SCHEDULES = ("cosine_with_min_lr", "cosine", "constant")
PARALLEL = ("none", "ddp", "fsdp")
PRECISIONS = ("fp32", "bf16")


@dataclass
class ModelSection:
    source: str = "tiny:qwen2_5_vl"  # a checkpoint folder, or tiny:qwen2_5_vl / tiny:llama3
    seed: int = 0  # weights of a tiny model and of modules the checkpoint lacks
    trainable: str = "released"  # released | full | language | dit_only
    # Replaces the DiT by a freshly initialised one with these DiTConfig fields changed (VAE-latent
    # mode: in_channels = latent channels, sample_size = latent side, patch_size).
    dit_overrides: dict[str, Any] = field(default_factory=dict)
    # "train": the released training prompt (assistant turn closed before [IMG], spec 2.5);
    # "inference": the prompt generate_image_features uses (assistant\n then [IMG]).
    generation_prompt: str = "train"
    max_length: int = 512  # backbone tokens per sample, queries included


@dataclass
class ObjectiveSection:
    generation: str = "clip_flow"  # clip_flow | clip_mse | vae_flow | none
    text: bool = False  # next-token CE on understanding samples
    generation_weight: float = 1.0
    text_weight: float = 1.0
    condition_dropout: float = 0.1  # zero a sample's whole conditioning (CFG), flow objectives only
    sigma_sampling: str = "uniform"  # uniform (the release: u -> 1000-step grid) | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float | None = None  # None: the model's (its FlowMatchEulerDiscreteScheduler shift)
    num_train_timesteps: int = 1000
    # Targets: "precomputed" reads sample.target; "online" encodes sample.image with the target
    # tower (EVA-CLIP for clip_*, the VAE for vae_flow).
    targets: str = "online"
    eva: str = "tiny"  # an EVA-CLIP weights path, or tiny (random tiny tower from model.seed)
    autoencoder: str = ""  # a shapes autoencoder folder: its 64 feature tokens replace EVA-CLIP as clip_* targets
    vae: str = "decoder"  # a diffusers AutoencoderKL folder, or decoder (the model's pixel decoder VAE)
    vae_resolution: int = 64  # pixels fed to the VAE (square centre crop)


@dataclass
class DataSection:
    generation: list[str] = field(default_factory=list)  # WebDataset shard paths / globs
    understanding: list[str] = field(default_factory=list)  # shards or JSON conversation files
    generation_ratio: float = 1.0  # mixing weights when both kinds are present
    understanding_ratio: float = 1.0
    shuffle_buffer: int = 64
    seed: int = 42
    # Deterministic sample streams (each reads its share of the shards); 0: one per process. Runs
    # with the same streams see the same global batches whatever their number of processes.
    streams: int = 0


@dataclass
class OptimSection:
    lr: float = 1e-4
    min_lr: float = 1e-5  # floor of cosine_with_min_lr
    schedule: str = "cosine_with_min_lr"  # cosine_with_min_lr | cosine (to 0) | constant
    warmup_ratio: float = 0.003
    warmup_steps: int | None = None  # overrides warmup_ratio
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping


@dataclass
class TrainSection:
    max_steps: int = 100
    batch_size: int = 8  # global samples per optimizer step, over all ranks and accumulation
    micro_batch_size: int = 8  # samples per rank per forward; accumulation fills the rest
    precision: str = "fp32"  # fp32 | bf16 (bf16 compute, fp32 master weights)
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard) | none; ddp/fsdp only under torchrun
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto: cuda:<local rank> when available, else cpu
    seed: int = 0  # noise, sigmas and condition dropout
    output_dir: str = "runs/train"
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    resume: str = "auto"  # auto: the latest checkpoint in output_dir | a checkpoint folder | none


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self) -> None:
        checks = [
            ("model.trainable", self.model.trainable, TRAINABLE_SETS),
            ("model.generation_prompt", self.model.generation_prompt, ("train", "inference")),
            ("objective.generation", self.objective.generation, GENERATION_OBJECTIVES),
            ("objective.sigma_sampling", self.objective.sigma_sampling, ("uniform", "logit_normal")),
            ("objective.targets", self.objective.targets, ("precomputed", "online")),
            ("optim.schedule", self.optim.schedule, SCHEDULES),
            ("train.parallel", self.train.parallel, PARALLEL),
            ("train.precision", self.train.precision, PRECISIONS),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"config: {name} must be one of {allowed}, got {value!r}")
        if self.objective.generation == "none" and not self.objective.text:
            raise ValueError("config: nothing to train: objective.generation is none and objective.text is false")
        if self.objective.generation != "none" and not self.data.generation:
            raise ValueError(f"config: objective.generation = {self.objective.generation!r} needs data.generation shards")
        if self.objective.text and not self.data.understanding:
            raise ValueError("config: objective.text needs data.understanding shards or JSON files")
        if self.train.batch_size % self.train.micro_batch_size:
            raise ValueError(
                f"config: train.batch_size {self.train.batch_size} is not a multiple of micro_batch_size "
                f"{self.train.micro_batch_size}"
            )
        if not 0.0 <= self.objective.condition_dropout < 1.0:
            raise ValueError(f"config: objective.condition_dropout must be in [0, 1), got {self.objective.condition_dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """A TOML / --set value as the field's type (ints become floats where a float is wanted)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    base = origin or hint
    if base in (list, dict) and not isinstance(value, base):
        raise TypeError(f"config: {where} must be a {base.__name__}, got {value!r}")
    if base in (int, float, str, bool) and not isinstance(value, base):
        raise TypeError(f"config: {where} must be {base.__name__}, got {value!r}")
    if base is int and isinstance(value, bool):
        raise TypeError(f"config: {where} must be int, got {value!r}")
    return value


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    for section, values in raw.items():
        if section not in hints:
            raise ValueError(f"config: unknown section [{section}] (known: {', '.join(hints)})")
        if not isinstance(values, dict):
            raise TypeError(f"config: [{section}] must be a table")
        target = getattr(cfg, section)
        fields = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in fields:
                raise ValueError(f"config: unknown key {section}.{key} (known: {', '.join(fields)})")
            setattr(target, key, _coerce(value, fields[key], f"{section}.{key}"))
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value`; the value is read as a TOML value, else taken as a bare string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    path, value_text = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    return section, key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file not found: {file}")
        try:
            raw = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{file} is not valid TOML: {exc}") from exc
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    cfg = config_from_dict(raw)
    cfg.validate()
    return cfg
