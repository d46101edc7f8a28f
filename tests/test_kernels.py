"""fla's short-convolution kernel plugged into transformers' KDA layer (rkl.model.kernels).

On a CPU the layout glue runs over PyTorch stand-ins with the semantics of fla's two functions ([B, T, D] in and
out; the one-token update shifts the [B, D, W] window in place); on a GPU with fla, the real kernels are compared with
transformers' reference (skipped elsewhere).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.kimi_linear import modeling_kimi_linear as mkl

from rkl.model.base import build_preset, load_base
from rkl.model.cache import new_cache
from rkl.model.kernels import (fla_kernels_available, fla_short_convolution, kernel_record, set_short_convolution,
                               short_convolution_in_use)

NAMES = ("causal_conv1d_fn", "causal_conv1d_update")
# With fla installed, transformers runs KDA itself through fla's Triton kernels, which a CPU model cannot run
cpu_only = pytest.mark.skipif(fla_kernels_available(), reason="the CPU model runs fla's KDA kernels here")


def conv_btd(x, weight, bias=None, activation=None):
    """fla.modules.causal_conv1d.causal_conv1d's contract, in PyTorch: x [B, T, D], zero left padding."""
    y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=x.shape[-1])
    y = y[..., :x.shape[1]].transpose(1, 2)
    return (F.silu(y) if activation in ("silu", "swish") else y), None


def update_btd(x, cache, weight=None, bias=None, activation=None):
    """fla's causal_conv1d_update contract: x [B, 1, D]; cache [B, D, W] shifted left in place, x written last."""
    cache.copy_(torch.cat([cache[..., 1:], x.transpose(1, 2).to(cache.dtype)], -1))
    y = (cache * weight).sum(-1, keepdim=True).transpose(1, 2)
    if bias is not None:
        y = y + bias
    return (F.silu(y) if activation in ("silu", "swish") else y).to(x.dtype), cache


@pytest.fixture
def restore_conv():
    saved = {name: getattr(mkl, name) for name in NAMES}
    yield
    for name, function in saved.items():
        setattr(mkl, name, function)


@pytest.fixture(scope="module")
def base():
    return load_base("tiny", device_map="cpu")[0].eval()  # the CPU stand-ins run on the CPU, also on a GPU machine


def run_cached(base, ids):
    """Logits of: a prefill of 7 tokens, a 4-token continuation from the cache, 3 one-token decode steps."""
    cache = new_cache(base.config)
    logits = []
    with torch.no_grad():
        for part in (ids[:, :7], ids[:, 7:11], ids[:, 11:12], ids[:, 12:13], ids[:, 13:14]):
            logits.append(base(input_ids=part, past_key_values=cache, use_cache=True).logits)
    conv = [layer.conv_states[0].clone() for layer in cache.layers if hasattr(layer, "conv_states")]
    return torch.cat(logits, 1), conv


@cpu_only
def test_layout_glue_computes_what_the_reference_computes(base, restore_conv):
    ids = torch.randint(3, 384, (3, 14), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_conv = run_cached(base, ids)
    calls = {"conv": 0, "update": 0}

    def counted(fn, key):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    for name, fn in zip(NAMES, fla_short_convolution(counted(conv_btd, "conv"), counted(update_btd, "update"))):
        setattr(mkl, name, fn)
    logits, conv = run_cached(base, ids)
    kda_layers = len(ref_conv)
    assert calls == {"conv": 2 * kda_layers, "update": 3 * kda_layers}  # both paths really ran through the glue
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    for got, want in zip(conv, ref_conv):  # the decode window, updated in place as transformers' own update does
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@cpu_only
def test_one_token_pass_with_gradients_keeps_the_reference(base, restore_conv):
    """fla's one-token update has no backward: with gradients the glue must not call it."""
    def no_backward(*a, **k):
        raise AssertionError("fla's update called on a pass that needs gradients")

    for name, fn in zip(NAMES, fla_short_convolution(conv_btd, no_backward)):
        setattr(mkl, name, fn)
    ids = torch.randint(3, 384, (2, 6))
    cache = new_cache(base.config, grad_friendly=True)  # as refinement passes run (rkl.model.cache)
    with torch.no_grad():
        base(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
    embeds = base.get_input_embeddings()(ids[:, 5:]).detach().requires_grad_(True)
    base(inputs_embeds=embeds, past_key_values=cache, use_cache=True).logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    # the window stays a contiguous [B, D, W], so a pass without gradients can take fla's in-place update
    assert all(layer.conv_states[0].is_contiguous() for layer in cache.layers if hasattr(layer, "conv_states"))
    with torch.no_grad(), pytest.raises(AssertionError, match="no backward|needs gradients"):
        base(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True)


def test_without_fla_the_reference_stays_and_is_recorded(restore_conv):
    if fla_kernels_available():
        pytest.skip("fla is installed")
    assert set_short_convolution("fla") == "reference"
    assert short_convolution_in_use() == "reference"
    assert kernel_record() == {"kda_kernels": "reference", "short_convolution": "reference",
                               "cudnn_attention": torch.backends.cuda.cudnn_sdp_enabled()}


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_kernels_available()), reason="needs a GPU with fla")
def test_fla_kernel_matches_the_reference_on_the_gpu(restore_conv):
    torch.manual_seed(0)
    b, d, t, w = 3, 96, 37, 4
    weight = torch.randn(d, w, device="cuda")
    x = torch.randn(b, d, t, device="cuda", requires_grad=True)
    set_short_convolution("reference")
    ref_fn, ref_update = mkl.causal_conv1d_fn, mkl.causal_conv1d_update
    assert set_short_convolution("fla") == "fla" and short_convolution_in_use() == "fla"
    y_ref, y = ref_fn(x, weight, activation="silu"), mkl.causal_conv1d_fn(x, weight, activation="silu")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    g_ref, = torch.autograd.grad(y_ref.square().sum(), x)
    g, = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
    state_ref = torch.randn(b, d, w, device="cuda")
    state = state_ref.clone()
    step = torch.randn(b, d, 1, device="cuda")
    with torch.no_grad():
        out_ref = ref_update(step, state_ref, weight, None, "silu")
        out = mkl.causal_conv1d_update(step, state, weight, None, "silu")
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=0)


def test_loading_a_model_keeps_sdpa_off_cudnn_attention_and_records_it():
    """cuDNN's attention made HF generate irreproducible at batch 32/64 on an H200 (docs/benchmarks.md, 2026-12-04):
    every model rkl loads or builds turns it off, and results record that."""
    torch.backends.cuda.enable_cudnn_sdp(True)  # PyTorch's default, whatever ran before
    try:
        for load in (lambda: load_base("tiny", seed=0, device_map="cpu"), lambda: build_preset("tiny", seed=0)):
            torch.backends.cuda.enable_cudnn_sdp(True)
            load()
            assert kernel_record()["cudnn_attention"] is False
    finally:
        torch.backends.cuda.enable_cudnn_sdp(False)
