"""Recursive phases A, B, C: train the sidecar (and, in B/C, a little of the base) to refine chunks.

One example = (prefix, target chunk). The prefix runs once, without gradient (the base is frozen where it
matters, and LoRA/unfrozen weights learn through the chunk passes). The chunk the sidecar refines is built from
the prefix's cache snapshot to look like what inference refines (rkl.data.chunks.chunk_modes): the model's own
greedy draft, a splice of the true chunk and the model's continuation, or the true chunk with model-sampled
tokens at corrupted positions. Then K inner steps run over it from the same snapshot, every valid position
editable, as in generation. Loss positions hold model outputs, never a visible target (the leakage rule); the
other valid positions get the target-free keep term.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from rkl.config import RecursiveConfig
from rkl.data.chunks import TRUE, ChunkBatch, chunk_batch, chunk_modes, scheduled_value
from rkl.data.corpora import describe_source
from rkl.data.packing import step_generator as packing_generator
from rkl.errors import UserError
from rkl.model.cache import CacheSnapshot, snapshot_rows
from rkl.model.surgery import SURGERY_FILE, find_base, load_model_with_config, save_sidecar, write_base_reference
from rkl.model.base import load_base
from rkl.model.drafts import Noise, build_chunk
from rkl.model.static_chunk import StaticChunkPasses, attention_blocker
from rkl.model.static_decode import StaticDecoder, graph_blocker
from rkl.model.weights import SafetensorsStream
from rkl.model.adapters import UNFROZEN_FILE, apply_lora, l2_to_pretrained, save_base_changes, unfreeze
from rkl.runmeta import run_metadata
from rkl.train.drift import DriftProbe
from rkl.train.losses import LOSS_NAMES, final_ce, keep_positions, refinement_losses, total_loss
from rkl.train.loop import TrainResult, make_accelerator, train
from rkl.train.phases import PhaseRun, resume_source, token_streams
from rkl.train.sharding import (device_mesh, fill_from_first, fsdp_requested, full_tensor, is_sharded, load_barrier,
                                shard_decoder_layers)


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return packing_generator(seed, step, f"corrupt:{micro}")


class WalkedChunk(NamedTuple):
    """One micro-batch's share of its group's walk (RefineTask.drafted)."""
    prefix_len: int
    chunk: torch.Tensor  # [B, W] the training chunk
    snapshot: CacheSnapshot  # its rows of the walk's prefix cache
    prev_logits: torch.Tensor  # [B, V] its rows of the logits at the last prefix position


def prefix_range(config: RecursiveConfig) -> tuple[int, int]:
    """Prefix lengths vary per batch in [max/4, seq_len - W]: prefix + chunk stay within seq_len tokens."""
    longest = max(1, config.seq_len - config.chunk_width)
    return max(1, longest // 4), longest


class RefineTask:
    def __init__(self, wrapper, tokenizer, config: RecursiveConfig, train_stream: torch.Tensor,
                 val_stream: torch.Tensor, device: torch.device, phase: str, base_reference: dict,
                 pretrained: torch.nn.Module | None = None, shard: tuple[int, int] = (0, 1)):
        self.wrapper, self.tokenizer, self.config, self.device, self.phase = wrapper, tokenizer, config, device, phase
        self.rank, self.world = shard  # this process's slice of every global batch (see rkl.train.loop)
        self.base_reference = base_reference
        self.train_stream, self.val_stream = train_stream, val_stream
        base = wrapper.base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_params = apply_lora(base, config) if config.lora_rank > 0 else []
        self.unfrozen = unfreeze(base, config) if config.unfreeze_every > 0 else {}
        self.reference, self.drift = {}, None
        self.walked: dict[tuple[int, int], WalkedChunk] = {}  # (step, micro) -> drafted() of its group
        # A graph replays what its capture ran: only the base it was built and measured for gets one, frozen (no
        # LoRA, no unfrozen layers) and unsharded (FSDP all-gathers each layer in Python hooks, which cannot replay).
        frozen = not self.lora_params and not self.unfrozen and not any(is_sharded(p) for p in base.parameters())
        graphable = frozen and device.type == "cuda"
        blocker = graph_blocker(base) if graphable else None
        walk_graph = config.draft_walk_graph and graphable and not blocker
        # the inner steps' chunk passes on the same terms, and without [Z] or step checkpointing (which they lack)
        chunk_graph = (config.chunk_pass_graph and graphable and not blocker and not config.use_latent_token
                       and not config.gradient_checkpointing
                       and attention_blocker(base) is None)
        self.decoder = StaticDecoder(base, config.seq_len) if walk_graph else None
        self.chunk_passes = StaticChunkPasses(base, prefix_range(config)[1]) if chunk_graph else None
        # what run.json records (run_facts adds a capture that failed all the same; the eager path then runs)
        self.draft_walk = "cuda_graph" if walk_graph else "eager"
        self.chunk_pass_mode = "cuda_graph" if chunk_graph else "eager"
        if blocker:  # graphs are possible in principle here: say why this run runs eagerly what it asked to graph
            asked = [name for name, on in (("the draft walk", config.draft_walk_graph),
                                           ("the inner steps' chunk passes", config.chunk_pass_graph)) if on]
            self.draft_walk += f" ({blocker})" if config.draft_walk_graph else ""
            self.chunk_pass_mode += f" ({blocker})" if config.chunk_pass_graph else ""
            if asked and self.rank == 0:
                print(f"rkl: {' and '.join(asked)} run eagerly, not as CUDA graphs: {blocker}", file=sys.stderr,
                      flush=True)
        if self.unfrozen:
            # The L2 pull and the drift are both measured against the PRETRAINED base (not whatever this run
            # was resumed from), so a resumed phase C continues exactly and drift includes phase B's LoRA.
            if pretrained is None:
                raise ValueError("phase C needs the pretrained base for its L2 reference and drift")
            weights = dict(pretrained.named_parameters())
            self.reference = {n: weights[n.replace(".base_layer", "")].detach().clone() for n in self.unfrozen}
            self.drift = DriftProbe(wrapper, tokenizer, config, device, reference_model=pretrained,
                                    new_tokens=config.drift_new_tokens)

    def run_facts(self) -> dict:
        """The walk and the chunk passes as they ran: a graph whose capture failed ran eagerly (stderr said why)."""
        walk, passes = self.draft_walk, self.chunk_pass_mode
        if self.decoder is not None and not self.decoder.graph:
            walk = "eager (the CUDA graph's capture failed)"
        if self.chunk_passes is not None and self.chunk_passes.failed is not None:
            passes = f"eager (the CUDA graphs' capture failed: {self.chunk_passes.failed})"
        return {"draft_walk": walk, "chunk_passes": passes}

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
        walked = self.drafted(step, micro) if c.draft_walk_steps > 1 else None
        batch, modes, gen, mine, rate, share = self.micro_batch(step, micro, walked.prefix_len if walked else None)
        terms, stats, _ = self.losses_on(batch, modes[mine], gen, noise=[Noise(gen, modes, mine)],
                                         walked=walked, across_processes=self.world > 1)
        loss = total_loss(terms, c)
        if self.unfrozen and c.l2_to_pretrained > 0:
            l2 = l2_to_pretrained(self.unfrozen, self.reference)
            loss = loss + c.l2_to_pretrained * l2
            stats["loss_l2_pretrained"] = float(l2.detach())
        tokens = batch.prefix_ids.numel() + batch.chunk_ids.numel()
        return loss, {"loss": float(loss.detach()), **{f"loss_{k}": float(v.detach()) for k, v in terms.items()}, **stats,
                      "corruption_rate": rate, "draft_share": share, "tokens": float(tokens)}

    def micro_batch(self, step: int, micro: int, prefix_len: int | None = None):
        """(this process's rows of the micro-batch, the global batch's modes, the generator its modes and sampling
        noise come from, this process's rows, corruption rate, draft share): a pure function of (seed, step, micro,
        rank). prefix_len: the prefix length of the walk group this micro-batch was drafted in (draft_walk_steps)."""
        c = self.config
        index = step * c.grad_accum + micro
        lo, hi = prefix_range(c)
        total = c.batch_size * self.world
        batch = chunk_batch(self.train_stream, index, total, c.chunk_width, lo, hi, c.seed,
                            self.tokenizer.eos_token_id, prefix_len=prefix_len)
        gen = step_generator(c.seed, step, micro)
        rate = scheduled_value(c.corruption_rate, c.corruption_rate_final, c.corruption_schedule, step, c.steps)
        share = scheduled_value(c.draft_share, c.draft_share_final, c.draft_schedule, step, c.steps)
        modes, _ = chunk_modes(total, c.chunk_width, share, c.splice_share, rate, c.corruption_mask, gen)
        mine = slice(self.rank * c.batch_size, (self.rank + 1) * c.batch_size)
        batch = ChunkBatch(batch.prefix_ids[mine], batch.chunk_ids[mine], batch.chunk_valid[mine])
        return batch, modes, gen, mine, rate, share

    def drafted(self, step: int, micro: int) -> WalkedChunk:
        """This micro-batch's training chunk, built in one walk with every micro-batch of the draft_walk_steps steps
        of its group (the base is frozen in phase A, so when a chunk is built does not change it), and its rows of
        the walk's prefix pass, which its inner steps start from (so a step runs no prefix pass of its own; the
        group's prefix cache stays in memory until its last step). The group's micro-batches share its first one's
        prefix length (a walk needs one); each keeps its own chunk positions, modes and sampling noise. A resumed
        run rebuilds the group it resumes in, the same way."""
        key = (step, micro)
        if key not in self.walked:
            # what a resumed run's group left unused (the steps before the one it resumed at) holds that group's
            # prefix cache: let it go before this walk, not after
            self.walked.clear()
            c = self.config
            first = step - step % c.draft_walk_steps
            members = [(s, m) for s in range(first, min(first + c.draft_walk_steps, c.steps))
                       for m in range(c.grad_accum)]
            prefix_len = self.micro_batch(first, 0)[0].prefix_ids.shape[1]
            parts = [self.micro_batch(s, m, prefix_len) for s, m in members]
            prefix = torch.cat([b.prefix_ids for b, *_ in parts]).to(self.device)
            targets = torch.cat([b.chunk_ids for b, *_ in parts]).to(self.device)
            modes = torch.cat([g_modes[mine] for _, g_modes, _, mine, *_ in parts]).to(self.device)
            noise = [Noise(gen, g_modes, mine) for _, g_modes, gen, mine, *_ in parts]
            with torch.no_grad():
                snapshot, prev_logits = self.wrapper.prepare_prefix(prefix)
                chunks = build_chunk(self.wrapper, snapshot, prev_logits, targets, modes, noise=noise,
                                     decoder=self.decoder)
            rows = [slice(i * c.batch_size, (i + 1) * c.batch_size) for i in range(len(members))]
            self.walked = {k: WalkedChunk(prefix_len, chunks[r], snapshot_rows(snapshot, r), prev_logits[r])
                           for k, r in zip(members, rows)}
        return self.walked.pop(key)

    def losses_on(self, batch: ChunkBatch, modes: torch.Tensor, gen: torch.Generator,
                  max_inner_steps: int | None = None, noise: list[Noise] | None = None,
                  chunk_in: torch.Tensor | None = None, walked: WalkedChunk | None = None,
                  across_processes: bool = False):
        """Build the chunk (`modes`, from the prefix's snapshot), run K inner steps over it, compute the losses.

        Every position is editable and tokens change under the exact edit rule of generation. The targets enter the
        chunk only at TRUE positions, which are never loss positions (the leakage rule), and the losses: the chunk's
        valid positions (up to its true EOS) decide only where losses are taken, never what the sidecar reads or
        may edit. noise: where the sampling noise comes from (rkl.model.drafts.Noise: the global batch's, when the
        batch is a slice of one); chunk_in: the chunk, built already; walked: the chunk and the prefix's cache, both
        from a group's walk (draft_walk_steps), so no prefix pass runs here. across_processes: the batch
        is this process's slice of a global batch (data parallel): its token-level means divide by the global
        batch's counts (shared by an all-reduce), as one process holding the whole batch would. Returns (terms,
        stats, RefineResult)."""
        prefix = batch.prefix_ids.to(self.device)
        targets = batch.chunk_ids.to(self.device)
        valid = batch.chunk_valid.to(self.device)
        modes = modes.to(self.device)
        loss_mask = valid & (modes != TRUE)
        with torch.no_grad():
            if walked is not None:
                snapshot, prev_logits, chunk_in = walked.snapshot, walked.prev_logits, walked.chunk
            else:
                snapshot, prev_logits = self.wrapper.prepare_prefix(prefix)
            if chunk_in is None:
                chunk_in = build_chunk(self.wrapper, snapshot, prev_logits, targets, modes, gen, noise=noise,
                                       decoder=self.decoder)
            chunk_in = chunk_in.to(self.device)
        result = self.wrapper.refine_chunk(chunk_in, snapshot, prev_logits, editable=torch.ones_like(valid),
                                           max_inner_steps=max_inner_steps, prefix_ids=prefix,
                                           chunk_passes=self.chunk_passes)
        hits = lambda logits: ((logits.argmax(-1) == targets) & loss_mask).sum()  # noqa: E731
        keep = keep_positions(valid, loss_mask, result.inputs[0], targets)
        # (loss positions, keep positions, right after K steps, right after one pass): this batch's, or with
        # across_processes the global batch's
        n = torch.stack([loss_mask.sum(), keep.sum(), hits(result.logits[-1]), hits(result.logits[0])]).float()
        counts = None
        if across_processes:
            # Data parallel averages the processes' gradients. Each process's own token-level mean would weigh its
            # positions by 1 / (its count x processes), not 1 / (the global count): slices with fewer loss positions
            # would count more. Dividing by the global count / processes gives the global batch's mean exactly.
            torch.distributed.all_reduce(n)
            counts = (n[0].clamp(min=1) / self.world, n[1].clamp(min=1) / self.world)
        terms = refinement_losses(result.logits, result.commit_logits, result.inputs, result.final_tokens, targets,
                                  loss_mask, valid, counts=counts)
        loss_positions, _, right_k, right_1 = n.tolist()
        stats = {"acc_k": right_k / max(loss_positions, 1), "acc_1": right_1 / max(loss_positions, 1),
                 "n_loss_positions": loss_positions}
        return terms, stats, result

    @torch.no_grad()
    def walk_together(self, batch: ChunkBatch, kinds: list[tuple[str, torch.Tensor, torch.Generator]]) -> list:
        """The chunks of one held-out batch for each (name, modes, generator) of `kinds`, built in one walk over the
        batch repeated (the same prefix and targets; each kind keeps its modes and noise, so each chunk is the one
        its own walk builds). Used where training walks several batches at once (draft_walk_steps > 1): there a
        walk of twice the rows costs about what one costs, and needs no more memory than training's."""
        n = len(kinds)
        prefix = batch.prefix_ids.to(self.device).repeat(n, 1)
        targets = batch.chunk_ids.to(self.device).repeat(n, 1)
        modes = torch.cat([m for _, m, _ in kinds]).to(self.device)
        snapshot, prev_logits = self.wrapper.prepare_prefix(prefix)
        chunks = build_chunk(self.wrapper, snapshot, prev_logits, targets, modes,
                             noise=[Noise(gen, m) for _, m, gen in kinds], decoder=self.decoder)
        return list(chunks.split(batch.prefix_ids.shape[0]))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Fixed held-out chunks (the same at every call), built two ways: the model's greedy DRAFT (every valid
        position scored) and SAMPLED corruption at corruption_rate (fixed, so the curve is comparable across steps;
        the sampled positions scored). For each: CE and accuracy after K steps and after one pass (step 1 runs with
        zero deltas: the unrefined model through the same chunk path), and the losses (the total over both)."""
        c = self.config
        lo, hi = prefix_range(c)
        sums: dict[str, float] = {}
        for i in range(c.eval_batches):
            # the global batch, on every process: the curve does not depend on how many processes there are
            total = c.batch_size * self.world
            batch = chunk_batch(self.val_stream, i, total, c.chunk_width, lo, hi, c.seed + 10_007,
                                self.tokenizer.eos_token_id)
            targets = batch.chunk_ids.to(self.device)
            kinds = []
            for name, share in (("draft", 1.0), ("corrupt", 0.0)):
                gen = step_generator(c.seed + 10_007, i, 0)
                modes, _ = chunk_modes(total, c.chunk_width, share, 0.0, c.corruption_rate, c.corruption_mask, gen)
                kinds.append((name, modes, gen))
            chunks = self.walk_together(batch, kinds) if c.draft_walk_steps > 1 else [None] * len(kinds)
            for (name, modes, gen), chunk_in in zip(kinds, chunks):
                terms, stats, result = self.losses_on(batch, modes, gen, chunk_in=chunk_in)
                loss_mask = batch.chunk_valid.to(self.device) & (modes.to(self.device) != TRUE)
                row = {f"{name}_ce_k": float(terms["final"]),
                       f"{name}_ce_1": float(final_ce(result.logits[:1], targets, loss_mask)),
                       f"{name}_acc_k": stats["acc_k"], f"{name}_acc_1": stats["acc_1"],
                       "loss": float(total_loss(terms, c)) / 2, **{f"loss_{k}": float(v) / 2 for k, v in terms.items()}}
                for k, v in row.items():
                    sums[k] = sums.get(k, 0.0) + v / c.eval_batches
        if self.drift is not None:
            sums.update(self.drift.measure())
        return sums

    def save_sharded(self, folder: Path | None) -> None:
        """With FSDP the unfrozen layers are sharded: every process gathers them one tensor at a time, in one order,
        and the main process (folder: None elsewhere) streams each into its unfrozen.safetensors, holding one."""
        if not any(is_sharded(p) for p in self.unfrozen.values()):
            return
        specs = {name: (tuple(p.shape), p.dtype) for name, p in self.unfrozen.items()}
        stream = SafetensorsStream(Path(folder) / UNFROZEN_FILE, specs) if folder is not None else None
        for name in SafetensorsStream.order(specs):
            whole = full_tensor(self.unfrozen[name], main=stream is not None)
            if stream is not None:
                stream.write(name, whole)
        if stream is not None:
            stream.close()

    def save_weights(self, out_dir: Path) -> None:
        """A surgery-style folder: sidecar + LoRA/unfrozen weights + the reference to the (unchanged) base."""
        save_sidecar(self.wrapper, out_dir)
        save_base_changes(self.wrapper.base, self.config, out_dir,  # sharded: save_sharded wrote them
                          unfrozen_written=any(is_sharded(p) for p in self.unfrozen.values()))
        write_base_reference(self.base_reference, Path(out_dir))  # relative to this folder, so a moved tree loads
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out_dir)


def validation_lines(config: RecursiveConfig, first: dict[str, float], last: dict[str, float]) -> list[str]:
    """What `rkl train` prints at the end of a phase: the validation loss, named (RefineTask.validate's "loss": the
    weighted sum of the refinement losses, averaged over the drafted and the corrupted held-out chunks), and the
    headline quantity, the drafted chunks' CE after K inner steps against one pass."""
    weights = " + ".join(f"{getattr(config, f'lambda_{name}'):g}*{name}" for name in LOSS_NAMES)
    l2 = ", without the L2 pull" if config.unfreeze_every > 0 else ""
    span = lambda key: f"{first[key]:.4f} (step {first['step']}) -> {last[key]:.4f} (step {last['step']})"  # noqa: E731
    return [f"validation loss = {weights} (the lambda-weighted sum of the {len(LOSS_NAMES)} refinement losses{l2}, "
            f"mean of drafted and corrupted held-out chunks): {span('loss')}",
            f"held-out draft CE after K = {config.max_inner_steps} inner steps: {span('draft_ce_k')}; in one pass "
            f"(no refinement): {span('draft_ce_1')}"]


