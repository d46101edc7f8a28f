"""rkl.model.weights.SafetensorsStream: a safetensors file written a tensor at a time (FSDP's unfrozen layers)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rkl.model.weights import SafetensorsStream


def test_a_streamed_file_is_the_safetensors_file_of_its_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"layers.1.w": torch.randn(3, 5, generator=g), "layers.0.bf": torch.randn(7, generator=g).bfloat16(),
               "steps": torch.arange(4), "half": torch.randn(2, 2, generator=g).half(), "empty": torch.zeros(0, 3),
               "mask": torch.tensor([True, False, True])}
    stream = SafetensorsStream(tmp_path / "x.safetensors", {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()})
    for name in stream.tensors:
        stream.write(name, tensors[name])
    stream.close()
    back = load_file(str(tmp_path / "x.safetensors"))  # safetensors checks the header, offsets and size
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


def test_a_stream_refuses_a_tensor_out_of_order_or_missing(tmp_path):
    specs = {"a": ((2,), torch.float32), "b": ((3,), torch.float32)}
    stream = SafetensorsStream(tmp_path / "x.safetensors", specs)
    with pytest.raises(ValueError, match="expected a"):
        stream.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match=r"expected a \(2,\)"):
        stream.write("a", torch.zeros(3))
    stream.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 of 2 tensors written"):
        stream.close()
