"""Per-request token sampling: every face (reference included) draws the same tokens for the same inputs;
greedy, top-k = 1, kept sets against engine.text_generation.filter_logits, the empirical distribution
against softmax (chi-square), batch independence, logprobs, a full 151936-token vocabulary, bad input."""

import math

import pytest
import torch
from op_testing import face_device, face_params

from blip3o_fast.engine.text_generation import filter_logits
from blip3o_fast.ops import sample_tokens, sample_tokens_reference
from blip3o_fast.ops.sample_tokens import gumbel_noise, plog

FACES = face_params("sample_tokens")
ALL_FACES = [pytest.param("torch", id="torch"), *FACES]
FAST_FACES = [f for f in ALL_FACES if f.id in ("torch", "cpu")]  # many draws: not the interpreter


def params(b, temperature, top_k, top_p, seed, counter, device="cpu"):
    def full(v, dtype):
        return torch.as_tensor(v, dtype=dtype).expand(b).contiguous().to(device)

    return (full(temperature, torch.float32), full(top_k, torch.int32), full(top_p, torch.float32),
            full(seed, torch.int64), full(counter, torch.int64))


def mixed_batch(b, vocab, dtype, device, seed):
    """Rows with every parameter combination: greedy, temperature only, top-k, top-p, both, k >= V, k = 1."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, vocab, generator=gen)).to(dtype).to(device)
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3, 1.0, 0.5] * b)[:b]
    top_k = torch.tensor([0, 0, 5, 0, 40, vocab + 3, 1, 17] * b, dtype=torch.int32)[:b]
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 0.8, 1.0, 0.3] * b)[:b]
    seeds = torch.randint(-2**62, 2**62, (b,), generator=gen)
    counters = torch.randint(0, 2**40, (b,), generator=gen)
    return logits, *(t.to(device) for t in (temperature, top_k, top_p, seeds, counters))


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_faces_draw_the_same_tokens(face, dtype):
    inputs = mixed_batch(14, 257, dtype, face_device(face), seed=1)
    tokens, logprobs = sample_tokens(*inputs, backend=face)
    ref_tokens, ref_logprobs = sample_tokens_reference(*(t.cpu() for t in inputs))
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens.cpu(), ref_tokens)
    torch.testing.assert_close(logprobs.cpu(), ref_logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("face", ALL_FACES)
def test_greedy_is_argmax(face):
    dev = face_device(face) if face != "torch" else torch.device("cpu")
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    logits[1, [3, 9, 40]] = 9.0  # ties: the lowest index wins
    logits[2, :] = 0.0
    tokens, logprobs = sample_tokens(logits.to(dev), *params(5, 0.0, 7, 0.5, 3, 4, dev), backend=face)
    assert torch.equal(tokens.cpu(), logits.argmax(-1))
    assert tokens[1] == 3 and tokens[2] == 0
    torch.testing.assert_close(logprobs.cpu(), logits.log_softmax(-1).gather(1, tokens.cpu()[:, None])[:, 0])


@pytest.mark.parametrize("face", ALL_FACES)
def test_top_k_one_is_greedy(face):
    dev = face_device(face) if face != "torch" else torch.device("cpu")
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(3))  # tie-free
    seeds = torch.arange(6, dtype=torch.int64)
    t, k, p, _, c = params(6, 1.0, 1, 1.0, 0, 9, dev)
    tokens, _ = sample_tokens(logits.to(dev), t, k, p, seeds.to(dev), c, backend=face)
    assert torch.equal(tokens.cpu(), logits.argmax(-1))


@pytest.mark.parametrize("face", FAST_FACES)
@pytest.mark.parametrize("top_k,top_p", [(10, 1.0), (0, 0.6), (25, 0.9), (3, 0.2)])
def test_stays_in_filter_logits_kept_set(face, top_k, top_p):
    """Many draws of one tie-free row never leave the set engine.text_generation.filter_logits keeps."""
    gen = torch.Generator().manual_seed(top_k + 7)
    row = 2 * torch.randn(1, 300, generator=gen)
    n = 400
    logits = row.expand(n, -1).contiguous()
    t, k, p, s, _ = params(n, 0.8, top_k, top_p, 5, 0)
    tokens, _ = sample_tokens(logits, t, k, p, s, torch.arange(n), backend=face)
    kept = filter_logits(row / 0.8, top_k, top_p).isfinite()[0]
    assert kept[tokens].all()
    assert tokens.unique().numel() > 1 or kept.sum() == 1


@pytest.mark.parametrize("face", FAST_FACES)
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.7)])
def test_distribution_matches_softmax(face, top_k, top_p):
    """6000 draws (fixed seed, counters 0..5999) over 8 tokens at temperature 1: chi-square against the
    softmax of the kept set; 7 degrees of freedom or fewer, bound 35 (p < 1e-5 under the null)."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    n = 6000
    t, k, p, s, _ = params(n, 1.0, top_k, top_p, 12345, 0)
    tokens, _ = sample_tokens(logits.expand(n, -1).contiguous(), t, k, p, s, torch.arange(n), backend=face)
    kept = filter_logits(logits, top_k, top_p)[0]
    expected = kept.softmax(-1) * n
    observed = torch.bincount(tokens, minlength=8).float()
    assert observed[expected == 0].sum() == 0
    on = expected > 0
    chi2 = ((observed[on] - expected[on]) ** 2 / expected[on]).sum().item()
    assert chi2 < 35.0, f"chi-square {chi2:.1f} over {int(on.sum())} tokens"


