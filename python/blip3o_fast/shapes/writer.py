"""Write shapes-world splits through the project's data layer, in both formats its readers take.

    OUT/<split>/shard-000000.tar ...   WebDataset shards (data.webdataset.write_shard); per scene three records:
        <key>_gen.png + <key>_gen.txt + <key>_gen.json   caption -> image (a generation sample)
        <key>_qa.png  + <key>_qa.json                     LLaVA understanding conversation about the image
        <key>_txt.json                                    text-only conversation: the caption, then the
                                                          questions it answers (world.caption_questions)
      (the reader makes one sample per record, and a record with a conversation is an understanding sample, so
      they are separate records). Each json also carries the scene under "scene". The text conversation is
      there for the backbone's text states: trained on image questions only, a shape word in a caption moved
      the latent queries' states half as far as a colour word, and the DiT drew the asked colour round.
    OUT/<split>/images/<key>.png       the images of the JSON file
    OUT/<split>.json                   LLaVA-style list for data.conversations: a caption pair
                                       {"image", "caption"}, a conversation {"image", "conversations"} and a
                                       text conversation {"conversations"} per scene
    OUT/manifest.json                  seeds, sizes, counts and shard lists

Every byte is a function of (seed, index): tar members carry mtime 0, PNG encoding is deterministic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from blip3o_fast.data.webdataset import write_shard
from blip3o_fast.shapes.understanding import HELDOUT_SEED
from blip3o_fast.shapes.world import caption_questions, generate, llava_conversation


def write_split(out_dir: str | os.PathLike, split: str, n: int, seed: int, width: int = 64,
                shard_size: int = 1000) -> dict:
    """n scenes of `seed` as shards, PNG files and <split>.json under out_dir; returns the split's summary."""
    if n < 1 or shard_size < 1:
        raise ValueError(f"need n >= 1 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    root = Path(out_dir)
    image_dir = root / split / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    shards, records, pending = [], [], []

    def flush() -> None:
        path = root / split / f"shard-{len(shards):06d}.tar"
        write_shard(path, pending)
        shards.append(str(path.relative_to(root)))
        pending.clear()

    for count, sample in enumerate(generate(n, seed, width, prefix=f"{split}-"), 1):
        image = Image.fromarray(sample.image)
        scene = sample.scene.to_dict()
        conversation = llava_conversation(sample.questions)
        text_conversation = llava_conversation(caption_questions(sample.scene, sample.questions), sample.caption)
        pending.append({"__key__": f"{sample.key}_gen", "png": image, "txt": sample.caption,
                        "json": {"caption": sample.caption, "scene": scene}})
        pending.append({"__key__": f"{sample.key}_qa", "png": image,
                        "json": {"conversations": conversation, "scene": scene}})
        pending.append({"__key__": f"{sample.key}_txt", "json": {"conversations": text_conversation, "scene": scene}})
        image_path = f"{split}/images/{sample.key}.png"
        image.save(root / image_path)
        records.append({"id": f"{sample.key}_gen", "image": image_path, "caption": sample.caption})
        records.append({"id": f"{sample.key}_qa", "image": image_path, "conversations": conversation})
        records.append({"id": f"{sample.key}_txt", "conversations": text_conversation})
        if count % shard_size == 0:  # shard_size scenes a shard, whatever records a scene has
            flush()
    if pending:
        flush()
    json_file = root / f"{split}.json"
    json_file.write_text(json.dumps(records, indent=1))
    return {"scenes": n, "seed": seed, "shards": shards, "json": json_file.name, "records": len(records)}


def write_dataset(out_dir: str | os.PathLike, train: int, seed: int = 0, heldout: int = 200,
                  heldout_seed: int = HELDOUT_SEED, width: int = 64, shard_size: int = 1000) -> dict:
    """A train split and a held-out split (another seed) plus manifest.json; returns the manifest."""
    if seed == heldout_seed:
        raise ValueError(f"the held-out split needs its own seed, not the training seed {seed}")
    manifest = {"world": "shapes", "width": width, "height": width, "splits": {}}
    manifest["splits"]["train"] = write_split(out_dir, "train", train, seed, width, shard_size)
    if heldout > 0:
        manifest["splits"]["heldout"] = write_split(out_dir, "heldout", heldout, heldout_seed, width, shard_size)
    (Path(out_dir) / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
