"""Recursive phases A, B, C: train the sidecar (and, in B/C, a little of the base) to refine chunks.

One example = (prefix, target chunk). The prefix runs once, without gradient (the base is frozen where it
matters, and LoRA/unfrozen weights learn through the chunk passes); the K inner steps run over the corrupted
chunk only, from the prefix's cache snapshot. Loss positions are the corrupted positions (or, with scheduled
sampling, every position of a chunk that is the model's own draft): never a position whose target token is
visible in the chunk the sidecar reads (the leakage rule).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rkl.config import RecursiveConfig
from rkl.data.chunks import ChunkBatch, chunk_batch, corrupt, corruption_mask, scheduled_value
from rkl.data.corpora import describe_source
from rkl.data.packing import step_generator as packing_generator
from rkl.errors import UserError
from rkl.model.surgery import SURGERY_FILE, load_model_with_config, save_sidecar
from rkl.model.base import load_base
from rkl.model.adapters import apply_lora, l2_to_pretrained, save_base_changes, unfreeze
from rkl.runmeta import run_metadata
from rkl.train.drift import DriftProbe
from rkl.train.losses import final_ce, refinement_losses, total_loss
from rkl.train.loop import TrainResult, make_accelerator, train
from rkl.train.phases import PhaseRun, resume_source, token_streams


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return packing_generator(seed, step, f"corrupt:{micro}")


def prefix_range(config: RecursiveConfig) -> tuple[int, int]:
    """Prefix lengths vary per batch in [max/4, seq_len - W]: prefix + chunk stay within seq_len tokens."""
    longest = max(1, config.seq_len - config.chunk_width)
    return max(1, longest // 4), longest


class RefineTask:
    def __init__(self, wrapper, tokenizer, config: RecursiveConfig, train_stream: torch.Tensor,
                 val_stream: torch.Tensor, device: torch.device, phase: str, base_reference: dict,
                 pretrained: torch.nn.Module | None = None):
        self.wrapper, self.tokenizer, self.config, self.device, self.phase = wrapper, tokenizer, config, device, phase
        self.base_reference = base_reference
        self.train_stream, self.val_stream = train_stream, val_stream
        base = wrapper.base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_params = apply_lora(base, config) if config.lora_rank > 0 else []
        self.unfrozen = unfreeze(base, config) if config.unfreeze_every > 0 else {}
        self.reference, self.drift = {}, None
        if self.unfrozen:
            # The L2 pull and the drift are both measured against the PRETRAINED base (not whatever this run
            # was resumed from), so a resumed phase C continues exactly and drift includes phase B's LoRA.
            if pretrained is None:
                raise ValueError("phase C needs the pretrained base for its L2 reference and drift")
            weights = dict(pretrained.named_parameters())
            self.reference = {n: weights[n.replace(".base_layer", "")].detach().clone() for n in self.unfrozen}
            self.drift = DriftProbe(wrapper, tokenizer, config, device, reference_model=pretrained)

    # --- what the shared loop needs ---------------------------------------------------------------------
    def trainable_groups(self) -> dict[str, tuple[list[torch.nn.Parameter], float]]:
        w, c = self.wrapper, self.config
        groups = {"refine": (list(w.refine_cells.parameters()), c.lr_refine),
                  "boundary": (list(w.boundary.parameters()), c.lr_boundary)}
        if w.latent_token is not None:
            groups["latent"] = (list(w.latent_token.parameters()), c.lr_latent)
        if self.lora_params:
            groups["lora"] = (self.lora_params, c.lr_lora)
        if self.unfrozen:
            groups["unfrozen"] = (list(self.unfrozen.values()), c.lr_unfrozen)
        return groups

    def train_mode(self, training: bool) -> None:
        self.wrapper.train(training)

    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        index = step * c.grad_accum + micro
        lo, hi = prefix_range(c)
        batch = chunk_batch(self.train_stream, index, c.batch_size, c.chunk_width, lo, hi, c.seed,
                            self.tokenizer.eos_token_id)
        gen = step_generator(c.seed, step, micro)
        rate = scheduled_value(c.corruption_rate, c.corruption_rate_final, c.corruption_schedule, step, c.steps)
        draft_p = scheduled_value(0.0, c.scheduled_sampling_final, c.scheduled_sampling, step, c.steps)
        use_draft = draft_p > 0 and float(torch.rand((), generator=gen)) < draft_p
        terms, stats = self.refine_losses(batch, rate, gen, use_draft=use_draft)
        loss = total_loss(terms, c)
        if self.unfrozen and c.l2_to_pretrained > 0:
            l2 = l2_to_pretrained(self.unfrozen, self.reference)
            loss = loss + c.l2_to_pretrained * l2
            stats["loss_l2_pretrained"] = float(l2.detach())
        tokens = batch.prefix_ids.numel() + batch.chunk_ids.numel()
        return loss, {"loss": float(loss.detach()), **{f"loss_{k}": float(v.detach()) for k, v in terms.items()}, **stats,
                      "corruption_rate": rate, "draft_probability": draft_p, "tokens": float(tokens)}

    def refine_losses(self, batch: ChunkBatch, rate: float, gen: torch.Generator, use_draft: bool = False,
                      max_inner_steps: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Corrupt (or draft) the chunk, run K inner steps over it and compute the six losses."""
        chunk_in, loss_mask = self.chunk_inputs(batch, rate, gen, use_draft)
        terms, stats, _ = self.losses_on(batch.prefix_ids.to(self.device), chunk_in, loss_mask,
                                         batch.chunk_ids.to(self.device), batch.chunk_valid.to(self.device),
                                         max_inner_steps)
        return terms, stats

    def chunk_inputs(self, batch: ChunkBatch, rate: float, gen: torch.Generator, use_draft: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(chunk the sidecar reads, loss positions). Leakage rule: a loss position never holds its target:
        it holds a corrupted token (never equal to the target) or the model's own draft."""
        valid = batch.chunk_valid.to(self.device)
        if use_draft:
            return self.greedy_draft(batch.prefix_ids.to(self.device), batch.chunk_ids.shape[1]), valid.clone()
        loss_mask = corruption_mask(batch.chunk_valid, rate, self.config.corruption_mask, gen)
        # Corrupt into tokens the tokenizer can produce (a big preset vocabulary has untrained rows beyond it).
        chunk_in = corrupt(batch.chunk_ids, loss_mask, len(self.tokenizer), gen,
                           special_ids=tuple(self.tokenizer.all_special_ids))
        return chunk_in.to(self.device), loss_mask.to(self.device)

    def losses_on(self, prefix: torch.Tensor, chunk_in: torch.Tensor, loss_mask: torch.Tensor, targets: torch.Tensor,
                  valid: torch.Tensor, max_inner_steps: int | None = None):
        """The six losses of K inner steps over `chunk_in`; the targets enter only the losses, never the model.

        Training lets editable positions take the step's argmax (edit_rule='argmax'): after step 1 the chunk
        holds the model's own guesses, as it does at inference."""
        with torch.no_grad():
            snapshot, prev_logits = self.wrapper.prepare_prefix(prefix)
        result = self.wrapper.refine_chunk(chunk_in, snapshot, prev_logits, editable=loss_mask,
                                           max_inner_steps=max_inner_steps, edit_rule="argmax", prefix_ids=prefix)
        drafts = [torch.where(loss_mask, logits.argmax(-1), chunk_in) for logits in result.logits]
        terms = refinement_losses(result.logits, result.commit_logits, result.length_logits, drafts,
                                  targets, loss_mask, valid)
        n = loss_mask.sum().clamp(min=1)
        acc_k = ((drafts[-1] == targets) & loss_mask).sum() / n
        acc_1 = ((drafts[0] == targets) & loss_mask).sum() / n
        stats = {"acc_k": float(acc_k), "acc_1": float(acc_1), "n_loss_positions": float(loss_mask.sum())}
        return terms, stats, result

    @torch.no_grad()
    def greedy_draft(self, prefix: torch.Tensor, width: int) -> torch.Tensor:
        """The model's own greedy continuation (recursion off): what the chunk holds at inference."""
        out = self.wrapper.base.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=width,
                                         min_new_tokens=width, do_sample=False,
                                         pad_token_id=self.tokenizer.pad_token_id)
        return out[:, prefix.shape[1]:prefix.shape[1] + width]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Fixed held-out chunks and masks (same at every call): losses with K steps and the one-pass CE."""
        c = self.config
        lo, hi = prefix_range(c)
        sums: dict[str, float] = {}
        for i in range(c.eval_batches):
            batch = chunk_batch(self.val_stream, i, c.batch_size, c.chunk_width, lo, hi, c.seed + 10_007,
                                self.tokenizer.eos_token_id)
            chunk_in, loss_mask = self.chunk_inputs(batch, c.corruption_rate, step_generator(c.seed + 10_007, i, 0))
            targets = batch.chunk_ids.to(self.device)
            terms, stats, result = self.losses_on(batch.prefix_ids.to(self.device), chunk_in, loss_mask, targets,
                                                  batch.chunk_valid.to(self.device))
            one_pass = final_ce(result.logits[:1], targets, loss_mask)  # step 1 runs with zero deltas
            row = {"loss": float(total_loss(terms, c)), "ce_k": float(terms["final"]), "ce_1": float(one_pass),
                   **{f"loss_{k}": float(v) for k, v in terms.items()}, **stats}
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v / c.eval_batches
        if self.drift is not None:
            sums.update(self.drift.measure())
        return sums

    def save_weights(self, out_dir: Path) -> None:
        """A surgery-style folder: sidecar + LoRA/unfrozen weights + the reference to the (unchanged) base."""
        save_sidecar(self.wrapper, out_dir)
        save_base_changes(self.wrapper.base, self.config, out_dir)
        (Path(out_dir) / SURGERY_FILE).write_text(json.dumps(self.base_reference, indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out_dir)


def run_refine_phase(run: PhaseRun) -> TrainResult:

    config = run.config
    if not config.recursive_enabled:
        raise UserError(f"phase {run.phase} trains the recursive sidecar; its config has recursive_enabled=false")
    accelerator = make_accelerator(config)
    source = resume_source(run)
    if not Path(source).is_dir():
        raise UserError(f"phase {run.phase} starts from {source}, which does not exist; run the previous stage "
                        "first (surgery for a, phase a for b, phase b for c) or pass --model")
    if not (Path(source) / SURGERY_FILE).is_file():
        raise UserError(f"{source} is not a surgery or phase checkpoint (no {SURGERY_FILE}); run `rkl surgery` first")
    if config.gradient_checkpointing and config.cache_reset_policy != "reset_all":
        raise UserError("gradient_checkpointing drops the cached prefix inside transformers' decoder layers; "
                        "set gradient_checkpointing=false for phases a/b/c (or cache_reset_policy=reset_all)")
    base_reference = json.loads((Path(source) / SURGERY_FILE).read_text())
    wrapper, tokenizer, _ = load_model_with_config(source, config=config, dtype=run.dtype)
    wrapper.to(accelerator.device)
    if config.gradient_checkpointing:
        wrapper.base.gradient_checkpointing_enable()
    train_stream, val_stream = token_streams(config, tokenizer)
    meta = run_metadata(phase=run.phase, init=run.model, seed=config.seed,
                        data=describe_source(config.data, config.arithmetic_digits),
                        train_tokens=int(train_stream.numel()), val_tokens=int(val_stream.numel()))
    pretrained = None
    if config.unfreeze_every > 0:  # phase C: a plain copy of the base for the L2 reference and the drift
        base_ref = base_reference["base"]
        pretrained, _ = load_base(base_ref[len("preset:"):] if base_ref.startswith("preset:") else base_ref,
                                  dtype=run.dtype, seed=0)
        pretrained.to(accelerator.device).eval()
    task = RefineTask(wrapper, tokenizer, config, train_stream, val_stream, accelerator.device, run.phase,
                      base_reference, pretrained)
    del pretrained  # the task keeps what it needs (reference tensors, reference generations)
    return train(task, config, run.out, run.log_dir, meta, accelerator, resume=run.resume, stop_at=run.stop_at,
                 show_progress=run.show_progress)
