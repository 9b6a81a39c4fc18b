"""The AR decoding engine: continuous batching over a paged KV cache, for LLaMA 3 and Qwen2.5-VL.

    engine = Engine.from_model(model, kv_cache_bytes=1 << 30)        # or Engine(lm, tokenizer=..., ...)
    engine.add_request("a", prompt, images=[img], max_new_tokens=64, temperature=0.7, seed=1, stop=["\\n\\n"])
    while engine.has_unfinished():
        for out in engine.step():                                     # StepOutput per request that moved
            print(out.request_id, out.text, out.finished, out.finish_reason)

Each step: (1) every running request reserves the cache slot of the token it feeds next; when the
pool is full the youngest running request is preempted (its blocks released, itself put back at
the head of the waiting queue; it is later re-prefilled from its prompt and the tokens generated so
far, and its sampler's generator keeps its state, so its results do not change); (2) if nothing was
preempted, waiting requests are admitted in arrival order while the batch, the prefill token budget
and the free blocks allow; (3) admitted requests run one packed ragged prefill (their vision
features included) and sample their first token; (4) the others run one batched decode step that
reads K/V through the block tables. A request that cannot fit in the whole pool even alone is
refused by add_request with an error naming the budget and the need.

Positions: 1-D for LLaMA; 3-D M-RoPE for Qwen2.5-VL prompts (any number of images), continued while
decoding as index + rope_delta on all three axes. Sampling is per request (greedy at temperature 0,
else temperature / top-k / top-p) and draws from (the request's seed, the token's index), so a
request's tokens do not depend on what else is in the batch, nor on preemption.

Text: tokens are detokenised incrementally (a window of recent tokens is re-decoded; text ending in
an incomplete UTF-8 character waits for the next token), and the tail of the text that could still
begin a stop string is held back, so the deltas of a request concatenate exactly to its final text,
which excludes the stop string. The eos token is not part of a request's tokens or text.

The forward passes (fused kernels, fixed-shape decode captured as CUDA graphs on CUDA) live in
engine/model_runner.py; this module schedules requests and turns tokens into outputs. Prefill is
eager by design (ragged shapes), as in other engines.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from PIL import Image

from blip3o_fast.engine.model_runner import DecodeRow, ModelRunner, SamplingParams
from blip3o_fast.engine.paged_kv_cache import PagedKVCache
from blip3o_fast.engine.text_generation import expand_image_tokens
from blip3o_fast.models.causal_lm import CausalLM
from blip3o_fast.tokenizer import TokenIds, render_chat

if TYPE_CHECKING:
    from blip3o_fast.models.blip3o import BLIP3o

FINISH_REASONS = ("eos", "stop", "length", "aborted")


@dataclass
class StepOutput:
    """What one request produced in one step: its new token ids, the text they add (possibly empty
    while a UTF-8 character or a possible stop string is incomplete), and whether it finished."""

    request_id: Any
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None  # one of FINISH_REASONS when finished
    logprobs: list[float] | None = None  # of token_ids under the model (raw logits), when asked for


@dataclass
class RequestOutput:
    """A whole request, as Engine.generate returns it."""

    request_id: Any
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] | None = None


class _TextStream:
    """Incremental detokenisation plus stop strings for one request."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.max_stop = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] is the window whose text is already in self.text
        self.read = 0
        self.text = ""
        self.emitted = 0  # characters of self.text handed out
        self.checked = 0  # characters of self.text searched for stop strings

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        # Decoding a short window keeps the cost per token constant; decoding it with its predecessor
        # keeps tokenizer-specific joins (leading spaces, byte fallback) as a full decode makes them.
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """Add tokens; return (text delta, whether a stop string appeared)."""
        self.ids.extend(ids)
        self._advance(final=False)
        return self._release(final=False)

    def finish(self) -> tuple[str, bool]:
        """Flush everything held back (an incomplete character comes out as the tokenizer renders it)."""
        self._advance(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        if self.stop:
            start = max(0, self.checked - self.max_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            self.checked = len(self.text)
            if hits:
                self.text = self.text[:min(hits)]
                delta, self.emitted = self.text[self.emitted:], len(self.text)
                return delta, True
        end = len(self.text) if final else len(self.text) - self._held()
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta, False

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        for n in range(min(len(self.text), self.max_stop - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


@dataclass(eq=False)
class _Sequence:
    request_id: Any
    uid: int  # arrival order: the youngest running request has the largest
    prompt_ids: list[int]
    prompt_positions: torch.Tensor  # (3, T) for Qwen2.5-VL, (T,) for LLaMA
    rope_delta: int
    pixel_values: torch.Tensor | None
    grid_thw: torch.Tensor | None
    max_new_tokens: int
    sampling: SamplingParams
    eos: frozenset[int]
    want_logprobs: bool
    text: _TextStream | None
    generated: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache; generated[-1] is fed next while decoding
    table_version: int = 0  # bumped when its blocks are released, so stale block-table rows are rewritten

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


class Engine:
    """Continuous-batching generation over a paged KV cache.

    lm: the backbone (a CausalLM or BLIP3oNetwork, on its device and dtype; the cache takes both).
    kv_cache_bytes: the KV pool's size in bytes; num_blocks = kv_cache_bytes // bytes per block.
    tokenizer: for string / chat prompts, text deltas and stop strings (None: token ids only).
    image_processor: for prompts with images (Qwen2.5-VL). token_ids: special ids (default: looked
    up in the tokenizer); eos ids are a request's default stop tokens.
    max_batch_size: most running requests; max_prefill_tokens: most prompt tokens packed into one
    step's prefill (a longer single prompt still runs alone); max_model_len: longest sequence
    (prompt + new tokens) accepted (default: whatever the pool holds); it also sets the width of
    the block tables. cuda_graphs, decode_buckets: see ModelRunner (default: decode captured as CUDA
    graphs on CUDA devices, eager at the live batch size on the CPU).
    """

    def __init__(
        self,
        lm: CausalLM,
        *,
        kv_cache_bytes: int,
        tokenizer=None,
        image_processor=None,
        token_ids: TokenIds | None = None,
        block_size: int = 16,
        max_batch_size: int = 32,
        max_prefill_tokens: int = 8192,
        max_model_len: int | None = None,
        cuda_graphs: bool | None = None,
        decode_buckets: tuple[int, ...] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.lm = lm.eval()
        cfg = lm.text_cfg
        weight = lm.lm_head.weight
        self.device = weight.device
        self.cache = PagedKVCache.from_budget(
            kv_cache_bytes, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dim_per_head, block_size,
            dtype=weight.dtype, device=weight.device,
        )
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        if token_ids is None and tokenizer is not None:
            token_ids = TokenIds.lookup(tokenizer)
        self.token_ids = token_ids
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.kv_cache_bytes = int(kv_cache_bytes)
        self.max_model_len = max_model_len
        self.three_d = cfg.arch == "qwen2_5_vl"
        table_width = self.cache.num_blocks
        if max_model_len is not None:
            table_width = min(table_width, self.cache.blocks_for(max_model_len))
        self.runner = ModelRunner(lm, self.cache, max_batch=max_batch_size, table_width=table_width,
                                  cuda_graphs=cuda_graphs, buckets=decode_buckets)
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self._requests: dict[Any, _Sequence] = {}
        self._pending: list[StepOutput] = []  # finished without running (aborted, max_new_tokens=0)
        self._uids = itertools.count()
        self.num_preemptions = 0

    @classmethod
    def from_model(cls, model: "BLIP3o", *, kv_cache_bytes: int, **kwargs) -> "Engine":
        """An engine over a BLIP3o's backbone, tokenizer, image processor and special ids."""
        return cls(model.network, kv_cache_bytes=kv_cache_bytes, tokenizer=model.tokenizer,
                   image_processor=model.image_processor, token_ids=model.token_ids, **kwargs)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: Any,
        prompt: str | Sequence[int] | list[dict[str, Any]],
        images: Image.Image | Sequence[Image.Image] | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        eos_token_ids: Sequence[int] | None = None,
        logprobs: bool = False,
    ) -> None:
        """Queue a request. prompt: token ids; a string, tokenized as is (no special tokens added:
        render any chat template first); or chat messages, rendered with the tokenizer's template.
        A prompt with images holds one image-pad token per image (expanded here) or the expanded
        runs. eos_token_ids default to the engine's token_ids.eos; stop strings end the text."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already in the engine")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        ids = self._prompt_ids(prompt)
        imgs = [] if images is None else [images] if isinstance(images, Image.Image) else list(images)
        ids, pixel_values, grid = self._prepare_images(ids, imgs)
        if self.max_model_len is not None and len(ids) + max_new_tokens > self.max_model_len:
            raise ValueError(f"request {request_id!r}: {len(ids)} prompt tokens + {max_new_tokens} new tokens exceed "
                             f"max_model_len={self.max_model_len}")
        need = self.cache.blocks_for(len(ids) + max_new_tokens - 1)  # the last sampled token is never fed back
        if need > self.cache.num_blocks:
            per_block = self.cache.nbytes // self.cache.num_blocks
            raise ValueError(
                f"request {request_id!r} cannot fit in the KV cache even alone: its {len(ids)} prompt tokens + "
                f"{max_new_tokens} new tokens need {need} blocks of {self.cache.block_size} tokens "
                f"({need * per_block} bytes), but kv_cache_bytes={self.kv_cache_bytes} gives {self.cache.num_blocks} "
                f"blocks ({self.cache.nbytes} bytes); raise kv_cache_bytes to at least {need * per_block}"
            )
        if max_new_tokens == 0:
            self._pending.append(StepOutput(request_id, [], "", True, "length", [] if logprobs else None))
            return
        input_ids = torch.tensor([ids])
        ti = self.token_ids
        positions, delta = self.lm.positions(input_ids, None, grid, ti and ti.image_pad, ti and ti.vision_start)
        eos = (ti.eos if ti is not None else ()) if eos_token_ids is None else eos_token_ids
        if seed is None:  # drawn from torch's global generator, so torch.manual_seed makes runs repeatable
            seed = int(torch.randint(0, 2**62, ()))
        sampling = SamplingParams(float(temperature), top_k or 0, 1.0 if top_p is None else float(top_p), int(seed))
        seq = _Sequence(
            request_id=request_id, uid=next(self._uids), prompt_ids=ids,
            prompt_positions=positions[..., 0, :].to(self.device), rope_delta=int(delta[0]),
            pixel_values=pixel_values, grid_thw=grid, max_new_tokens=max_new_tokens, sampling=sampling, eos=frozenset(int(e) for e in eos),
            want_logprobs=logprobs, text=_TextStream(self.tokenizer, stop or ()) if self.tokenizer is not None else None,
        )
        self._requests[request_id] = seq
        self.waiting.append(seq)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            if self.tokenizer is None:
                raise ValueError("string and chat prompts need an engine with a tokenizer; pass token ids")
            if isinstance(prompt, str):
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            else:
                ids = render_chat(self.tokenizer, prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.lm.text_cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        return ids

    def _prepare_images(self, ids: list[int], imgs: list[Image.Image]):
        if not imgs:
            return ids, None, None
        if self.lm.visual is None:
            raise ValueError(f"this {self.lm.text_cfg.arch} backbone has no vision tower, so it cannot take images")
        if self.image_processor is None or self.token_ids is None or self.token_ids.image_pad is None:
            raise ValueError("prompts with images need an engine with an image_processor and token_ids.image_pad")
        pixel_values, grid = self.image_processor(imgs)
        pad, merge = self.token_ids.image_pad, self.lm.vision_cfg.spatial_merge_size
        if sum(1 for t in ids if t == pad) != int(grid.prod(-1).sum()) // merge**2:
            ids = expand_image_tokens(ids, grid, pad, merge)
        dtype = next(self.lm.visual.parameters()).dtype
        return ids, pixel_values.to(self.device, dtype), grid.to(self.device)

    def abort(self, request_id: Any) -> None:
        """Drop an unfinished request and free its blocks; the next step reports it as "aborted"."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            raise KeyError(f"no unfinished request {request_id!r}")
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.cache.release(seq)
        self._pending.append(StepOutput(request_id, [], "", True, "aborted", [] if seq.want_logprobs else None))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._pending)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        outputs, self._pending = self._pending, []
        preempted = self._reserve_decode_slots()
        decoding = list(self.running)
        admitted = [] if preempted else self._admit()
        if admitted:
            outputs += self._prefill(admitted)
        if decoding:
            outputs += self._decode(decoding)
        live = (s for s in decoding + admitted if self._requests.get(s.request_id) is s)
        self.running = sorted(live, key=lambda s: s.uid)
        return outputs

    def _reserve_decode_slots(self) -> bool:
        """Give every running request room for the token it feeds next, preempting the youngest
        running requests while the pool is full. The oldest always fits: add_request refused any
        request that the whole pool cannot hold."""
        preempted = False
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if self.cache.can_reserve(seq, seq.num_cached + 1):
                self.cache.reserve(seq, seq.num_cached + 1)
                i += 1
                continue
            victim = self.running.pop()  # may be seq itself, which ends the loop
            self.cache.release(victim)
            victim.num_cached = 0
            victim.table_version += 1
            self.waiting.appendleft(victim)
            self.num_preemptions += 1
            preempted = True
        return preempted

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            seq = self.waiting[0]
            n = seq.num_tokens
            if (admitted and tokens + n > self.max_prefill_tokens) or not self.cache.can_reserve(seq, n):
                break
            self.cache.reserve(seq, n)
            admitted.append(self.waiting.popleft())
            tokens += n
        return admitted

    def _prefill(self, seqs: list[_Sequence]) -> list[StepOutput]:
        """One packed forward over the admitted requests' whole sequences (prompt + tokens generated
        before a preemption); samples each one's next token from its last position."""
        ids: list[int] = []
        positions, slots = [], []
        for seq in seqs:
            n, t = seq.num_tokens, len(seq.prompt_ids)
            ids += seq.prompt_ids + seq.generated
            later = torch.arange(t, n, device=self.device) + seq.rope_delta
            positions.append(torch.cat([seq.prompt_positions, later.expand(3, -1) if self.three_d else later], dim=-1))
            slots.append(self.cache.slots(seq, 0, n))
        with_images = [s for s in seqs if s.pixel_values is not None]
        pixels = torch.cat([s.pixel_values for s in with_images]) if with_images else None
        grids = torch.cat([s.grid_thw for s in with_images]) if with_images else None
        ti = self.token_ids
        x = self.lm.embed(torch.tensor([ids], device=self.device), pixels, grids, ti and ti.image_pad)
        tokens, logprobs = self.runner.prefill(
            x[0], torch.cat(positions, dim=-1), torch.cat(slots), [s.num_tokens for s in seqs],
            [s.sampling for s in seqs],
        )
        for seq in seqs:
            seq.num_cached = seq.num_tokens
        return [self._emit(seq, tok, lp) for seq, tok, lp in zip(seqs, tokens, logprobs)]

    def _decode(self, seqs: list[_Sequence]) -> list[StepOutput]:
        """One token per running request, attention through the paged cache."""
        rows = []
        for seq in seqs:
            table = self.cache.tables[seq]
            rows.append(DecodeRow(
                token=seq.generated[-1], position=seq.num_cached + seq.rope_delta, cache_index=seq.num_cached,
                block_table=table, table_key=(seq.uid, seq.table_version, len(table)), sampling=seq.sampling,
            ))
        tokens, logprobs = self.runner.decode(rows)
        for seq in seqs:
            seq.num_cached += 1
        return [self._emit(seq, tok, lp) for seq, tok, lp in zip(seqs, tokens, logprobs)]

    def _emit(self, seq: _Sequence, token: int, logprob: float | None) -> StepOutput:
        reason = None
        new: list[int] = []
        if token in seq.eos:
            reason = "eos"
        else:
            new = [token]
            seq.generated.append(token)
        text, stopped = seq.text.push(new) if seq.text is not None and new else ("", False)
        if stopped:
            reason = "stop"
        elif reason is None and len(seq.generated) >= seq.max_new_tokens:
            reason = "length"
        if reason is not None:
            if reason != "stop" and seq.text is not None:
                rest, stopped = seq.text.finish()
                text += rest
                reason = "stop" if stopped else reason
            self.cache.release(seq)
            del self._requests[seq.request_id]
        lps = None
        if seq.want_logprobs:
            lps = [logprob] if new else []
        return StepOutput(seq.request_id, new, text, reason is not None, reason, lps)

    # ------------------------------------------------------------------ conveniences
    def generate(self, requests: Sequence[Mapping[str, Any]]) -> list[RequestOutput]:
        """Run requests (each a mapping of add_request's arguments; request_id defaults to its index)
        to completion; outputs in request order. The engine must be idle."""
        if self.has_unfinished():
            raise RuntimeError("Engine.generate needs an idle engine: drive step() yourself to mix in requests")
        order, results = [], {}
        try:
            for i, request in enumerate(requests):
                request = dict(request)
                rid = request.pop("request_id", i)
                self.add_request(rid, **request)
                order.append(rid)
                results[rid] = RequestOutput(rid, logprobs=[] if request.get("logprobs") else None)
        except Exception:
            self._discard(order)
            raise
        while self.has_unfinished():
            for out in self.step():
                res = results[out.request_id]
                res.token_ids += out.token_ids
                res.text += out.text
                if out.logprobs is not None:
                    res.logprobs += out.logprobs
                if out.finished:
                    res.finish_reason = out.finish_reason
        return [results[rid] for rid in order]

    def stream(self, request: Mapping[str, Any]) -> Iterator[str]:
        """Text deltas of one request (a mapping of add_request's arguments) as they are decoded;
        closing the iterator early aborts the request. The engine must be idle."""
        if self.has_unfinished():
            raise RuntimeError("Engine.stream needs an idle engine: drive step() yourself to mix in requests")
        request = dict(request)
        rid = request.pop("request_id", 0)
        self.add_request(rid, **request)
        try:
            while self.has_unfinished():
                for out in self.step():
                    if out.text:
                        yield out.text
        finally:
            self._discard([rid])

    def _discard(self, request_ids: Sequence[Any]) -> None:
        for rid in request_ids:
            if rid in self._requests:
                self.abort(rid)
        self._pending.clear()


def engine_for_prompts(
    model: "BLIP3o", prompt_ids: Sequence[Sequence[int]], images: Sequence[Sequence[Image.Image]] | None,
    max_new_tokens: int, *, block_size: int = 16,
) -> Engine:
    """An engine whose pool holds all these requests at once (so none is preempted), batch = their
    number: what a one-shot call like BLIP3o.generate_text needs."""
    pad = model.token_ids.image_pad
    blocks = 0
    for i, ids in enumerate(prompt_ids):
        imgs = list(images[i]) if images is not None and images[i] else []
        n = len(ids)
        if imgs and model.image_processor is not None:
            expanded = sum(model.image_processor.num_image_tokens(img) for img in imgs)
            pads = sum(1 for t in ids if t == pad)
            n += 0 if pads == expanded else expanded - pads
        blocks += -(-max(1, n + max_new_tokens - 1) // block_size)
    cfg = model.config.text
    dtype = model.network.lm_head.weight.dtype
    per_block = PagedKVCache.bytes_per_block(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dim_per_head,
                                             block_size, dtype)
    return Engine.from_model(model, kv_cache_bytes=blocks * per_block, block_size=block_size,
                             max_batch_size=len(prompt_ids))
