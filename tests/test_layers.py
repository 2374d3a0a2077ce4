"""Dense layers: padding never leaks into results, per-user projection equals per-candidate computation."""

import pytest
import torch

from fin import layers
from fin.layers import (
    MLP,
    MultiHeadTargetAttention,
    SimplifiedTargetAttention,
    time_gap_boundaries,
    time_gap_bucket,
)


def test_time_gap_buckets_are_log_scale_and_capped():
    minutes = torch.tensor([0, 1, 2, 3, 4, 60, 10**9]) * 60_000
    assert time_gap_bucket(minutes, time_gap_boundaries(24)).tolist() == [0, 1, 1, 2, 2, 5, 23]
    # every whole minute up to ~4 years, just before and at each minute, and negative gaps: floor(log2(m + 1))
    m = torch.arange(2_100_000, dtype=torch.int64)
    gaps = torch.cat([m * 60_000, m * 60_000 + 59_999, -m - 1])
    expected = torch.cat([m, m, torch.zeros_like(m)]).double().add(1).log2().floor().long().clamp(max=23)
    assert torch.equal(time_gap_bucket(gaps, time_gap_boundaries(24)), expected)


@pytest.mark.parametrize("intensity", [False, True], ids=["vectors", "with_intensity"])
@pytest.mark.parametrize("unfused_max_len", [0, 256], ids=["fused", "unfused"])
@pytest.mark.parametrize("make", [
    lambda d, intensity: SimplifiedTargetAttention(d, intensity),
    lambda d, intensity: MultiHeadTargetAttention(d, heads=2, intensity=intensity),
])
def test_attention_ignores_padding_and_shares_user_work(make, unfused_max_len, intensity, monkeypatch):
    monkeypatch.setattr(layers, "UNFUSED_MAX_LEN", unfused_max_len)
    torch.manual_seed(0)
    d, users, length = 8, 3, 5
    layer = make(d, intensity)
    seq = torch.randn(users, length, d)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    gaps = torch.randint(0, 10**8, (users, length))
    user_of = torch.tensor([0, 0, 1, 2, 0])  # five candidates of three users
    query = torch.randn(user_of.numel(), d)
    extra = (gaps,) if isinstance(layer, MultiHeadTargetAttention) else ()

    def run(s, g, m, u, q):
        return layer(q, s, *((g,) if extra else ()), m, u)

    out = run(seq, gaps, mask, user_of, query)
    assert out.shape == (user_of.numel(), layer.outputs)
    noisy = seq.clone().requires_grad_()
    with torch.no_grad():
        noisy[~mask] = 1e3  # garbage in padded slots (a model's padding repeats real events)
    noisy_out = run(noisy, gaps, mask, user_of, query)
    assert torch.allclose(out, noisy_out, atol=1e-5)
    noisy_out.sum().backward()  # ... and padded slots get no gradient, so the events they repeat get none from them
    assert noisy.grad[~mask].abs().max() == 0 and noisy.grad[mask].abs().max() > 0
    layer.zero_grad()
    # the same as giving every candidate its own copy of the sequence
    per_candidate = run(seq[user_of], gaps[user_of], mask[user_of], torch.arange(user_of.numel()), query)
    assert torch.allclose(out, per_candidate, atol=1e-5)
    assert torch.isfinite(out).all()  # a user with no events attends to nothing, without NaN
    if isinstance(layer, SimplifiedTargetAttention):
        assert out[3].abs().max() == 0  # the candidate of the user without events
    out.sum().backward()
    assert layer.key.weight.grad.abs().sum() > 0 and layer.value.weight.grad.abs().sum() > 0
    assert torch.isfinite(layer.key.weight.grad).all() and torch.isfinite(layer.value.weight.grad).all()

    # a batch in which no user has any event: each candidate gets what a user without events gets, and
    # every parameter still gets a (zero) gradient
    layer.zero_grad()
    empty = run(seq[:, :0], gaps[:, :0], mask[:, :0], user_of, query)
    assert empty.shape == out.shape and torch.allclose(empty[3], out[3])
    empty.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_short_sequences_attended_unfused_give_the_fused_kernel_s_outputs_and_gradients(monkeypatch):
    """Per-user masks and per-query windows (with a user and a query that see no event), with and without the
    log-masses: the unfused attention (the events both keys and values: `_EventAttention`, its backward written
    out) gives what the fused kernel and plain autograd give, forward and backward."""
    torch.manual_seed(0)
    d, users, length = 16, 4, 40
    sequence = torch.randn(users, length, d)
    mask = torch.rand(users, length) < 0.7
    mask[2] = False
    user_of = torch.tensor([0, 0, 1, 2, 3, 3, 3])
    query = torch.randn(user_of.numel(), d)
    start = torch.randint(0, length // 2, (user_of.numel(),))
    count = torch.randint(0, length // 2, (user_of.numel(),))
    count[1] = 0
    gaps = torch.randint(0, 10**8, (users, length))
    attentions = [(SimplifiedTargetAttention(d, intensity=i), MultiHeadTargetAttention(d, heads=2, intensity=i))
                  for i in (False, True)]
    parameters = [p for pair in attentions for m in pair for p in m.parameters()]

    def outputs_and_gradients(max_len: int, written_backward: bool = True) -> list[torch.Tensor]:
        monkeypatch.setattr(layers, "UNFUSED_MAX_LEN", max_len)
        monkeypatch.setattr(layers, "WRITTEN_BACKWARD", written_backward)
        for p in parameters:
            p.grad = None
        s, q = sequence.clone().requires_grad_(), query.clone().requires_grad_()
        out = torch.cat([torch.cat([simplified(q, s, mask, user_of), simplified.over_windows(q, s, start, count, user_of),
                                    multi_head(q, s, gaps, mask, user_of)], 1) for simplified, multi_head in attentions], 1)
        (out.square().sum() + out.sin().sum()).backward()
        return [out.detach(), s.grad, q.grad, *(p.grad for p in parameters)]

    fused = outputs_and_gradients(0)
    for unfused in (outputs_and_gradients(length), outputs_and_gradients(length, written_backward=False)):
        for a, b in zip(fused, unfused, strict=True):
            assert torch.allclose(a, b, atol=1e-5) and torch.isfinite(b).all()


@pytest.mark.parametrize("unfused_max_len", [0, 256], ids=["fused", "unfused"])
def test_intensity_tells_one_event_from_many_that_the_softmax_pools_alike(unfused_max_len, monkeypatch):
    """A user with one event and a user with ten copies of it pool to the same vector; the log-mass after it
    is log(1 + n exp(score)): it grows with the count, and is 0 for a user without events."""
    monkeypatch.setattr(layers, "UNFUSED_MAX_LEN", unfused_max_len)
    torch.manual_seed(0)
    d = 8
    event, query = torch.randn(d), torch.randn(1, d)
    seq = event.repeat(3, 10, 1)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 0], mask[1] = True, True  # user 0: the event once; user 1: ten times; user 2: none
    gaps = torch.zeros(3, 10, dtype=torch.long)
    user_of = torch.arange(3)
    for make, args in [(lambda i: SimplifiedTargetAttention(d, intensity=i), ()),
                       (lambda i: MultiHeadTargetAttention(d, heads=2, intensity=i), (gaps,))]:
        layer, plain = make(True), make(False)
        plain.load_state_dict(layer.state_dict())
        out = layer(query.expand(3, d), seq, *args, mask, user_of)
        vectors, mass = out[:, :d], out[:, d:]
        torch.testing.assert_close(vectors, plain(query.expand(3, d), seq, *args, mask, user_of))
        torch.testing.assert_close(vectors[0], vectors[1])  # the softmax alone cannot tell them apart
        # the score of the event, per head, from the log-mass of one copy: log(1 + exp(s)) = m
        score = torch.log(torch.expm1(mass[0]))
        torch.testing.assert_close(mass[1], torch.log1p(10 * score.exp()))
        assert bool((mass[1] > mass[0]).all()) and mass[2].abs().max() == 0


def test_mlp_and_bfloat16():
    mlp = MLP(8, (16, 4), out_dim=1).to(torch.bfloat16)
    assert mlp(torch.randn(3, 8, dtype=torch.bfloat16)).shape == (3, 1)
    att = SimplifiedTargetAttention(8).to(torch.bfloat16)
    out = att(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(1, 4, 8, dtype=torch.bfloat16),
              torch.ones(1, 4, dtype=torch.bool), torch.tensor([0, 0]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("unfused_max_len", [0, 256], ids=["fused", "unfused"])
def test_multi_head_forms_agree(unfused_max_len, monkeypatch):
    """Many candidates of a user share keys and values projected per event; one alone folds the projections
    into its queries (`MultiHeadTargetAttention`): the same results and gradients."""
    monkeypatch.setattr(layers, "UNFUSED_MAX_LEN", unfused_max_len)
    torch.manual_seed(0)
    d, users, length, per_user = 16, 3, 6, 16  # 16 candidates a user: the projected form
    layer = MultiHeadTargetAttention(d, heads=2, intensity=True)
    seq = torch.randn(users, length, d, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6, [0] * 6], dtype=torch.bool)
    gaps = torch.randint(0, 10**8, (users, length))
    user_of = torch.arange(users).repeat_interleave(per_user)
    query = torch.randn(user_of.numel(), d)
    shared = layer(query, seq, gaps, mask, user_of)
    (shared_grad,) = torch.autograd.grad(shared.square().sum(), seq)
    alone = torch.cat([layer(query[i:i + 1], seq[u][None], gaps[u][None], mask[u][None], torch.zeros(1, dtype=torch.long))
                       for i, u in enumerate(user_of.tolist())])
    (alone_grad,) = torch.autograd.grad(alone.square().sum(), seq)
    assert torch.allclose(shared, alone, atol=1e-5) and torch.allclose(shared_grad, alone_grad, atol=1e-4)
    assert shared_grad[2].abs().max() == 0 and shared_grad[0, 4:].abs().max() == 0  # no events, padding: none
