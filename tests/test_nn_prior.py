"""The unit prior (speechvq.nn.prior): causality, KV cache, sampling constraints and filters."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch

from speechvq.nn.prior import Prior, filter_logits


def _prior(n_codes=16, n_speakers=3, block_size=48, **kw) -> Prior:
    torch.manual_seed(0)
    cfg = dict(
        n_codes=n_codes,
        n_speakers=n_speakers,
        block_size=block_size,
        n_layer=2,
        n_head=2,
        n_embd=32,
        dropout=0.0,
        bias=False,
    )
    cfg.update(kw)
    return Prior(**cfg).eval()


def test_vocabulary_layout():
    prior = _prior(n_codes=16, n_speakers=3)
    assert prior.config.vocab_size == 16 + 3 + 1
    assert prior.speaker_token(0) == 16 and prior.speaker_token(2) == 18
    assert prior.speaker_token(None) == prior.bos_token == 19
    with pytest.raises(ValueError):
        prior.speaker_token(3)


def test_config_round_trip():
    prior = _prior()
    again = Prior(**asdict(prior.config))
    again.load_state_dict(prior.state_dict())
    idx = torch.randint(0, 16, (1, 10))
    assert torch.equal(prior(idx)[0], again.eval()(idx)[0])


def test_causal_mask_does_not_leak_the_future():
    prior = _prior()
    idx = torch.randint(0, prior.config.vocab_size, (2, 30))
    logits, _ = prior(idx)
    t = 12
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, prior.config.vocab_size, (2, 30 - t - 1))
    assert not torch.equal(changed, idx)
    logits2, _ = prior(changed)
    torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(logits2[:, t + 1 :], logits[:, t + 1 :])


def test_loss_is_cross_entropy_and_ignores_padding():
    prior = _prior()
    idx = torch.randint(0, 16, (2, 10))
    targets = torch.randint(0, 16, (2, 10))
    targets[1, 5:] = -1
    logits, loss = prior(idx, targets)
    keep = targets >= 0
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    # untrained: close to uniform over the vocabulary
    assert abs(loss.item() - math.log(prior.config.vocab_size)) < 0.5


def test_kv_cache_matches_full_forward_step_by_step():
    prior = _prior()
    idx = torch.randint(0, prior.config.vocab_size, (3, 40))
    full, _ = prior(idx)
    cache = prior.new_cache(3)
    pieces = [prior(idx[:, :7], cache=cache)[0]]  # a prefill of several tokens, then one at a time
    for t in range(7, 40):
        pieces.append(prior(idx[:, t : t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    # a multi-token chunk after a non-empty cache needs the offset causal mask
    cache = prior.new_cache(3)
    chunked = [prior(idx[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 21), (21, 40))]
    torch.testing.assert_close(torch.cat(chunked, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [20, 100])  # 100 > block_size: the sliding window restarts
def test_cached_and_uncached_generation_agree(n):
    prior = _prior(block_size=48)
    prompt = torch.tensor([[prior.speaker_token(1), 3, 4], [prior.bos_token, 5, 5]])
    a = prior.generate(prompt, n, generator=torch.Generator().manual_seed(7))
    b = prior.generate(prompt, n, generator=torch.Generator().manual_seed(7), use_cache=False)
    assert a.shape == (2, 3 + n)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :3], prompt)
    c = prior.generate(prompt, n, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, c)


def test_sampled_units_stay_inside_the_codebook():
    # 4 units against 21 speaker/special tokens: unmasked, most draws would be speaker tokens
    prior = _prior(n_codes=4, n_speakers=20)
    with torch.no_grad():  # make the non-unit tokens by far the most likely
        prior.lm_head.weight[4:] *= 50.0
    prompt = torch.full((4, 1), prior.bos_token)
    unmasked, _ = prior(torch.randint(0, 4, (4, 30)))
    assert (unmasked.argmax(-1) >= 4).float().mean() > 0.9
    for temperature in (1.0, 100.0):
        out = prior.generate(
            prompt, 120, temperature=temperature, generator=torch.Generator().manual_seed(0)
        )
        units = out[:, 1:]
        assert units.min() >= 0 and units.max() < 4
    assert set(units.unique().tolist()) == {0, 1, 2, 3}  # high temperature reaches every unit
    greedy = prior.generate(prompt, 10, temperature=0.0)
    assert greedy[:, 1:].max() < 4


def test_top_k_and_top_p_on_a_hand_case():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    inf = float("-inf")
    top2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(top2[0, :2]).all() and (top2[0, 2:] == inf).all()
    # nucleus 0.7: 0.5 < 0.7 so the second token is needed (0.8 >= 0.7), the rest dropped
    p07 = filter_logits(logits, top_p=0.7)
    assert torch.isfinite(p07[0, :2]).all() and (p07[0, 2:] == inf).all()
    # nucleus 0.5 is reached by the first token alone; 0.81 needs three
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [
        [True, False, False, False]
    ]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).sum() == 3
    # order in the vocabulary does not matter
    shuffled = logits[:, [2, 0, 3, 1]]
    kept = torch.isfinite(filter_logits(shuffled, top_p=0.7)).tolist()
    assert kept == [[False, True, False, True]]
    # both filters, and disabled filters
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.5)).sum() == 1
    assert torch.equal(filter_logits(logits, top_k=None, top_p=None), logits)
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)
    # the kept probabilities renormalise to the original ratios
    renorm = filter_logits(logits, top_p=0.7).softmax(-1)
    torch.testing.assert_close(renorm[0, :2], torch.tensor([0.5, 0.3]) / 0.8)


def test_generation_with_top_k_one_is_greedy():
    prior = _prior()
    prompt = torch.tensor([[prior.speaker_token(0), 1, 2]])
    greedy = prior.generate(prompt, 15, temperature=0.0)
    top1 = prior.generate(
        prompt, 15, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(greedy, top1)


def test_training_steps_lower_the_loss():
    prior = _prior(n_codes=8, n_speakers=1, block_size=33)
    prior.train()
    # a deterministic cycle is easy to learn
    seq = torch.tensor([prior.speaker_token(0)] + [i % 8 for i in range(32)])
    idx, targets = seq[None, :-1].repeat(4, 1), seq[None, 1:].repeat(4, 1)
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        _, loss = prior(idx, targets)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5