def load_phase_models(source: str, config: RecursiveConfig, dtype: str | None, base_reference: dict,
                      device: torch.device, mesh=None, barrier: Callable[[], None] | None = None):
    """(wrapper, tokenizer, pretrained, sharding) of a recursive phase, on `device`: the model that trains, from
    `source`, and in phase C a plain copy of the pretrained base for the L2 reference and the drift (else None).
    With a device `mesh` (FSDP), each decoder layer of both is sharded before it moves, so no process ever holds the
    whole base on its device; sharding is what run.json records of it (else None). With a `barrier` (several
    processes), only the first process reads the checkpoint: the others build the structure on the meta device and
    receive the values, or with FSDP their shards, from it (rkl.train.sharding.fill_from_first); the barrier is where
    they wait while it reads."""
    import torch.distributed as dist

    receive = barrier is not None and dist.get_rank() != 0
    device_map = "meta" if receive else None
    wrapper, tokenizer, _ = load_model_with_config(source, config=config, dtype=dtype, device_map=device_map)
    if mesh is not None or barrier is not None:
        # what trains inside the base is set before the model is sharded (the adapters stay whole, the unfrozen
        # layers are sharded in float32) or sent (every process then trains the first process's fresh adapters)
        if config.lora_rank > 0:
            apply_lora(wrapper.base, config)
        if config.unfreeze_every > 0:
            unfreeze(wrapper.base, config)
    sharding = _place(wrapper, wrapper.base, device, mesh, barrier, receive)
    pretrained = None
    if config.unfreeze_every > 0:  # phase C
        base_ref = base_reference["base"]
        pretrained, _ = load_base(base_ref.removeprefix("preset:"), dtype=dtype, seed=0, device_map=device_map)
        # sharded as the trained base is, so its reference tensors match the shards
        _place(pretrained, pretrained, device, mesh, barrier, receive)
        pretrained.eval()
    return wrapper, tokenizer, pretrained, sharding


