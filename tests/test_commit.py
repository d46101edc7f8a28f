"""The commit rule and chunked generation around it: per-row commits, stale-suffix reuse with its check, edited EOS."""

from __future__ import annotations

import pytest
import torch

from rkl import ChunkRefineWrapper, RecursiveConfig
from rkl.model.base import load_base
from rkl.model.commit import commit_lengths

X = 7  # the token a forced "refinement" writes


@pytest.fixture(scope="module")
def base():
    model, _ = load_base("tiny", dtype="float32")
    return model.eval()


def test_commit_lengths_rule():
    draft = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 9, 0, 0]])
    tokens = torch.tensor([[1, 2, 8, 4, 6], [1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 8, 0, 0]])
    committable = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]).bool()
    # first change at 2 -> 3 tokens; nothing changed -> all; a change after the row's end does not count; an
    # edited EOS (9 at position 2, padding after it) commits through the edit and never the padding
    assert commit_lengths(tokens != draft, committable).tolist() == [3, 5, 3, 3]


def test_a_token_changed_and_changed_back_still_ends_the_commit():
    """Step 2 changes position 1, step 3 puts the draft token back and changes position 2 (decided with the other
    token at 1): the commit must stop at 1, not run on to commit position 2's edit after the old token."""
    from rkl.model.wrapper import RefineResult

    draft = torch.tensor([[10, 11, 12, 13]])
    res = RefineResult(draft=draft, tokens=[draft.clone(), torch.tensor([[10, 21, 12, 13]]),
                                            torch.tensor([[10, 11, 22, 13]])], steps_used=3)
    assert res.changed.tolist() == [[False, True, True, False]]
    assert commit_lengths(res.changed, torch.ones_like(draft, dtype=torch.bool)).tolist() == [2]
    assert commit_lengths(res.tokens[-1] != draft, torch.ones_like(draft, dtype=torch.bool)).tolist() == [3]


def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 384, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2] = 0
    mask[1, :2] = 0
    return ids, mask


def force_edits(w: ChunkRefineWrapper, rows: tuple[int, ...], offset: int = 1, token: int = X) -> list:
    """Make refine_chunk 'edit' one position per chunk in `rows`: the editable position `offset` after the row's
    first editable one becomes `token` (a stand-in for a trained sidecar changing its mind there)."""
    original = w.refine_chunk
    calls = []

    def patched(chunk, *args, **kwargs):
        res = original(chunk, *args, **kwargs)
        final = res.final_tokens.clone()
        editable = args[2] if len(args) > 2 else kwargs["editable"]
        for r in rows:
            idx = editable[r].nonzero().flatten()
            if len(idx) > offset:
                j = int(idx[offset])
                final[r, j] = token if int(final[r, j]) != token else token + 1
        res.tokens[-1] = final
        res.final_tokens = final
        calls.append(kwargs.get("unverified"))
        return res

    w.refine_chunk = patched
    return calls


def greedy_consistent(base, ids: torch.Tensor, mask: torch.Tensor, out: torch.Tensor, row: int) -> list[bool]:
    """Per new token of `row`: does it equal the base's greedy prediction given everything before it?"""
    full = out[row:row + 1]
    m = torch.cat([mask[row:row + 1], torch.ones(1, full.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        pred = base(input_ids=full, attention_mask=m, position_ids=pos).logits[0].argmax(-1)
    p = ids.shape[1]
    return [bool(pred[i - 1] == full[0, i]) for i in range(p, full.shape[1])]


@pytest.mark.parametrize("reuse", [True, False])
def test_committed_tokens_are_edits_or_checked_greedy(base, reuse):
    """With edits forced in row 0 only: row 0 commits per row (shorter chunks), every committed token is either the
    edit or the greedy token given its actual prefix (a stale token is never committed unchecked), and row 1, never
    edited, stays exactly the baseline's greedy output."""
    ids, mask = prompt()
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    w = ChunkRefineWrapper(base, RecursiveConfig(chunk_width=5, max_inner_steps=2, reuse_stale_suffix=reuse))
    calls = force_edits(w, rows=(0,))
    out, stats = w.generate_chunks(ids, attention_mask=mask, max_new_tokens=16, return_stats=True)
    w.remove_hooks()
    assert out.shape == ref.shape
    assert torch.equal(out[1], ref[1])
    ok = greedy_consistent(base, ids, mask, out, 0)
    new = out[0, ids.shape[1]:].tolist()
    assert all(good or tok in (X, X + 1) for good, tok in zip(ok, new)), (ok, new)
    assert any(tok in (X, X + 1) for tok in new)
    lengths = [s["committed_lengths"] for s in stats]
    assert any(row[0] < row[1] for row in lengths if len(row) == 2)  # per-row lengths, not one batch minimum
    assert any(u is not None for u in calls) == reuse  # reuse sends stale tokens to be checked


def test_reuse_without_the_check_commits_stale_tokens(base):
    """The negative control of the test above: drop the check on reused tokens and a stale token gets committed."""
    ids, mask = prompt()
    w = ChunkRefineWrapper(base, RecursiveConfig(chunk_width=5, max_inner_steps=2, reuse_stale_suffix=True))
    original = w.refine_chunk
    w.refine_chunk = lambda *a, **k: original(*a, **{**k, "unverified": None})
    force_edits(w, rows=(0,))
    out = w.generate_chunks(ids, attention_mask=mask, max_new_tokens=16)
    w.remove_hooks()
    ok = greedy_consistent(base, ids, mask, out, 0)
    new = out[0, ids.shape[1]:].tolist()
    assert not all(good or tok in (X, X + 1) for good, tok in zip(ok, new))


def test_edited_eos_never_commits_padding(base):
    """Row 1 seeds an EOS; a refinement that edits it away must leave the row running, with no pad committed."""
    ids, mask = prompt()
    free = base.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    eos = int(free[1, ids.shape[1] + 2])  # row 1's third token is its EOS
    gc = base.generation_config
    old_eos, old_pad = gc.eos_token_id, gc.pad_token_id
    gc.eos_token_id, gc.pad_token_id = eos, 1
    try:
        w = ChunkRefineWrapper(base, RecursiveConfig(chunk_width=5, max_inner_steps=2))
        original = w.refine_chunk

        def edit_eos(chunk, *args, **kwargs):
            res = original(chunk, *args, **kwargs)
            final = torch.where(chunk == eos, torch.full_like(chunk, X), res.final_tokens)
            res.tokens[-1] = res.final_tokens = final
            return res

        w.refine_chunk = edit_eos
        out = w.generate_chunks(ids, attention_mask=mask, max_new_tokens=12)
        w.remove_hooks()
    finally:
        gc.eos_token_id, gc.pad_token_id = old_eos, old_pad
    row = out[1, ids.shape[1]:].tolist()
    assert row[2] == X and 1 not in row  # the edit is committed, and no padding: the row ran on to the budget
    assert len(row) == 12
