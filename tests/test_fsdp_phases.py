"""FSDP2 in phase C on 2 CPU processes (gloo, launched through `accelerate launch` with a CPU copy of fsdp2.yaml):
phase C trains the sidecar and LoRA adapters (replicated) and an unfrozen layer (sharded, its AdamW state too). It
trains what data parallel trains, to float tolerance, and resumes exactly; the two computations it adds across
shards (the L2 pull, the gradient clip) equal their whole-tensor versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rkl.model.base import load_base
from rkl.paths import project_root
from rkl.train.checkpoint import load_training_state
from test_data_parallel import SETTINGS, curve, rkl

@pytest.fixture(scope="module")
def surgery(tmp_path_factory):
    """Surgery on the tiny preset (random weights, a tokenizer trained on the data): where phase C starts."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "configs").symlink_to(project_root() / "configs")
    rkl(root, ["surgery", "--model", "tiny", "--out", "ck/surgery", *SETTINGS[:6]])  # the data fields alone
    return root


@pytest.fixture(scope="module")
def phase_c_runs(surgery, cpu_accelerate_config):
    """Phase C from the surgery above on 2 processes: data parallel, with FSDP2, and with FSDP2 stopped after step 2 and resumed.
    Phase C trains all three kinds of tensor: the sidecar and the LoRA adapters (replicated; fresh adapters, as no
    phase B ran) and the unfrozen layer (sharded, its AdamW state too)."""
    root, fsdp = surgery, cpu_accelerate_config("fsdp2")
    phase_c = ["train", "--phase", "c", "--model", "ck/surgery", "--steps", "3", "--batch-size", "2", *SETTINGS,
               "--set", "eval_interval=3", "--set", "save_interval=3", "--set", "drift_new_tokens=4"]
    rkl(root, phase_c + ["--out", "ck/c_ddp"], processes=2)
    rkl(root, phase_c + ["--out", "ck/c_fsdp"], accelerate_config=fsdp)
    rkl(root, phase_c + ["--out", "ck/c_fsdp_resumed", "--stop-at", "2"], accelerate_config=fsdp)
    stopped = json.loads((root / "ck/c_fsdp_resumed/run.json").read_text())["step"]
    rkl(root, phase_c + ["--out", "ck/c_fsdp_resumed", "--resume"], accelerate_config=fsdp)
    return root, stopped


TRAINED_FILES = ("sidecar.safetensors", "lora.safetensors", "unfrozen.safetensors")


