"""Refinement data: chunk batches, corruption masks, corrupted chunks, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from rkl.data import chunk_batch, chunk_modes, corruption_mask, scheduled_value
from rkl.data.chunks import GREEDY, SAMPLE, TRUE
from rkl.errors import UserError

EOS = 2


def _stream_with_eos(n: int = 5000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(3, 50, (n,), generator=g)
    stream[torch.rand(n, generator=g) < 0.05] = EOS
    return stream


def _valid_masks(seed: int = 0) -> torch.Tensor:
    """Rows of every kind: all valid, none valid, prefix-valid of each length, scattered."""
    g = torch.Generator().manual_seed(seed)
    W = 12
    rows = [torch.ones(W, dtype=torch.bool), torch.zeros(W, dtype=torch.bool)]
    rows += [torch.arange(W) < k for k in range(1, W)]
    rows += [torch.rand(W, generator=g) < 0.5 for _ in range(20)]
    return torch.stack(rows)


# --- chunk_batch ----------------------------------------------------------------------------------------
def test_chunk_batch_shapes_and_contiguity():
    stream = torch.arange(3, 10_003)
    b = chunk_batch(stream, step=3, batch_size=6, chunk_width=8, min_prefix=4, max_prefix=20, seed=0, eos_id=EOS)
    P = b.prefix_ids.shape[1]
    assert 4 <= P <= 20 and b.prefix_ids.shape == (6, P)
    assert b.chunk_ids.shape == (6, 8) and b.chunk_valid.shape == (6, 8) and b.chunk_valid.dtype == torch.bool
    joined = torch.cat([b.prefix_ids, b.chunk_ids], dim=1)
    assert torch.equal(joined - joined[:, :1], torch.arange(P + 8).expand(6, P + 8))  # prefix right before chunk
    assert b.chunk_valid.all()  # no EOS in this stream


def test_chunk_valid_stops_after_first_eos():
    stream = _stream_with_eos()
    for step in range(20):
        b = chunk_batch(stream, step, batch_size=16, chunk_width=16, min_prefix=1, max_prefix=8, seed=1, eos_id=EOS)
        for ids, valid in zip(b.chunk_ids.tolist(), b.chunk_valid.tolist()):
            first = ids.index(EOS) if EOS in ids else len(ids) - 1
            assert valid == [j <= first for j in range(len(ids))]


def test_chunk_batch_is_pure_and_prefix_length_varies():
    stream = _stream_with_eos()
    kw = dict(batch_size=4, chunk_width=8, min_prefix=2, max_prefix=30, seed=7, eos_id=EOS)
    a, b = chunk_batch(stream, 11, **kw), chunk_batch(stream, 11, **kw)
    assert torch.equal(a.prefix_ids, b.prefix_ids) and torch.equal(a.chunk_ids, b.chunk_ids)
    assert torch.equal(a.chunk_valid, b.chunk_valid)
    assert not torch.equal(a.chunk_ids, chunk_batch(stream, 12, **kw).chunk_ids)
    lengths = {chunk_batch(stream, s, **kw).prefix_ids.shape[1] for s in range(40)}
    assert len(lengths) > 5 and min(lengths) >= 2 and max(lengths) <= 30
    with pytest.raises(UserError):
        chunk_batch(torch.arange(10), 0, 2, 8, 1, 8, 0, EOS)


# --- corruption_mask ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "span"])
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3, 0.5, 1.0])
def test_corruption_mask_properties(kind, rate):
    valid = _valid_masks()
    for seed in range(5):
        mask = corruption_mask(valid, rate, kind, torch.Generator().manual_seed(seed))
        assert mask.shape == valid.shape and mask.dtype == torch.bool
        assert not (mask & ~valid).any(), "marked an invalid position"
        n_valid, n_mask = valid.sum(1), mask.sum(1)
        if rate == 0.0:
            assert not mask.any()
            continue
        assert ((n_mask >= 1) == (n_valid >= 1)).all(), "a row with valid positions got no corruption"
        if kind == "random" and rate == 1.0:
            assert torch.equal(mask, valid)
        if kind == "span":
            for v, m, nv in zip(valid, mask, n_valid.tolist()):
                if nv == 0:
                    continue
                assert m.sum().item() == max(1, round(rate * nv))
                ranks = (v.long().cumsum(0) - 1)[m]  # positions among the valid ones
                assert torch.equal(ranks, torch.arange(ranks[0].item(), ranks[0].item() + len(ranks)))


def test_span_mask_is_contiguous_on_prefix_valid_rows_and_placed_uniformly():
    valid = (torch.arange(16) < 10).expand(4000, 16)
    mask = corruption_mask(valid, 0.3, "span", torch.Generator().manual_seed(0))
    idx = mask.nonzero()[:, 1].view(4000, 3)
    assert torch.equal(idx - idx[:, :1], torch.arange(3).expand(4000, 3))
    counts = torch.bincount(idx[:, 0], minlength=16)
    assert (counts[:8] > 350).all() and (counts[8:] == 0).all()  # starts 0..7, each ~500


def test_random_mask_rate_is_respected():
    valid = torch.ones(2000, 16, dtype=torch.bool)
    mask = corruption_mask(valid, 0.3, "random", torch.Generator().manual_seed(0))
    assert abs(mask.float().mean().item() - 0.3) < 0.01


# --- corrupt --------------------------------------------------------------------------------------------
def test_chunk_modes_kinds_and_structure():
    g = torch.Generator().manual_seed(0)
    modes, kind = chunk_modes(400, 8, 0.5, 0.5, 0.3, "random", g)
    share = torch.bincount(kind, minlength=3).float() / 400
    assert abs(share[0] - 0.5) < 0.08 and abs(share[1] - 0.25) < 0.08 and abs(share[2] - 0.25) < 0.08
    drafts, splices, sampled = modes[kind == 0], modes[kind == 1], modes[kind == 2]
    assert (drafts == GREEDY).all()
    for row in splices:  # a true prefix of length 1..W-1, then greedy to the end
        cut = int((row == TRUE).long().cumprod(0).sum())
        assert 1 <= cut < 8 and (row[cut:] == GREEDY).all()
    assert set(sampled.unique().tolist()) <= {TRUE, SAMPLE} and ((sampled == SAMPLE).sum(1) >= 1).all()
    again = chunk_modes(400, 8, 0.5, 0.5, 0.3, "random", torch.Generator().manual_seed(0))
    assert torch.equal(again[0], modes) and torch.equal(again[1], kind)


@pytest.mark.parametrize("schedule", ["none", "linear", "cosine"])
def test_scheduled_value_endpoints(schedule):
    start, final, total = 0.3, 0.15, 100
    assert scheduled_value(start, final, schedule, 0, total) == start
    end = start if schedule == "none" else final
    assert scheduled_value(start, final, schedule, total - 1, total) == end
    assert scheduled_value(start, final, schedule, 10 * total, total) == end  # clipped past the end
    mid = scheduled_value(start, final, schedule, 50, 101)
    assert mid == pytest.approx(start if schedule == "none" else (start + final) / 2)


def test_scheduled_value_shapes():
    lin = [scheduled_value(0.0, 1.0, "linear", s, 11) for s in range(11)]
    assert lin == pytest.approx([s / 10 for s in range(11)])
    cos = [scheduled_value(0.0, 1.0, "cosine", s, 11) for s in range(11)]
    assert cos == pytest.approx([(1 - math.cos(math.pi * s / 10)) / 2 for s in range(11)])
    assert scheduled_value(0.2, 0.9, "linear", 0, 1) == 0.2  # one-step run: no division by zero
    with pytest.raises(ValueError):
        scheduled_value(0.0, 1.0, "exponential", 0, 10)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: uniforms drawn there, row indices copied from pinned memory"))])
def test_sampling_noise_of_a_row_does_not_depend_on_how_the_batch_is_split(device):
    """rkl.model.drafts.Noise: a row's uniforms are the same whether its chunk holds the whole global batch, a slice
    of it (one process of several) or picked rows, at every position; rows that do not sample get none, and a
    position where no row of the global batch samples draws nothing. The modes are built so that both halves sample
    at one position (a draw of only the chunk's own rows would differ) and only one half at others (a half that
    skipped the batch's draw there would read the wrong uniforms at the next)."""
    from rkl.model.drafts import Noise

    modes = torch.full((8, 6), TRUE)
    for j, rows in enumerate([[1, 5], [6], [], [0, 3, 6], [2], [1, 4, 7]]):
        modes[rows, j] = SAMPLE

    def noise(rows=slice(None)):
        return Noise(torch.Generator().manual_seed(11), modes, rows)

    def rows_and_uniforms(src, j):  # [rows of the chunk, vocab], -1 where a row gets no uniforms
        drawn = src.draw(j, 5, device)
        u = torch.full((src.count(), 5), -1.0)
        if drawn is not None:
            assert drawn[0].device.type == drawn[1].device.type == device
            u[drawn[0].cpu()] = drawn[1].cpu()
        return u

    whole, halves, picked = noise(), [noise(slice(0, 4)), noise(slice(4, 8))], noise(torch.tensor([6, 1, 3]))
    for j in range(6):
        if j == 2:
            assert whole.draw(j, 5, device) is None and halves[0].draw(j, 5, device) is None
            continue
        u = rows_and_uniforms(whole, j)
        assert torch.equal(u[:, 0] >= 0, modes[:, j] == SAMPLE)
        assert torch.equal(torch.cat([rows_and_uniforms(h, j) for h in halves]), u)
        assert torch.equal(rows_and_uniforms(picked, j), u[[6, 1, 3]])
