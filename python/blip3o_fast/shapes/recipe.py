"""The tiny shapes model's whole recipe, from nothing to one checkpoint folder (issue 7).

    1. data          the shapes world as WebDataset shards (train + held-out), shapes.writer
    2. autoencoder   the target feature encoder (64 tokens of width dim), shapes.autoencoder
    (precompute)     with a stage's objective.targets = "precomputed": the autoencoder's tokens of every
                     caption's image written once into feature shards (training.precompute)
    (tower)          with a [tower] table, the initial model's vision tower pretrained on the training scenes
                     (their records as labels; shapes.tower_pretraining): the stand-in for a pretrained vision encoder
    3. backbone      blip3o_fast's own trainer from scratch on [backbone] (a trainer config; the recipe fills
                     in data, targets, output folder): the shipped recipe trains understanding here,
                     next-token CE on the question/answer conversations
    4. generation    with a [generation] table, a second trainer run from stage 3's checkpoint, on
                     [backbone] with [generation] merged over it: BLIP3-o's sequential recipe, backbone
                     frozen, queries and DiT trained by CLIP + flow matching on the captions (the
                     autoencoder's tokens as targets). Without [generation], stage 3 is the whole run
                     (e.g. one multitask run of both objectives)
    5. pixel decoder the feature -> pixel flow decoder, shapes.pixel_diffusion
    6. assemble      the trained BLIP3o with the flow decoder as diffusion-decoder/, in the published
                     layout: OUT/model, loadable by BLIP3o.from_pretrained; [sampler] sets the defaults its
                     config records (guidance_scale: the CFG scale generate_image uses when given none)

The recipe file (configs/tiny_shapes.toml) has sections [shapes], [autoencoder], [pixel_decoder], [init], [tower],
[backbone] (with [backbone.model], [backbone.objective], ...), [generation], [sampler] and [quick]: dotted overrides
applied by --quick, a smoke run of the same code. OUT/recipe.json records the resolved settings, every stage's
time and the reconstruction scores (how the analyser scores held-out images after the autoencoder, and
after the flow decoder on their true features: the bound generation can reach).
"""

from __future__ import annotations

import copy
import json
import time
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from blip3o_fast.shapes.autoencoder import (
    AutoencoderConfig, ShapesAutoencoder, image_to_tensor, load_images, tensor_to_images, train_autoencoder,
)
from blip3o_fast.shapes.pixel_diffusion import FeatureDecoderConfig, FeatureFlowDecoder, train_pixel_decoder

SECTIONS = ("shapes", "autoencoder", "pixel_decoder", "init", "tower", "backbone", "generation", "sampler", "quick")
# Keys of [autoencoder] / [pixel_decoder] that are training settings, not model settings.
TRAINING_KEYS = ("steps", "batch_size", "lr", "seed", "object_weight", "latent_noise")
TOWER_KEYS = ("steps", "batch_size", "lr", "seed")  # [tower]: shapes.tower_pretraining.pretrain_tower's settings
SAMPLER_KEYS = ("guidance_scale",)  # [sampler]: sampler defaults written into the checkpoint's config (floats)


