"""The training loop: one process, or torchrun with DDP or FSDP2 (gloo on CPU, NCCL on GPUs).

A step takes one global batch (train.batch_size samples over all ranks, see streams.py), splits this
rank's share into micro-batches, accumulates their gradients, clips and takes one AdamW step. Losses
are normalised by global counts (generation samples and labelled text tokens, summed over ranks and
micro-batches before the step), so the loss and the gradient are the same for any number of
processes and any accumulation; every random draw is keyed by (seed, step, sample key).

Precision: fp32, or bf16 compute with fp32 master weights through FSDP2's MixedPrecisionPolicy (the
fused ops want one dtype per call, so the model runs in bf16 rather than under autocast; the
released recipe's bf16 is likewise bf16 weights with fp32 master copies in the optimizer).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from blip3o_fast.data import DataStats
from blip3o_fast.training.batches import Collator, SampleEncoder, TrainBatch, batch_to
from blip3o_fast.training.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from blip3o_fast.training.config import TrainConfig
from blip3o_fast.training.model import TrainingModule, apply_gradient_checkpointing, load_model, set_trainable
from blip3o_fast.training.objectives import draw_flow, sample_generator, train_sigmas
from blip3o_fast.training.schedule import learning_rate, warmup_steps
from blip3o_fast.training.streams import SampleStream, global_batch
from blip3o_fast.training.targets import VAETargets, feature_targets


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per step run in this call
    data_stats: DataStats = field(default_factory=DataStats)
    output_dir: str = ""
    last_checkpoint: str | None = None


def _log(msg: str) -> None:
    print(msg, flush=True)


class Distributed:
    """The process group this run uses (created here unless one exists) and this rank's place in it."""

    def __init__(self, parallel: str, device_kind: str):
        self.created = False
        launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if parallel == "none" and world > 1:
            raise ValueError("train.parallel = 'none' under a multi-process launch: use ddp or fsdp")
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda" and launched:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if parallel != "none" and not dist.is_initialized():
            if launched:
                dist.init_process_group(backend)
            elif parallel == "fsdp":  # FSDP2 needs a process group, even for one process
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self.created = dist.is_initialized()
        self.enabled = dist.is_initialized() and parallel != "none"
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.enabled:
            dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled:
            # Let the gloo worker thread finish (and free) every pending collective while this thread
            # waits without the GIL: freeing a finished all_gather needs the GIL, and a process group
            # torn down in the meantime joins that thread while holding it (a deadlock at exit, seen).
            dist.barrier()
        if self.created:
            dist.destroy_process_group()


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.train.device != "auto":
        return torch.device(cfg.train.device)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def _wrap(module: TrainingModule, cfg: TrainConfig, ddp: Distributed, device: torch.device) -> torch.nn.Module:
    """DDP, FSDP2 (one shard unit per decoder layer, one for the DiT, then the rest), or as is."""
    parallel = cfg.train.parallel
    if cfg.train.precision == "bf16" and parallel != "fsdp":
        raise ValueError("train.precision = 'bf16' runs through FSDP2's mixed precision: set train.parallel = 'fsdp'")
    if parallel == "fsdp":
        policy = MixedPrecisionPolicy()
        if cfg.train.precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        net = module.network
        # The DiT is one unit: its forward reads every block's cross-attention weights up front
        # (precompute_condition), outside the blocks' own forward hooks. The vision tower stays in
        # the root unit, gathered every step: it runs only for micro-batches with images, and a
        # unit that runs on some ranks and not others would desynchronise the collectives.
        units = list(net.model.layers) + ([net.dit] if net.dit is not None else [])
        for unit in units:
            fully_shard(unit, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        return module
    if parallel == "ddp" and ddp.enabled and ddp.world > 1:
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.dist = Distributed(cfg.train.parallel, _device(cfg, int(os.environ.get("LOCAL_RANK", "0"))).type)
        self.device = _device(cfg, self.dist.local_rank)
        obj, m = cfg.objective, cfg.model
        self.model = load_model(m.source, seed=m.seed, dit_overrides=m.dit_overrides, generation=obj.generation != "none")
        network = self.model.network
        self.use_gen = obj.generation != "none"
        self.use_text = obj.text

        self.targets = None
        feature_dim = self.model.config.dit.in_channels if self.model.config.dit is not None else None
        if self.use_gen and obj.targets == "online":
            if obj.generation == "vae_flow":
                self.targets = VAETargets.from_source(obj.vae, self.model, obj.vae_resolution, self.device)
            else:
                self.targets = feature_targets(obj.eva, obj.autoencoder, m.seed, self.device)
                feature_dim = self.targets.feature_dim
        torch.manual_seed(m.seed + 1)  # modules the checkpoint lacks (the MSE head)
        self.module = TrainingModule(network, self.model.token_ids, obj.generation, feature_dim)
        set_trainable(network, m.trainable, obj.generation, obj.text)
        if cfg.train.gradient_checkpointing:
            apply_gradient_checkpointing(network)
        self.module.to(self.device)
        self.wrapped = _wrap(self.module, cfg, self.dist, self.device)
        self.params = [p for p in self.wrapped.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"nothing to train: trainable = {m.trainable!r} with objective {obj.generation!r} freezes everything")
        o = cfg.optim
        # As transformers' Trainer: no weight decay on biases and norm weights (1-D parameters).
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.warmup = warmup_steps(cfg.train.max_steps, o.warmup_ratio, o.warmup_steps)
        shift = obj.flow_shift if obj.flow_shift is not None else self.model.config.flow_shift
        self.sigmas = train_sigmas(obj.num_train_timesteps, shift)
        self._build_data()
        self.step = 0
        self.base_stats = DataStats()  # skip counts before a resume (rank 0 reports them)

    # ------------------------------------------------------------------ data
    def _build_data(self) -> None:
        cfg, model = self.cfg, self.model
        n_streams = cfg.data.streams or self.dist.world
        t = cfg.train
        if n_streams % self.dist.world:
            raise ValueError(f"data.streams = {n_streams} must be a multiple of the {self.dist.world} processes")
        if t.batch_size % n_streams or t.batch_size % (self.dist.world * t.micro_batch_size):
            raise ValueError(
                f"train.batch_size {t.batch_size} must be a multiple of data.streams ({n_streams}) and of "
                f"processes x micro_batch_size ({self.dist.world} x {t.micro_batch_size})"
            )
        self.num_streams = n_streams
        vision = model.config.vision
        encoder = SampleEncoder(
            model.tokenizer, model.token_ids, model.image_processor, model.config.n_query, cfg.model.max_length,
            cfg.model.generation_prompt, vision.spatial_merge_size if vision is not None else 2,
            self.targets.preprocess if self.targets is not None else None,
        )
        both = self.use_gen and self.use_text
        target_shape = None
        dit = model.config.dit
        if dit is not None:
            side = dit.sample_size
            target_shape = (dit.in_channels, side, side) if cfg.objective.generation == "vae_flow" else (model.config.n_query, dit.in_channels)
        visual = model.network.visual
        self.collate = Collator(encoder, model.config.backbone == "qwen2_5_vl",
                                ("generation", "understanding") if both else (), target_shape,
                                image_filler=visual is not None and any(p.requires_grad for p in visual.parameters()))

        def encode(sample):
            return encoder.generation(sample) if sample.task == "generation" else encoder.understanding(sample)

        online = cfg.objective.targets == "online"
        self.streams = {
            s: SampleStream(cfg.data, s, n_streams, encode, self.use_gen, self.use_text, decode_target_image=online)
            for s in range(n_streams) if s % self.dist.world == self.dist.rank
        }

    def data_stats(self) -> DataStats:
        local = DataStats.sum([self.base_stats] + [s.stats for s in self.streams.values()])
        return DataStats.sum(self.dist.gather(local.to_dict()))

    # ------------------------------------------------------------------ one step
    def _prepare(self, batch: TrainBatch) -> TrainBatch:
        """Targets (online: through the target tower) and each generation sample's flow draws."""
        batch = batch_to(batch, self.device)
        g = batch.num_gen
        if not g:
            return batch
        keys, seed = batch.keys[:g], self.cfg.train.seed
        if self.targets is not None:
            batch.targets = self.targets(batch.target_pixels, keys, seed, self.step)
        if self.cfg.objective.generation in ("clip_flow", "vae_flow"):
            o = self.cfg.objective
            draws = [
                draw_flow(sample_generator(seed, self.step, k), tuple(batch.targets.shape[1:]), self.sigmas,
                          o.sigma_sampling, o.condition_dropout, o.logit_mean, o.logit_std)
                for k in keys
            ]
            batch.sigma = torch.tensor([d.sigma for d in draws], dtype=torch.float32, device=self.device)
            batch.keep = torch.tensor([d.keep for d in draws], device=self.device)
            batch.noise = torch.stack([d.noise for d in draws]).to(self.device)
        return batch

    def train_step(self) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.perf_counter()
        lr = learning_rate(self.step, lr=cfg.optim.lr, total_steps=cfg.train.max_steps, warmup=self.warmup,
                           schedule=cfg.optim.schedule, min_lr=cfg.optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        items = global_batch(self.streams, cfg.train.batch_size, self.num_streams)
        micro = cfg.train.micro_batch_size
        batches = [self._prepare(self.collate(items[i:i + micro])) for i in range(0, len(items), micro)]
        n_gen, n_tok = self.dist.all_sum(
            [sum(b.gen_count for b in batches), sum(b.text_count for b in batches)], self.device
        )
        w = self.dist.world  # DDP and FSDP2 average gradients over ranks: scale back to a global sum
        gen_scale = cfg.objective.generation_weight * w / n_gen if n_gen else 0.0
        text_scale = cfg.objective.text_weight * w / n_tok if n_tok else 0.0
        gen_sum = text_sum = 0.0
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            # DDP all-reduces on the last micro-batch only. FSDP2 reduce-scatters after each one:
            # skipping that (set_requires_gradient_sync) breaks on shard groups that never ran
            # forward, such as an unused vision tower in text-to-image training.
            ctx = contextlib.nullcontext()
            if isinstance(self.wrapped, DistributedDataParallel) and not sync:
                ctx = self.wrapped.no_sync()
            with ctx:
                loss, g, tx = self.wrapped(batch, gen_scale, text_scale)
                loss.backward()
            gen_sum += float(g)
            text_sum += float(tx)
        gen_sum, text_sum = self.dist.all_sum([gen_sum, text_sum], self.device)
        grad_norm = float("nan")
        if cfg.optim.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        gen_loss = gen_sum / n_gen if n_gen else 0.0
        text_loss = text_sum / n_tok if n_tok else 0.0
        loss = cfg.objective.generation_weight * gen_loss + cfg.objective.text_weight * text_loss
        elapsed = time.perf_counter() - t0
        return {"step": self.step, "loss": loss, "gen_loss": gen_loss, "text_loss": text_loss, "lr": lr,
                "grad_norm": grad_norm, "samples": cfg.train.batch_size, "gen_samples": n_gen,
                "text_tokens": n_tok, "seconds": elapsed, "samples_per_s": cfg.train.batch_size / elapsed}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        folder = Path(self.cfg.train.output_dir) / f"checkpoint-{self.step:08d}"
        streams = {}
        for part in self.dist.gather({s: st.state_dict() for s, st in self.streams.items()}):
            streams.update(part)
        state = {
            "step": self.step,
            "data": {"num_streams": self.num_streams, "streams": {str(k): v for k, v in streams.items()}},
            "data_stats": self.data_stats().to_dict(),
            "rng": torch.get_rng_state(),
            "config": json.dumps(self.cfg.to_dict()),
        }
        save_checkpoint(folder, self.model, self.wrapped, self.optimizer, state, self.dist.enabled)
        if self.dist.enabled:
            dist.barrier()
        return folder

    def resume(self, folder: Path) -> None:
        state = load_checkpoint(folder, self.wrapped, self.optimizer, self.model.config.text.tie_word_embeddings,
                                self.dist.enabled)
        data = state["data"]
        if data["num_streams"] != self.num_streams:
            raise ValueError(
                f"{folder} was saved with {data['num_streams']} data streams, this run has {self.num_streams}: "
                "set data.streams to match"
            )
        for s, stream in self.streams.items():
            stream.load_state_dict(data["streams"][str(s)])
        self.step = int(state["step"])
        self.base_stats = DataStats.from_dict(state["data_stats"]) if self.dist.rank == 0 else DataStats()
        torch.set_rng_state(state["rng"])

    def _resume_folder(self) -> Path | None:
        r = self.cfg.train.resume
        if r in ("", "none"):
            return None
        if r == "auto":
            return latest_checkpoint(self.cfg.train.output_dir)
        return Path(r)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.rank == 0
        out = Path(cfg.train.output_dir)
        folder = self._resume_folder()
        if folder is not None:
            self.resume(folder)
            if main:
                _log(f"resumed from {folder} at step {self.step}")
        result = TrainResult(output_dir=str(out))
        metrics = None
        if main:
            out.mkdir(parents=True, exist_ok=True)
            metrics = open(out / "metrics.jsonl", "a")
        try:
            while self.step < cfg.train.max_steps:
                record = self.train_step()
                result.history.append(record)
                last = self.step == cfg.train.max_steps
                if cfg.train.log_every and (self.step % cfg.train.log_every == 0 or last):
                    stats = self.data_stats()
                    if main:
                        skipped = ", ".join(f"{k} {v}" for k, v in sorted(stats.counts.items())) or "none"
                        _log(f"step {self.step}/{cfg.train.max_steps}  loss {record['loss']:.6f}  "
                             f"gen {record['gen_loss']:.6f}  text {record['text_loss']:.6f}  lr {record['lr']:.3e}  "
                             f"grad_norm {record['grad_norm']:.4f}  {record['samples_per_s']:.1f} samples/s  "
                             f"skipped: {skipped}")
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if last or (cfg.train.save_every and self.step % cfg.train.save_every == 0):
                    result.last_checkpoint = str(self.save())
            result.data_stats = self.data_stats()
            if main:
                counts = result.data_stats.counts
                _log(f"done: {self.step} steps, {result.data_stats.yielded} samples read, "
                     f"{result.data_stats.skipped} skipped {dict(sorted(counts.items()))}")
        finally:
            if metrics is not None:
                metrics.close()
        return result

    def close(self) -> None:
        """Drops the DDP / FSDP2 wrappers (their reducers hold the process group) before the group goes."""
        self.wrapped = self.module = self.optimizer = self.params = None
        gc.collect()
        self.dist.close()


def train(cfg: TrainConfig) -> TrainResult:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