@pytest.mark.parametrize("face", ALL_FACES)
def test_row_independent_of_batch(face):
    """A row's token depends on its (seed, counter) and parameters only, not on its neighbours or position."""
    dev = face_device(face) if face != "torch" else torch.device("cpu")
    logits, temp, top_k, top_p, seeds, counters = mixed_batch(6, 97, torch.float32, dev, seed=4)
    tokens, _ = sample_tokens(logits, temp, top_k, top_p, seeds, counters, backend=face)
    order = torch.tensor([4, 1, 5, 0, 2, 3], device=dev)
    picked = torch.cat([order[:3], order[:2]])  # a different batch with repeats
    again, _ = sample_tokens(logits[picked], temp[picked], top_k[picked], top_p[picked], seeds[picked],
                             counters[picked], backend=face)
    assert torch.equal(again, tokens[picked])
    one, _ = sample_tokens(logits[3:4], temp[3:4], top_k[3:4], top_p[3:4], seeds[3:4], counters[3:4], backend=face)
    assert one[0] == tokens[3]


def test_counter_gives_fresh_draws():
    """The same seed at successive counters (token positions) draws different noise; another seed differs too."""
    noise = gumbel_noise(torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0]), 1000)
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    corr = torch.corrcoef(noise[:2])[0, 1].abs().item()
    assert corr < 0.1
    assert abs(noise.mean().item() - 0.5772) < 0.05  # the Gumbel mean (Euler's constant)


def test_plog_is_a_log():
    x = torch.cat([torch.rand(5000) * 20 + 1e-7, torch.tensor([2.0**-24, 1 - 2.0**-24, 1.0, 0.5, 16.6])])
    ref = x.double().log()
    assert ((plog(x).double() - ref).abs() / ref.abs().clamp_min(1e-30)).max().item() < 1e-6


@pytest.mark.parametrize("face", FAST_FACES)
def test_full_vocabulary(face):
    """Qwen2's 151936-token vocabulary, realistic logit scale, one row per rule."""
    gen = torch.Generator().manual_seed(6)
    b, vocab = 4, 151936
    logits = (4 * torch.randn(b, vocab, generator=gen)).to(torch.bfloat16)
    t = torch.tensor([1.0, 0.8, 1.0, 0.0])
    k = torch.tensor([0, 50, 0, 0], dtype=torch.int32)
    p = torch.tensor([1.0, 0.9, 0.95, 1.0])
    seeds, counters = torch.tensor([1, 2, 3, 4]), torch.tensor([10, 20, 30, 40])
    tokens, logprobs = sample_tokens(logits, t, k, p, seeds, counters, backend=face)
    ref_tokens, ref_logprobs = sample_tokens_reference(logits, t, k, p, seeds, counters)
    assert torch.equal(tokens, ref_tokens)
    # fp32 log-sum-exp over 151936 terms: each face sums in its own order
    want = logits.float().log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, want, rtol=1e-4, atol=1e-4)


def test_bad_input():
    logits = torch.randn(2, 10)
    good = params(2, 1.0, 0, 1.0, 0, 0)
    with pytest.raises(TypeError, match="logits"):
        sample_tokens(logits.long(), *good)
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(logits[0], *good)
    with pytest.raises(TypeError, match="top_k"):
        sample_tokens(logits, good[0], good[1].long(), *good[2:])
    with pytest.raises(TypeError, match="temperature"):
        sample_tokens(logits, good[0].double(), *good[1:])
    with pytest.raises(ValueError, match="seeds"):
        sample_tokens(logits, *good[:3], good[3][:1], good[4])
    with pytest.raises(ValueError, match="counters"):
        sample_tokens(logits, *good[:4], good[4].to("meta"))
    with pytest.raises(TypeError, match="counters"):
        sample_tokens(logits, *good[:4], [0, 0])


def test_not_differentiable():
    logits = torch.randn(2, 10, requires_grad=True)
    tokens, logprobs = sample_tokens(logits, *params(2, 1.0, 0, 1.0, 0, 0), backend="cpu")
    assert not tokens.requires_grad
    with pytest.raises(RuntimeError):
        logprobs.sum().backward()


@pytest.mark.parametrize("face", FACES)
def test_opcheck(face):
    dev = face_device(face)
    logits, *rest = mixed_batch(3, 32, torch.float32, dev, seed=8)
    torch.library.opcheck(torch.ops.blip3o_fast.sample_tokens.default, (logits, *rest, face))


def test_chi_square_bound_is_meaningful():
    """The bound above rejects a visibly wrong sampler: draws from temperature 1.5 fail it."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    n = 6000
    t, k, p, s, _ = params(n, 1.5, 0, 1.0, 12345, 0)
    tokens, _ = sample_tokens(logits.expand(n, -1).contiguous(), t, k, p, s, torch.arange(n), backend="torch")
    expected = logits[0].softmax(-1) * n
    observed = torch.bincount(tokens, minlength=8).float()
    assert ((observed - expected) ** 2 / expected).sum().item() > 35.0
    assert math.isfinite(observed.sum().item())