def _place(model: torch.nn.Module, base: torch.nn.Module, device: torch.device, mesh,
           barrier: Callable[[], None] | None, receive: bool) -> dict | None:
    """Shard `base` (part of `model`) over `mesh`, fill `model` from the first process where a `barrier` says
    several take part, and move it to `device`. Returns what shard_decoder_layers records (None without a mesh)."""
    full = model.state_dict() if barrier is not None and not receive else None  # whole, before sharding
    sharding = shard_decoder_layers(base, mesh) if mesh is not None else None
    if barrier is not None:
        fill_from_first(model, full, device, barrier)
    del full
    model.to(device)
    return sharding


def run_refine_phase(run: PhaseRun) -> TrainResult:

    config = run.config
    if not config.recursive_enabled:
        raise UserError(f"phase {run.phase} trains the recursive sidecar, but its config has recursive_enabled=false: "
                        "drop that setting (`rkl train --phase vanilla` trains the base alone)")
    if config.seq_len <= config.chunk_width:
        raise UserError(f"seq_len {config.seq_len} is phase {run.phase}'s budget for prefix + chunk, and chunk_width "
                        f"{config.chunk_width} leaves no prefix: raise seq_len above chunk_width (--set seq_len=N) "
                        "or lower chunk_width")
    accelerator = make_accelerator(config)
    source = resume_source(run)
    if not Path(source).is_dir():
        from rkl.model.base import preset_names

        if source in preset_names():
            raise UserError(f"phase {run.phase} refines a surgery or phase checkpoint, and '{source}' is a model preset; "
                            f"run `rkl surgery --model {source}` first and pass its --out as --model")
        raise UserError(f"phase {run.phase} starts from {source}, which does not exist; run the previous stage "
                        "first (surgery for a, phase a for b, phase b for c) or pass --model")
    if not (Path(source) / SURGERY_FILE).is_file():
        raise UserError(f"{source} is not a surgery or phase checkpoint (no {SURGERY_FILE}); run `rkl surgery` first")
    # gradient_checkpointing: refine_chunk recomputes each inner step in backward (rkl's own scheme, which keeps the
    # cached prefix; transformers' per-layer checkpointing would drop it)
    if config.gradient_checkpointing and config.cache_reset_policy == "keep_all":
        raise UserError("gradient_checkpointing recomputes each inner step from the chunk-start snapshot, and "
                        "cache_reset_policy=keep_all carries one cache across steps; use the default policy")
    base_reference = find_base(Path(source))  # where the base is now (the tree may have moved since surgery)
    mesh = device_mesh(accelerator.num_processes, accelerator.device) if fsdp_requested() else None
    several = accelerator.num_processes > 1  # then the first process reads the checkpoint and sends it
    start = time.perf_counter()
    wrapper, tokenizer, pretrained, sharding = load_phase_models(
        source, config, run.dtype, base_reference, accelerator.device, mesh,
        barrier=load_barrier() if several else None)
    if several and accelerator.is_main_process:
        print(f"model read by the first process and sent to all {accelerator.num_processes} in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    train_stream, val_stream = token_streams(config, tokenizer)
    meta = run_metadata(phase=run.phase, init=run.model, seed=config.seed,
                        data=describe_source(config.data, config.arithmetic_digits),
                        train_tokens=int(train_stream.numel()), val_tokens=int(val_stream.numel()))
    if sharding is not None:
        meta["fsdp"] = sharding
    if several:
        meta["model_loading"] = "read by the first process, sent to the others"
    task = RefineTask(wrapper, tokenizer, config, train_stream, val_stream, accelerator.device, run.phase,
                      base_reference, pretrained, shard=(accelerator.process_index, accelerator.num_processes))
    del pretrained  # the task keeps what it needs (reference tensors, reference generations)
    return train(task, config, run.out, run.log_dir, meta, accelerator, resume=run.resume, stop_at=run.stop_at,
                 show_progress=run.show_progress)