def test_fsdp_phase_c_trains_what_data_parallel_trains_and_resumes_exactly(phase_c_runs):
    root, stopped = phase_c_runs
    meta = json.loads((root / "ck/c_fsdp/run.json").read_text())
    assert meta["fsdp"]["sharded_layers"] == 4 and meta["world_size"] == 2
    for name in TRAINED_FILES:
        ddp, fsdp = (load_file(str(root / f"ck/{run}/{name}")) for run in ("c_ddp", "c_fsdp"))
        assert ddp.keys() == fsdp.keys() and ddp, name
        # the same steps: the sharded gradient norm is summed in another order, so equal to float tolerance
        assert max(float((ddp[k] - fsdp[k]).abs().max()) for k in ddp) < 1e-6, name
    # and each kind trained: the sidecar moved from the surgery's, the adapters from zero, the unfrozen layer from
    # the pretrained (here: the preset's) weights
    sidecar, start = (load_file(str(root / f"ck/{run}/sidecar.safetensors")) for run in ("c_fsdp", "surgery"))
    assert any(not torch.equal(sidecar[k], start[k]) for k in sidecar)
    lora = load_file(str(root / "ck/c_fsdp/lora.safetensors"))
    assert all(bool(v.abs().sum() > 0) for k, v in lora.items() if "lora_B" in k)
    pretrained = dict(load_base("tiny", seed=0, device_map="cpu")[0].named_parameters())
    unfrozen = load_file(str(root / "ck/c_fsdp/unfrozen.safetensors"))
    unfrozen = {k.replace(".base_layer", ""): v for k, v in unfrozen.items()}
    assert len(unfrozen) >= 8 and unfrozen.keys() <= pretrained.keys(), sorted(unfrozen)
    assert all(not torch.equal(v, pretrained[k].detach()) for k, v in unfrozen.items())
    for tag in ("train/loss/total", "train/grad_norm", "val/loss", "val/ngram_drift_1"):
        a, b = curve(root, "c_ddp", tag), curve(root, "c_fsdp", tag)
        assert [s for s, _ in a] == [s for s, _ in b] and a, tag
        assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b)), (tag, a, b)
    # the optimizer state is saved whole, as a single-process run saves it (the sharded tensors' in part files)
    ddp_state, fsdp_state = (load_training_state(root / f"ck/{run}")["optimizer"] for run in ("c_ddp", "c_fsdp"))
    assert list((root / "ck/c_fsdp").glob("training_state.part-*.pt")), "the sharded state was not written in parts"
    for i, per_param in ddp_state["state"].items():
        assert per_param["exp_avg"].shape == fsdp_state["state"][i]["exp_avg"].shape
        assert torch.allclose(per_param["exp_avg_sq"], fsdp_state["state"][i]["exp_avg_sq"], rtol=1e-4, atol=1e-12)
    # and stopped after step 2 and resumed, it ends bitwise equal to the uninterrupted FSDP run (one test with the
    # above: pytest-xdist would build the runs again for a second test on the other worker)
    assert stopped == 2  # the resumed run did stop, with a checkpoint of step 2 to resume from
    for name in TRAINED_FILES:
        a, b = (load_file(str(root / f"ck/{run}/{name}")) for run in ("c_fsdp", "c_fsdp_resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


SHARDED_NUMERICS = """
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from rkl.model.adapters import l2_to_pretrained
from rkl.train.sharding import clip_gradients

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
g = torch.Generator().manual_seed(0)
start = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g)}  # 5 and 7 rows: uneven shards
reference = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in start.items()}
whole = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
sharded = {k: torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [Shard(0)])) for k, v in start.items()}
l2 = l2_to_pretrained(whole, reference)
l2_sharded = l2_to_pretrained(sharded, {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in reference.items()})
(3.0 * l2).backward()
(3.0 * l2_sharded).backward()
assert type(l2_sharded) is torch.Tensor and torch.allclose(l2_sharded, l2), (l2_sharded, l2)
for k in start:
    assert torch.allclose(sharded[k].grad.full_tensor(), whole[k].grad), k
# clipping over sharded and replicated gradients together, as phase C's groups are
replicated = torch.randn(4, generator=g) * 10
plain = [whole["a"], whole["b"], torch.nn.Parameter(torch.zeros(4))]
mixed = [sharded["a"], sharded["b"], torch.nn.Parameter(torch.zeros(4))]
plain[2].grad, mixed[2].grad = replicated.clone(), replicated.clone()
norm, norm_mixed = torch.nn.utils.clip_grad_norm_(plain, 1.0), clip_gradients(mixed, 1.0)
assert norm > 1.0 and torch.allclose(norm_mixed, norm), (norm_mixed, norm)
for p, q in zip(plain, mixed):
    assert torch.allclose(q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad, p.grad)
# a layer sharded as rkl shards the base (one unit per layer, none at the root) and run first without gradient, then
# with it, in one bf16 autocast region: as the prefix pass, draft walk and inner steps run. With autocast's weight-cast
# cache (rkl.train.loop.AUTOCAST turns it off) the sharded weights got no gradient.
from torch.distributed.fsdp import fully_shard

from rkl.config import RecursiveConfig
from rkl.train.loop import AUTOCAST, make_accelerator

assert make_accelerator(RecursiveConfig()).autocast_handler is AUTOCAST  # what training runs under

grads = []
for shard in (False, True):
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    if shard:
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=AUTOCAST.cache_enabled):
        with torch.no_grad():
            layers(x)
        layers(layers(x)).float().sum().backward()
    grads.append([p.grad for p in layers.parameters()])
for whole_grad, sharded_grad in zip(*grads):
    assert sharded_grad is not None, "a sharded weight got no gradient"
    assert torch.equal(sharded_grad.full_tensor(), whole_grad)
print("sharded numerics ok")
"""


def test_sharded_l2_pull_gradient_clip_and_autocast_gradients_equal_their_whole_tensor_versions(tmp_path):
    """The two computations phase C adds across shards, on 2 gloo processes against the whole-tensor results:
    l2_to_pretrained (value and gradient) and clip_gradients (norm and clipped gradients); and sharded layers' gradients
    under rkl's bf16 autocast, after a pass without gradient."""
    script = tmp_path / "sharded_numerics.py"
    script.write_text(SHARDED_NUMERICS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(project_root() / "src")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.count("sharded numerics ok") == 2, done.stdout + done.stderr[-3000:]


SLOW_LOAD = """
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from rkl.train import sharding

dist.init_process_group("gloo", timeout=timedelta(seconds=2))  # a short timeout, as NCCL's 10 minutes are at 48B
barrier = sharding.load_barrier()
if dist.get_rank() == 0:
    time.sleep(5)  # reading the checkpoint outlasts the group's timeout
    model = torch.nn.Linear(3, 2)
    full = dict(model.state_dict())
else:
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    full = None
sharding.fill_from_first(model, full, torch.device("cpu"), barrier)
mine = [model.weight.detach().clone()]
first = [mine[0] if dist.get_rank() == 0 else None]
dist.broadcast_object_list(first, src=0)
assert torch.equal(mine[0], first[0])
dist.barrier()
print("slow load ok")
dist.destroy_process_group()  # an open gloo group can abort the interpreter's exit ("terminate called ...")
"""


def test_the_others_may_wait_longer_than_the_process_groups_timeout_while_the_first_reads(tmp_path):
    """Two gloo processes whose group times out after 2 s: the first takes 5 s to read its model, the second waits
    for it on a group of its own (LOAD_WAIT_TIMEOUT_S) and then receives the same weights; neither times out."""
    script = tmp_path / "slow_load.py"
    script.write_text(SLOW_LOAD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(project_root() / "src")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.count("slow load ok") == 2, done.stdout + done.stderr[-3000:]


SHARDED_INTERRUPT = """
import json, sys
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from rkl.config import RecursiveConfig
from rkl.train.loop import make_accelerator, train

out = Path(sys.argv[1])
config = RecursiveConfig(steps=6, save_interval=2, eval_interval=100, log_interval=1, warmup_steps=0)
accelerator = make_accelerator(config)  # gloo over the 2 processes torchrun started
mesh = init_device_mesh("cpu", (2,))
weight = torch.nn.Parameter(distribute_tensor(torch.ones(6, 2), mesh, [Shard(0)]))


class ShardedTask:  # one sharded tensor; Ctrl-C (on every process, as a terminal sends it) during the 4th step
    def trainable_groups(self):
        return {"unfrozen": ([weight], 0.1)}

    def train_mode(self, training):
        pass

    def loss(self, step, micro):
        if step == 3:
            raise KeyboardInterrupt
        return (weight.to_local() ** 2).sum(), {"tokens": 1.0}

    def validate(self):
        return {}

    def save_sharded(self, folder):
        whole = weight.full_tensor()
        if folder is not None:
            torch.save(whole, folder / "weight.pt")

    def save_weights(self, folder):
        pass

    def run_facts(self):
        return {}


result = train(ShardedTask(), config, out, Path(sys.argv[2]), {}, accelerator, show_progress=False)
if accelerator.is_main_process:
    print(json.dumps({"steps_done": result.steps_done, "interrupted": result.interrupted,
                      "checkpoint_step": result.checkpoint_step,
                      "saved_step": json.loads((out / "run.json").read_text())["step"]}))
"""


def test_an_interrupt_with_sharded_weights_keeps_the_last_periodic_checkpoint(tmp_path):
    """Ctrl-C where FSDP shards trained tensors: no checkpoint of the interrupted step (its gathers could pair up
    wrongly across processes), the periodic one stands, and the message names its step."""
    script = tmp_path / "sharded_interrupt.py"
    script.write_text(SHARDED_INTERRUPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(project_root() / "src")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(tmp_path / "run"), str(tmp_path / "logs")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == {"steps_done": 3, "interrupted": True, "checkpoint_step": 2, "saved_step": 2}, summary
    assert "no checkpoint is written on an interrupt" in done.stderr and "(step 2," in done.stderr, done.stderr[-2000:]


SHARDED_SAVE = """
import json, sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from rkl.train.checkpoint import TRAINING_STATE, StateParts, load_training_state
from rkl.train.sharding import full_optimizer_state

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
main = dist.get_rank() == 0
folder, part_bytes = Path(sys.argv[1]), int(sys.argv[2])
# 8 sharded tensors of 16 MiB: AdamW's two moments are 256 MiB whole
params = [torch.nn.Parameter(distribute_tensor(torch.zeros(1024, 4096), mesh, [Shard(0)])) for _ in range(8)]
optimizer = torch.optim.AdamW(params, lr=0.1)
for i, p in enumerate(params):
    p.grad = distribute_tensor(torch.full((1024, 4096), float(i + 1)), mesh, [Shard(0)])
optimizer.step()


def mib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024


if main:
    folder.mkdir()
    open("/proc/self/clear_refs", "w").write("5")  # the peak resident size starts again from the current one
before = mib("VmRSS")
state = full_optimizer_state(optimizer, main, StateParts(folder, part_bytes) if main else None)
if main:
    torch.save({"optimizer": state, "step": 1}, folder / TRAINING_STATE)
grown = mib("VmHWM") - before
del state
dist.barrier()
loaded = load_training_state(folder)["optimizer"]["state"]
for i, p in enumerate(params):
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(loaded[i][k], optimizer.state[p][k].full_tensor()), (i, k)
if main:
    print(json.dumps({"grown_mib": grown, "parts": len(list(folder.glob("training_state.part-*.pt")))}))
"""


def test_a_sharded_save_holds_one_part_of_the_optimizer_state_at_a_time(tmp_path):
    """The main process of a sharded run writes the gathered optimizer state out a part file at a time (at 48B,
    phase C's 88.7 GB of AdamW moments were held whole until one torch.save); loading puts the parts back exactly.
    The same save with one part of unbounded size is the control: it holds all 256 MiB."""
    script = tmp_path / "sharded_save.py"
    script.write_text(SHARDED_SAVE)
    # a fixed mmap threshold: glibc otherwise raises it as large blocks are freed, and then keeps freed 16 MiB
    # tensors in its heap, which the peak resident size counts (measured: 120-160 MiB instead of 49 for the parts)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(project_root() / "src"),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    runs = {}
    for name, part_bytes in (("parts", 32 * 2**20), ("whole", 2**40)):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                               str(tmp_path / name), str(part_bytes)], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["parts"]["parts"] == 8 and runs["whole"]["parts"] == 1, runs
    assert runs["whole"]["grown_mib"] > 240, runs  # the measurement sees a whole state
    assert runs["parts"]["grown_mib"] < 96, runs  # measured: 48.6 MiB with parts of 32 MiB, 272 MiB whole


SHARDED_LOAD = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from rkl.config import RecursiveConfig
from rkl.model import base as base_module, weights
from rkl.model.base import load_base
from rkl.model.surgery import find_base, load_model_with_config
from rkl.train import refine_phases, sharding

dist.init_process_group("gloo")
rank = dist.get_rank()
reads = []
if rank != 0:  # a receiving process must read no weight: every reader records the call and fails
    def refuse(*args, **kwargs):
        reads.append(args[:1])
        raise AssertionError("a receiving process read a weight file")
    base_module.KimiLinearForCausalLM.from_pretrained = refuse
    weights.load_file = refuse
source = Path(sys.argv[1])
config = RecursiveConfig.from_file(source / "recursive_config.json").replace(lora_rank=4, unfreeze_every=2)
mesh = sharding.device_mesh(2, torch.device("cpu")) if sys.argv[2] == "fsdp" else None
wrapper, _, pretrained, info = refine_phases.load_phase_models(str(source), config, None, find_base(source),
                                                               torch.device("cpu"), mesh, barrier=sharding.load_barrier())
whole = {k: sharding.full_tensor(v, True) for k, v in wrapper.state_dict().items()}  # collective: both shards
whole_pretrained = {k: sharding.full_tensor(v, True) for k, v in pretrained.state_dict().items()}
mine = [{k: v for k, v in wrapper.state_dict().items() if not sharding.is_sharded(v)}]  # the replicated tensors
first = [mine[0] if rank == 0 else None]
dist.broadcast_object_list(first, src=0)
assert all(torch.equal(mine[0][k], first[0][k]) for k in first[0]) and mine[0].keys() == first[0].keys()
if rank == 0:  # what the first process read, loaded again without sharding: the gathered shards hold exactly it
    plain, _, _ = load_model_with_config(str(source), config=config)
    expected = plain.state_dict()
    got = {k.replace(".base_layer", ""): v for k, v in whole.items() if "lora_" not in k}  # LoRA wraps a layer
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items()), "base differs"
    fresh, _ = load_base(find_base(source)["base"])
    assert all(torch.equal(whole_pretrained[k], v) for k, v in fresh.state_dict().items()), "pretrained differs"
    assert any(".lora_A." in k for k in whole)
    assert any(sharding.is_sharded(p) for p in pretrained.parameters()) == (mesh is not None)
for turn in range(2):  # one at a time: two processes writing to one pipe can interleave within a line
    if turn == rank:
        print("sharded load ok", rank, len(reads), flush=True)
    dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.parametrize("parallel", ["fsdp", "data_parallel"])
def test_only_the_first_process_reads_the_checkpoint(tiny_stages, tmp_path, parallel):
    """Phase C's models on 2 gloo processes, with FSDP and with data parallel: the second process reads no weight
    file (its readers fail if called) and builds the structure on the meta device; afterwards every replicated
    tensor equals the first process's, and the whole model (sharded layers gathered) equals the checkpoint loaded
    whole, the pretrained copy too. Broken on purpose (no broadcast: the second process keeps uninitialised
    tensors; or every process reading), this fails."""
    script = tmp_path / "sharded_load.py"
    script.write_text(SHARDED_LOAD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(project_root() / "src")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(tiny_stages / "phase_a"), parallel],
                          env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, out
    assert "sharded load ok 0 0" in done.stdout and "sharded load ok 1 0" in done.stdout, out


def test_a_skeleton_has_the_dtypes_the_first_process_loads(tiny_stages, tmp_path):
    """The receiving processes' meta-device model takes the dtype from_pretrained's "auto" gives: the config's, else
    (a config.json without one) the weights' (bf16 here, where a plain build would be float32); a preset skeleton is
    on the meta device also on a host without a GPU."""
    from rkl.model.base import load_base

    real, _ = load_base(tiny_stages / "baseline")
    real.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(config))
    loaded, _ = load_base(tmp_path / "bf16")
    skeleton, _ = load_base(tmp_path / "bf16", device_map="meta")
    assert {p.dtype for p in loaded.parameters()} == {p.dtype for p in skeleton.parameters()} == {torch.bfloat16}
    assert all(p.is_meta for p in skeleton.parameters())
    preset, _ = load_base("tiny", device_map="meta")
    assert all(p.is_meta for p in preset.parameters())
