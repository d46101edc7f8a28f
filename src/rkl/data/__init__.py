"""Data: offline corpora with fixed splits, generated arithmetic, the BPE tokenizer, LM and chunk batches."""

from rkl.data.arithmetic import Problem, arithmetic_problems
from rkl.data.chunks import ChunkBatch, chunk_batch, chunk_modes, corruption_mask, scheduled_value
from rkl.data.corpora import describe_source, load_documents, split_of, stdlib_files
from rkl.data.packing import encode_documents, lm_batch
from rkl.data.tokenizer import SPECIAL_TOKENS, train_tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "ChunkBatch",
    "Problem",
    "arithmetic_problems",
    "chunk_batch",
    "chunk_modes",
    "corruption_mask",
    "describe_source",
    "encode_documents",
    "lm_batch",
    "load_documents",
    "scheduled_value",
    "split_of",
    "stdlib_files",
    "train_tokenizer",
]
