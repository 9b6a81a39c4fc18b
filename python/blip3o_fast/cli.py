"""The `blip3o-fast` console command: demo, generate, chat, edit.

--model takes a checkpoint folder, or `tiny` / `tiny-llama3` for the embedded models built from a
fixed seed (no download).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EMBEDDED = {"tiny": "qwen2_5_vl", "tiny-qwen2_5_vl": "qwen2_5_vl", "tiny-llama3": "llama3"}
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


def cmd_demo(args) -> None:
    """The main job on the embedded default: a caption -> image, and a question about that image."""
    import torch

    from blip3o_fast.ops import available_backends
    from blip3o_fast.tiny import tiny_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    watch = Stopwatch()
    model = tiny_model("qwen2_5_vl", seed=args.seed)
    print(f"backends built: {', '.join(available_backends())}")
    watch.lap("built the embedded tiny BLIP3-o (Qwen2.5-VL backbone, random weights from a fixed seed)")
    features = model.generate_image_features([args.prompt], num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    watch.lap(f"text -> CLIP features {tuple(features.shape)}: backbone prefill + {args.steps}-step flow-matching DiT sampler")
    images = model.decode_features(features, num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    paths = _save(images, args.out)
    watch.lap(f"CLIP features -> pixels: diffusion decoder + VAE, wrote {', '.join(paths)}")
    answer = model.generate_text([args.question], images=[[images[0]]], max_new_tokens=args.max_new_tokens)[0]
    watch.lap("image -> text: vision tower + paged-KV engine, greedy decoding")
    print(f"prompt:   {args.prompt!r}\nimage:    {paths[0]} ({images[0].size[0]}x{images[0].size[1]})")
    print(f"question: {args.question!r}\nanswer:   {answer!r}")
    print("(random weights: the image is noise and the answer is gibberish; the stages and their times are real)")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip3o-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, model=True):
        if model:
            p.add_argument("--model", default="tiny", help="checkpoint folder, or tiny / tiny-llama3 (embedded)")
            p.add_argument("--device", default="cpu")
            p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
        p.add_argument("--seed", type=int, default=0)

    def sampling(p):
        p.add_argument("--steps", type=int, default=30, help="flow-matching steps of the DiT sampler")
        p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")

    demo = sub.add_parser("demo", help="the main job on the embedded default model (no downloads)")
    common(demo, model=False)
    sampling(demo)
    demo.add_argument("--prompt", default="a red circle on the left")
    demo.add_argument("--question", default="What colour is the shape?")
    demo.add_argument("--max-new-tokens", type=int, default=16)
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