def check_keys(section: str, table: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = set(table) - set(known)
    if unknown:
        raise ValueError(f"[{section}]: unknown keys {sorted(unknown)} (known: {', '.join(known)})")


def load_recipe(path: str | Path, quick: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe file as a dict, with [quick] applied when asked, then `section.key=value` overrides
    (dotted into [backbone] tables too: backbone.train.max_steps=10)."""
    from blip3o_fast.training.config import parse_override

    raw = tomllib.loads(Path(path).read_text())
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ValueError(f"recipe {path}: unknown sections {sorted(unknown)} (known: {', '.join(SECTIONS)})")
    quick_table = raw.pop("quick", {})
    pairs = [(k, v) for k, v in quick_table.items()] if quick else []
    for text in overrides:
        section, key, value = parse_override(text)
        pairs.append((f"{section}.{key}", value))
    for dotted, value in pairs:
        *parents, key = dotted.split(".")
        table = raw
        for p in parents:
            table = table.setdefault(p, {})
        table[key] = value
    return raw


def _split(section: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training settings, model settings) of an [autoencoder] / [pixel_decoder] table."""
    return {k: v for k, v in section.items() if k in TRAINING_KEYS}, {k: v for k, v in section.items() if k not in TRAINING_KEYS}


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """base with over's keys replaced, recursively into tables (a deep copy)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        both_tables = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_tables else copy.deepcopy(value)
    return out


def trainer_stages(recipe: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(stage name, trainer config table) of each trainer run, in order (module doc, stages 3 and 4)."""
    backbone = recipe.get("backbone", {})
    stages = [("backbone", backbone)]
    if "generation" in recipe:
        stages.append(("generation", _merged(backbone, recipe["generation"])))
    return stages


def uses_precomputed_targets(recipe: dict[str, Any]) -> bool:
    return any(t.get("objective", {}).get("targets", "online") == "precomputed" for _, t in trainer_stages(recipe))


def initial_config(backbone: str, init: dict[str, Any], vocab_size: int):
    """BLIP3oConfig.tiny(backbone) with [init.text] / [init.vision] / [init.dit] fields replaced: the widths
    and depths of the shapes model, and its text RoPE (rope_theta, mrope_section). The vision tower's output
    and the DiT's caption input follow the text width."""
    import dataclasses

    from blip3o_fast.models.config import BLIP3oConfig

    cfg = BLIP3oConfig.tiny(backbone, vocab_size=vocab_size)
    try:
        cfg.text = dataclasses.replace(cfg.text, **init.get("text", {}))
        if cfg.vision is not None:
            vision = {"out_hidden_size": cfg.text.hidden_size, **init.get("vision", {})}
            cfg.vision = dataclasses.replace(cfg.vision, **vision)
        elif init.get("vision"):
            raise ValueError(f"[init.vision] given, but the {backbone} backbone has no vision tower")
        cfg.dit = dataclasses.replace(cfg.dit, **{"caption_dim": cfg.text.hidden_size, **init.get("dit", {})})
    except TypeError as exc:  # an unknown field name
        raise ValueError(f"[init]: {exc}") from exc
    try:
        cfg.text.check_mrope()
    except ValueError as exc:
        raise ValueError(f"[init.text]: {exc}") from exc
    return cfg


def write_initial_model(recipe: dict[str, Any], folder: Path) -> str:
    """The backbone's starting point. A tiny:<backbone> source is built here, adapted by [init] for
    from-scratch training on 64x64 images, and written to `folder` (returned as the trainer's source):
    [init.text] / [init.vision] / [init.dit] set the model's sizes and RoPE (initial_config); tokenizer = "shapes"
    trains the BPE tokenizer (vocab_size ids) on the shapes world's text, so each of its words is one
    token (the tiny tokenizer spells "orange" in four pieces; a caption prompt took ~95 tokens, now ~38);
    min_pixels raises the image processor's floor (64x64 gives only 4 vision tokens; 112*112 gives 16);
    embedding_std re-draws the token embeddings (N(0, 1) rows tied to lm_head made the first text CE about 57);
    query_std re-draws the latent queries (the release's N(0, 1) queries swamp the caption in their residual
    stream: at the tiny size their final states then vary ~3% across captions and the DiT learns to ignore them).
    Any other source is returned unchanged."""
    from blip3o_fast.models.blip3o import BLIP3o
    from blip3o_fast.tiny import embedding_rows
    from blip3o_fast.training.model import TINY_PREFIX
    from blip3o_fast.tokenizer import build_tiny_tokenizer

    model_section = recipe.get("backbone", {}).get("model", {})
    source = model_section.get("source", "tiny:qwen2_5_vl")
    init = recipe.get("init", {})
    if not source.startswith(TINY_PREFIX) or not init:
        return source
    backbone, seed = source[len(TINY_PREFIX):], model_section.get("seed", 0)
    kind = init.get("tokenizer", "tiny")
    if kind == "shapes":
        from blip3o_fast.shapes.world import tokenizer_corpus

        tokenizer = build_tiny_tokenizer(backbone, int(init.get("vocab_size", 512)), tokenizer_corpus())
    elif kind == "tiny":
        tokenizer = build_tiny_tokenizer(backbone)
    else:
        raise ValueError(f"[init] tokenizer must be tiny or shapes, got {kind!r}")
    cfg = initial_config(backbone, init, embedding_rows(tokenizer))
    model = BLIP3o.from_config(cfg, seed=seed, tokenizer=tokenizer)
    if "min_pixels" in init and model.image_processor is not None:
        model.image_processor.min_pixels = int(init["min_pixels"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in (("embedding_std", model.network.model.embed_tokens.weight),
                           ("query_std", model.network.model.latent_queries)):
            if key in init:
                param.copy_(torch.randn(param.shape, generator=generator) * float(init[key]))
    model.save_pretrained(folder)
    return str(folder)


def pretrain_initial_tower(source: str, table: dict[str, Any], shapes: dict[str, Any],
                           log: Callable[[str], None] = print) -> list[float]:
    """[tower]: pretrains the vision tower of the initial model in folder `source` on the training split's scenes
    (the same (seed, index) draws as its shards, with their scene records as labels) and writes it back;
    returns the losses."""
    from PIL import Image

    from blip3o_fast.models.blip3o import BLIP3o
    from blip3o_fast.shapes.tower_pretraining import pretrain_tower
    from blip3o_fast.shapes.world import generate

    check_keys("tower", table, TOWER_KEYS)
    if not Path(source).is_dir():
        raise ValueError(f"[tower] pretrains the initial model [init] writes; the source is {source!r}")
    model = BLIP3o.from_pretrained(source)
    if model.network.visual is None:
        raise ValueError("[tower] needs a backbone with a vision tower")
    samples = list(generate(shapes.get("train_scenes", 4000), shapes.get("seed", 0)))
    losses = pretrain_tower(model.network.visual, model.image_processor, [Image.fromarray(s.image) for s in samples],
                            [s.scene for s in samples], log=log, **table)
    model.save_pretrained(source)
    return losses


def trainer_config(table: dict[str, Any], data_dir: Path, autoencoder_dir: Path, run_dir: Path, dim: int,
                   source: str | None = None):
    """The trainer config of one trainer stage: its table (trainer_stages) with the data, targets, output and
    (when given) model source filled in (precomputed targets: the generation samples come from
    data_dir/train_targets, see run_recipe)."""
    from blip3o_fast.training.config import config_from_dict

    raw = copy.deepcopy(table)
    shards = [str(data_dir / "train" / "*.tar")]
    precomputed = raw.get("objective", {}).get("targets", "online") == "precomputed"
    generation = [str(data_dir / "train_targets" / "*.tar")] if precomputed else shards
    raw.setdefault("data", {}).update(generation=generation, understanding=shards)
    raw.setdefault("objective", {})["autoencoder"] = str(autoencoder_dir)
    raw["objective"].setdefault("targets", "online")
    raw.setdefault("model", {}).setdefault("dit_overrides", {})["in_channels"] = dim
    if source is not None:
        raw["model"]["source"] = source
    raw.setdefault("train", {}).update(output_dir=str(run_dir), resume="none")
    cfg = config_from_dict(raw)
    cfg.validate()
    return cfg


@torch.no_grad()
def reconstruction_scores(autoencoder: ShapesAutoencoder, decoder: FeatureFlowDecoder | None, n: int,
                          seed: int | None = None) -> dict[str, float]:
    """Fraction of n held-out scenes whose image the analyser passes against the scene's own spec:
    the ground-truth render, the autoencoder's reconstruction, and the flow decoder's image from the
    true features (seed i per scene)."""
    from blip3o_fast.shapes.analyser import analyse
    from blip3o_fast.shapes.geneval import check
    from blip3o_fast.shapes.understanding import HELDOUT_SEED
    from blip3o_fast.shapes.world import generate

    from PIL import Image

    samples = list(generate(n, HELDOUT_SEED if seed is None else seed, autoencoder.cfg.resolution))
    specs = [s.scene.spec for s in samples]
    truth = [Image.fromarray(s.image) for s in samples]
    x = torch.stack([image_to_tensor(im, autoencoder.cfg.resolution) for im in truth])
    feats = autoencoder.encode(x)
    images = {"ground_truth": truth, "autoencoder": tensor_to_images(autoencoder.decode(feats))}
    if decoder is not None:
        steps = decoder.cfg.num_inference_steps
        images[f"flow_decoder_{steps}_steps"] = decoder.decode(feats, None, steps, 1.0, list(range(n)))

    def rate(ims) -> float:
        return sum(check(spec, analyse(im))[0] for spec, im in zip(specs, ims)) / len(ims)

    return {name: rate(ims) for name, ims in images.items()}


def run_recipe(path: str | Path, out: str | Path, quick: bool = False, overrides: list[str] | tuple[str, ...] = (),
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every stage into `out` (module doc); returns what OUT/recipe.json records."""
    from blip3o_fast.shapes.writer import write_dataset
    from blip3o_fast.training.trainer import Trainer

    recipe = load_recipe(path, quick, overrides)
    # [sampler] is checked and converted before the stages run, not half an hour later at assembly.
    check_keys("sampler", recipe.get("sampler", {}), SAMPLER_KEYS)
    sampler = {key: float(value) for key, value in recipe.get("sampler", {}).items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"recipe": recipe, "quick": quick, "seconds": {}}
    clock = time.perf_counter()

    def stage_done(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report["seconds"][name] = round(now - clock, 2)
        log(f"== {name}: {now - clock:.1f} s")
        clock = now

    s = recipe.get("shapes", {})
    data_dir = out / "data"
    write_dataset(data_dir, s.get("train_scenes", 4000), seed=s.get("seed", 0), heldout=s.get("heldout_scenes", 200),
                  shard_size=s.get("shard_size", 1000))
    images = load_images(str(data_dir / "train" / "*.tar"))
    stage_done("data")

    train_args, model_args = _split(recipe.get("autoencoder", {}))
    autoencoder, ae_losses = train_autoencoder(images, AutoencoderConfig(**model_args), log=log, **train_args)
    autoencoder.save_pretrained(out / "autoencoder")
    report["autoencoder_loss"] = {"first": ae_losses[0], "last": ae_losses[-1]}
    stage_done("autoencoder")

    if uses_precomputed_targets(recipe):
        from blip3o_fast.training.precompute import load_target_encoder, precompute

        encoder = load_target_encoder(str(out / "autoencoder"))
        precompute(str(data_dir / "train" / "*.tar"), data_dir / "train_targets", encoder,
                   shard_size=s.get("shard_size", 1000), log=log)
        stage_done("precompute")

    source = write_initial_model(recipe, out / "init")
    if recipe.get("tower", {}).get("steps", 0) > 0:
        tower_losses = pretrain_initial_tower(source, recipe["tower"], s, log)
        report["tower_loss"] = {"first": tower_losses[0], "last": tower_losses[-1]}
        stage_done("tower")
    for name, table in trainer_stages(recipe):
        cfg = trainer_config(table, data_dir, out / "autoencoder", out / name, autoencoder.cfg.dim, source)
        trainer = Trainer(cfg)
        try:
            result = trainer.fit()
            model = trainer.model
        finally:
            trainer.close()
        source = str(Path(result.last_checkpoint) / "model")  # the next stage starts from this one's weights
        report[f"{name}_loss"] = {k: {"first": result.history[0][k], "last": result.history[-1][k]}
                                  for k in ("gen_loss", "text_loss")}
        stage_done(name)

    train_args, model_args = _split(recipe.get("pixel_decoder", {}))
    decoder, pd_losses = train_pixel_decoder(autoencoder, images, FeatureDecoderConfig(**model_args), log=log,
                                             **train_args)
    report["pixel_decoder_loss"] = {"first": pd_losses[0], "last": pd_losses[-1]}
    stage_done("pixel_decoder")

    model.network.eval()
    model.pixel_decoder = decoder
    model.config.decoder = decoder.cfg
    for key, value in sampler.items():
        setattr(model.config, key, value)
    model.save_pretrained(out / "model")
    stage_done("assemble")

    report["reconstruction"] = reconstruction_scores(autoencoder, decoder, s.get("score_scenes", 100))
    stage_done("reconstruction_scores")
    report["total_seconds"] = round(sum(report["seconds"].values()), 2)
    report["decoder_config"] = asdict(decoder.cfg)
    (out / "recipe.json").write_text(json.dumps(report, indent=2))
    log(f"model: {out / 'model'}  reconstruction: {report['reconstruction']}  total {report['total_seconds']:.0f} s")
    return report
