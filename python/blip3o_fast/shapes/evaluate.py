"""`blip3o-fast eval shapes`: Mini-GenEval and the understanding score of a BLIP3-o model on the shapes world.

Images come from BLIP3o.generate_image (sampler settings left at the model's defaults unless given), answers
from BLIP3o.generate_text (greedy); both are scored by geneval.py / understanding.py, printed as tables with
their timings, and written as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from blip3o_fast.shapes import geneval, understanding


def evaluate(model, *, images_per_prompt: int = 4, seed: int = 0, limit: int | None = None,
             understanding_images: int = 60, understanding_seed: int | None = None,
             batch_size: int = 8, max_new_tokens: int = 8,
             sampler: dict | None = None, save_images: str | None = None, log=print) -> dict:
    """Run both scores on `model`; `sampler` holds generate_image keywords (num_steps, guidance_scale,
    solver) to override. understanding_seed picks the scenes asked about: the held-out split by default, the
    training scenes with the training data's seed (0 in the recipe), which tells underfitting from
    overfitting. Returns the JSON-ready result."""
    sampler = {k: v for k, v in (sampler or {}).items() if v is not None}
    prompts = geneval.limit_per_category(geneval.eval_prompts(), limit)
    save_dir = Path(save_images) if save_images else None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)

    def save(prompt, image_seed, image, record):
        name = f"{record['prompt_index']:03d}_{prompt.prompt.replace(' ', '_')}_{image_seed}.png"
        image.save(save_dir / name)
        record["file"] = name

    log(f"Mini-GenEval: {len(prompts)} prompts x {images_per_prompt} images, seed {seed}, "
        f"sampler {sampler or 'model defaults'}")
    t0 = time.perf_counter()
    gen = geneval.score(
        prompts, lambda captions, seeds: model.generate_image(captions, seed=seeds, **sampler),
        images_per_prompt=images_per_prompt, seed=seed, batch_size=batch_size,
        on_image=save if save_dir is not None else None,
    )
    gen_seconds = time.perf_counter() - t0
    n_images = len(gen["records"])
    log(geneval.table(gen))
    log(f"[{gen_seconds:8.3f} s] generated and analysed {n_images} images "
        f"({gen_seconds / max(1, n_images):.3f} s/image)")

    if understanding_seed is None:
        understanding_seed = understanding.HELDOUT_SEED
    questions = (understanding.heldout_questions(understanding_images, seed=understanding_seed)
                 if understanding_images > 0 else [])
    t0 = time.perf_counter()
    und = understanding.score(
        questions,
        lambda texts, images: model.generate_text(texts, images=[[im] for im in images],
                                                  max_new_tokens=max_new_tokens),
        batch_size=4 * batch_size,
    )
    und_seconds = time.perf_counter() - t0
    if questions:
        split = "held-out" if understanding_seed == understanding.HELDOUT_SEED else "world"
        log(f"Understanding: {len(questions)} questions on {understanding_images} {split} images "
            f"(seed {understanding_seed})")
        log(understanding.table(und))
        log(f"[{und_seconds:8.3f} s] answered {len(questions)} questions "
            f"({und_seconds / len(questions):.3f} s/question)")
    return {
        "settings": {"images_per_prompt": images_per_prompt, "seed": seed, "limit": limit, "sampler": sampler,
                     "understanding_images": understanding_images, "understanding_seed": understanding_seed,
                     "max_new_tokens": max_new_tokens},
        "geneval": gen,
        "understanding": und if questions else None,
        "timings": {"generation_s": gen_seconds, "images": n_images, "understanding_s": und_seconds,
                    "questions": len(questions)},
    }


def write_json(result: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
