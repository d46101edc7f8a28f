"""Next-token training of the base model: `pretrain` (the tiny base from scratch) and `vanilla` (the
fine-tune control: the same data and token budget as the recursive phases, recursion off)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import KimiLinearForCausalLM, PreTrainedTokenizerBase

from rkl.config import RecursiveConfig
from rkl.data.packing import lm_batch


def validation_lines(config: RecursiveConfig, first: dict[str, float], last: dict[str, float]) -> list[str]:
    """What `rkl train` prints at the end of pretrain or vanilla: LMTask.validate's loss, named."""
    return [f"validation loss = next-token cross-entropy on held-out text (nats per token): {first['loss']:.4f} "
            f"(step {first['step']}) -> {last['loss']:.4f} (step {last['step']}); token accuracy "
            f"{first['token_accuracy']:.1%} -> {last['token_accuracy']:.1%}"]


class LMTask:
    def __init__(self, model: KimiLinearForCausalLM, tokenizer: PreTrainedTokenizerBase, config: RecursiveConfig,
                 train_stream: torch.Tensor, val_stream: torch.Tensor, device: torch.device,
                 shard: tuple[int, int] = (0, 1)):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.rank, self.world = shard  # this process's slice of every global batch (see rkl.train.loop)
        self.train_stream, self.val_stream, self.device = train_stream, val_stream, device

    def trainable_groups(self) -> dict[str, tuple[list[torch.nn.Parameter], float]]:
        return {"base": (list(self.model.parameters()), self.config.lr)}

    def train_mode(self, training: bool) -> None:
        self.model.train(training)

    def _batch_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = batch.to(self.device)
        logits = self.model(input_ids=batch[:, :-1], use_cache=False).logits
        labels = batch[:, 1:]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        correct = (logits.argmax(-1) == labels).float().mean()
        return loss, correct

    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        b = c.batch_size
        batch = lm_batch(self.train_stream, step * c.grad_accum + micro, b * self.world, c.seq_len, c.seed)
        batch = batch[self.rank * b:(self.rank + 1) * b]
        loss, _ = self._batch_loss(batch)
        loss_value = float(loss.detach())
        return loss, {"loss": loss_value, "loss_lm": loss_value, "tokens": float(batch[:, :-1].numel())}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean next-token CE and accuracy over fixed held-out batches (the same batches at every call)."""
        c = self.config
        losses, accs = [], []
        for i in range(c.eval_batches):
            # the global batch, on every process: the curve does not depend on how many processes there are
            batch = lm_batch(self.val_stream, i, c.batch_size * self.world, c.seq_len, c.seed + 10_007)
            loss, acc = self._batch_loss(batch)
            losses.append(float(loss))
            accs.append(float(acc))
        return {"loss": sum(losses) / len(losses), "token_accuracy": sum(accs) / len(accs)}

    def run_facts(self) -> dict:
        return {}

    def save_sharded(self, folder: Path | None) -> None:
        pass  # nothing is sharded: FSDP is refused for these phases (rkl.train.sharding)

    def save_weights(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
