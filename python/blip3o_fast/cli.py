"""The `blip3o-fast` console command: demo, generate, chat, edit, precompute, train.

--model takes a checkpoint folder, the name of a checkpoint shipped with the package (`tiny-shapes`, trained
on the shapes world), or `tiny` / `tiny-llama3` for the random models built from a fixed seed (no download).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EMBEDDED = {"tiny": "qwen2_5_vl", "tiny-qwen2_5_vl": "qwen2_5_vl", "tiny-llama3": "llama3"}
DEMO_PROMPTS = ("a red circle", "a blue square on the left", "two yellow triangles",
                "a green circle above a purple square")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


class Stopwatch:
    """Prints each stage's wall time as it finishes."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        print(f"[{now - self.t0:8.3f} s] {stage}", flush=True)
        self.t0 = now


def _load(name: str, device: str, dtype: str):
    import torch

    from blip3o_fast import BLIP3o
    from blip3o_fast.tiny import tiny_model

    if name in EMBEDDED:
        model = tiny_model(EMBEDDED[name])
    else:
        model = BLIP3o.from_pretrained(name, device=device, dtype=getattr(torch, DTYPES[dtype]))
    return model.to(device=device, dtype=getattr(torch, DTYPES[dtype]))


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise SystemExit(f"error: image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise SystemExit(f"error: cannot read image {path}: {exc}") from None


def _save(images, out: str) -> list[str]:
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = out_path if len(images) == 1 else out_path.with_name(f"{out_path.stem}_{i}{out_path.suffix}")
        img.save(p)
        paths.append(str(p))
    return paths


def _describe(analysis) -> str:
    objects = ", ".join(f"{o.colour} {o.shape} ({o.position})" for o in analysis.objects)
    return f"{analysis.background} background; {objects or 'no objects'}"


def cmd_demo(args) -> None:
    """The main job on a model that ships with the package (default tiny-shapes, no downloads): captions ->
    images, then questions about a held-out scene, each stage timed; the shapes analyser reads the images."""
    import torch
    from PIL import Image

    from blip3o_fast.ops import available_backends
    from blip3o_fast.shapes.analyser import analyse
    from blip3o_fast.shapes.world import generate

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    watch = Stopwatch()
    model = _load(args.model, "cpu", "float32")
    print(f"backends built: {', '.join(available_backends())}")
    watch.lap(f"loaded {args.model}")
    prompts = args.prompt or DEMO_PROMPTS
    images = model.generate_image(prompts, num_steps=args.steps, guidance_scale=args.guidance,
                                  seed=[args.seed + i for i in range(len(prompts))])
    paths = _save(images, args.out)
    watch.lap(f"text -> image for {len(prompts)} prompts: backbone prefill, {args.steps}-step flow-matching DiT "
              f"sampler (guidance {model.resolve_guidance(args.guidance)}), pixel decoder")
    for prompt, image, path in zip(prompts, images, paths):
        print(f"  {prompt!r:44} -> {path}   analyser reads: {_describe(analyse(image))}")
    scene = next(iter(generate(1, args.scene_seed, prefix="demo-")))
    scene_path = Path(args.out).with_name("scene.png")
    Image.fromarray(scene.image).save(scene_path)
    questions = [q for _, q, _ in scene.questions]
    answers = model.generate_text(questions, images=[[Image.fromarray(scene.image)]] * len(questions),
                                  max_new_tokens=args.max_new_tokens)
    watch.lap(f"image -> text for {len(questions)} questions: vision tower + paged-KV engine, greedy decoding")
    print(f"  scene {scene_path}: {scene.caption!r}")
    for (_, question, truth), answer in zip(scene.questions, answers):
        print(f"  {question!r:40} -> {answer!r:16} (true: {truth!r})")


def cmd_generate(args) -> None:
    watch = Stopwatch()
    model = _load(args.model, args.device, args.dtype)
    watch.lap("loaded model")
    images = model.generate_image(args.prompt, num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    watch.lap("generated")
    for p in _save(images, args.out):
        print(p)


def cmd_chat(args) -> None:
    watch = Stopwatch()
    model = _load(args.model, args.device, args.dtype)
    watch.lap("loaded model")
    images = [[_open_image(p) for p in args.image]] if args.image else None
    text = model.generate_text(
        [args.prompt], images=images, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )[0]
    watch.lap("answered")
    print(text)


def cmd_edit(args) -> None:
    watch = Stopwatch()
    model = _load(args.model, args.device, args.dtype)
    watch.lap("loaded model")
    images = [[_open_image(p) for p in args.image]]
    out = model.edit_image(images, [args.instruction], num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    watch.lap("edited")
    for p in _save(out, args.out):
        print(p)


def cmd_precompute(args) -> None:
    """Encode the generation targets of WebDataset shards once (EVA-CLIP features or VAE latents)."""
    import torch

    from blip3o_fast.training.precompute import load_target_encoder, precompute

    watch = Stopwatch()
    encoder = load_target_encoder(args.encoder, device=args.device, dtype=getattr(torch, DTYPES[args.dtype]),
                                  image_size=args.image_size, seed=args.seed)
    watch.lap(f"loaded the {encoder.kind} encoder")
    manifest = precompute(args.shards, args.out, encoder, batch_size=args.batch_size, shard_size=args.shard_size,
                          keep_images=args.keep_images)
    watch.lap(f"precomputed {manifest['count']} targets {tuple(manifest['target']['shape']) if manifest['target'] else ''}")
    print(os.path.join(args.out, "precompute.json"))


def cmd_train(args) -> None:
    """Train from a TOML config; under torchrun every process runs this."""
    from blip3o_fast.training.config import load_config
    from blip3o_fast.training.trainer import train

    train(load_config(args.config, args.set))


def cmd_train_shapes(args) -> None:
    """The tiny shapes model's whole recipe (shapes.recipe): data, autoencoder, backbone + DiT, pixel decoder."""
    from blip3o_fast.shapes.recipe import run_recipe

    run_recipe(args.config, args.out, quick=args.quick, overrides=args.set)


def cmd_shapes_data(args) -> None:
    """Write the synthetic shapes world: train + held-out WebDataset shards and JSON conversation files."""
    from blip3o_fast.shapes.understanding import HELDOUT_SEED
    from blip3o_fast.shapes.writer import write_dataset

    watch = Stopwatch()
    manifest = write_dataset(args.out, args.train, seed=args.seed, heldout=args.heldout,
                             heldout_seed=HELDOUT_SEED if args.heldout_seed is None else args.heldout_seed,
                             width=args.size, shard_size=args.shard_size)
    counts = ", ".join(f"{name} {s['scenes']} scenes in {len(s['shards'])} shards" for name, s in manifest["splits"].items())
    watch.lap(f"wrote {counts}")
    print(os.path.join(args.out, "manifest.json"))


def cmd_eval_shapes(args) -> None:
    """Mini-GenEval + understanding accuracy on the shapes world; --model also takes tiny:<backbone> (random)."""
    import torch

    from blip3o_fast.shapes.evaluate import evaluate, write_json
    from blip3o_fast.tiny import tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    watch = Stopwatch()
    if args.model.startswith("tiny:"):
        model = tiny_model(args.model.split(":", 1)[1]).to(device=args.device, dtype=getattr(torch, DTYPES[args.dtype]))
    else:
        model = _load(args.model, args.device, args.dtype)
    watch.lap(f"loaded {args.model}")
    result = evaluate(model, images_per_prompt=args.images_per_prompt, seed=args.seed, limit=args.limit,
                      understanding_images=args.understanding_images, understanding_seed=args.understanding_seed,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, save_images=args.save_images,
                      sampler={"num_steps": args.steps, "guidance_scale": args.guidance, "solver": args.solver})
    result["model"] = args.model
    if args.out:
        write_json(result, args.out)
        print(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip3o-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, model=True):
        if model:
            p.add_argument("--model", default="tiny", help="checkpoint folder, tiny-shapes (shipped), or tiny / tiny-llama3")
            p.add_argument("--device", default="cpu")
            p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
        p.add_argument("--seed", type=int, default=0)

    def sampling(p):
        p.add_argument("--steps", type=int, default=30, help="flow-matching steps of the DiT sampler")
        p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")

    demo = sub.add_parser("demo", help="the main job on the shipped tiny-shapes model (no downloads)")
    common(demo, model=False)
    sampling(demo)
    demo.add_argument("--model", default="tiny-shapes", help="a shipped checkpoint (tiny-shapes), folder, or tiny")
    demo.add_argument("--prompt", action="append",
                      help=f"a caption (repeatable; default: {'; '.join(DEMO_PROMPTS)})")
    demo.add_argument("--scene-seed", type=int, default=7, help="seed of the held-out scene the questions are about")
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.add_argument("--out", default="out/demo.png")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="text -> image")
    common(gen)
    sampling(gen)
    gen.add_argument("prompt", nargs="+", help="one or more captions")
    gen.add_argument("--out", default="out/image.png")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="text (+ images) -> text")
    common(chat)
    chat.add_argument("prompt")
    chat.add_argument("--image", action="append", default=[], help="an input image (repeatable)")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(func=cmd_chat)

    edit = sub.add_parser("edit", help="image(s) + instruction -> image")
    common(edit)
    sampling(edit)
    edit.add_argument("instruction")
    edit.add_argument("--image", action="append", required=True, help="an input image (repeatable)")
    edit.add_argument("--out", default="out/edited.png")
    edit.set_defaults(func=cmd_edit)

    pre = sub.add_parser("precompute", help="encode training targets of WebDataset shards once (EVA-CLIP / VAE)")
    pre.add_argument("shards", nargs="+", help="input shards: paths, globs or brace patterns")
    pre.add_argument("--out", required=True, help="output folder: shards with feat.npy + precompute.json (resumable)")
    pre.add_argument("--encoder", default="tiny-eva",
                     help="an EVA-CLIP checkpoint (file or folder), a diffusers AutoencoderKL folder, or tiny-eva")
    pre.add_argument("--batch-size", type=int, default=32)
    pre.add_argument("--shard-size", type=int, default=1000, help="samples per output shard")
    pre.add_argument("--image-size", type=int, default=None, help="VAE input resolution (default: its sample_size)")
    pre.add_argument("--keep-images", action="store_true", help="also copy the target images into the output")
    pre.add_argument("--device", default="cpu")
    pre.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    pre.add_argument("--seed", type=int, default=0, help="weights of tiny-eva")
    pre.set_defaults(func=cmd_precompute)

    tr = sub.add_parser("train", help="train from a TOML config (configs/); run under torchrun for DDP / FSDP2")
    tr.add_argument("config", help="a TOML file, e.g. configs/t2i_pretrain.toml")
    tr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (a TOML value, or a bare string); repeatable")
    tr.set_defaults(func=cmd_train)

    ts = sub.add_parser("train-shapes", help="the tiny shapes model's whole recipe from a recipe file (configs/tiny_shapes.toml)")
    ts.add_argument("config", help="a recipe TOML file, e.g. configs/tiny_shapes.toml")
    ts.add_argument("--out", default="runs/tiny_shapes", help="output folder (the checkpoint lands in OUT/model)")
    ts.add_argument("--quick", action="store_true", help="apply the file's [quick] table: a smoke run")
    ts.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a recipe value, e.g. backbone.train.max_steps=100; repeatable")
    ts.set_defaults(func=cmd_train_shapes)

    sd = sub.add_parser("shapes-data", help="write the synthetic shapes world (WebDataset shards + JSON)")
    sd.add_argument("out", help="output folder")
    sd.add_argument("--train", type=int, default=10000, help="training scenes")
    sd.add_argument("--heldout", type=int, default=200, help="held-out scenes (written with --heldout-seed)")
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--heldout-seed", type=int, default=None, help="default: the eval's held-out seed")
    sd.add_argument("--size", type=int, default=64, help="image side in pixels")
    sd.add_argument("--shard-size", type=int, default=1000, help="scenes per shard")
    sd.set_defaults(func=cmd_shapes_data)

    ev = sub.add_parser("eval", help="benchmarks of a model")
    ev_sub = ev.add_subparsers(dest="benchmark", required=True)
    es = ev_sub.add_parser("shapes", help="Mini-GenEval + understanding accuracy on the shapes world")
    es.add_argument("--model", default="tiny-shapes", help="checkpoint folder, an embedded name, or tiny:<backbone> (random)")
    es.add_argument("--device", default="cpu")
    es.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    es.add_argument("--seed", type=int, default=0, help="base seed of the images (image k of prompt i: seed + 1000 i + k)")
    es.add_argument("--images-per-prompt", type=int, default=4)
    es.add_argument("--limit", type=int, default=None, help="only the first N prompts of each category")
    es.add_argument("--understanding-images", type=int, default=60, help="held-out images to ask about (0: skip)")
    es.add_argument("--understanding-seed", type=int, default=None,
                    help="world seed of the scenes asked about (default: the held-out split's; the recipe's "
                         "training data is seed 0)")
    es.add_argument("--steps", type=int, default=None, help="DiT sampler steps (default: the model's)")
    es.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    es.add_argument("--solver", default=None, choices=["euler", "heun", "multistep"])
    es.add_argument("--batch-size", type=int, default=8)
    es.add_argument("--max-new-tokens", type=int, default=8)
    es.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    es.add_argument("--out", default=None, help="write the results as JSON here")
    es.add_argument("--save-images", default=None, metavar="DIR", help="save every generated image here")
    es.set_defaults(func=cmd_eval_shapes)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
