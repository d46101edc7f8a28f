"""Surgery checkpoints and load_model_with_config: what is written, what loads back, what fails clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rkl import RecursiveConfig, UserError, load_model_with_config, run_surgery
from rkl.model.base import load_base
from rkl.model.surgery import base_fingerprint, save_sidecar, surgery


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny preset saved as a checkpoint folder (what `rkl train --phase pretrain` would leave)."""
    path = tmp_path_factory.mktemp("base") / "tiny_base"
    base, _ = load_base("tiny")
    base.save_pretrained(path)
    return path


def test_surgery_on_a_preset_writes_the_sidecar_and_a_tokenizer(tmp_path):
    """A preset has random weights and no tokenizer (the 48B architecture for smoke tests): surgery trains one on the
    config's data so that eval and phase A run on the folder; the base weights are never written."""
    cfg = RecursiveConfig(use_latent_token=True, layers_to_refine=[0, 2], max_chars_per_source=20_000)
    info = run_surgery("tiny", cfg, tmp_path / "after_surgery")
    out = tmp_path / "after_surgery"
    names = {p.name for p in out.iterdir()}
    assert {"recursive_config.json", "sidecar.safetensors", "surgery.json", "tokenizer.json"} <= names
    assert [n for n in names if n.endswith(".safetensors")] == ["sidecar.safetensors"]  # no base weights
    wrapper, tokenizer, _ = load_model_with_config(out)
    assert tokenizer is not None and len(tokenizer) <= wrapper.base.config.vocab_size
    assert not list(tmp_path.glob("*.tmp-*"))
    meta = json.loads((out / "surgery.json").read_text())
    assert meta["base"] == "preset:tiny" and len(meta["base_sha256"]) == 64
    assert info["sidecar_params"] == meta["sidecar_params"] > 0
    state = load_file(str(out / "sidecar.safetensors"))
    assert sum(v.numel() for v in state.values()) == meta["sidecar_params"]
    assert sum(v.numel() * v.element_size() for v in state.values()) == meta["sidecar_bytes"] == info["sidecar_bytes"]
    assert {k.split(".")[0] for k in state} == {"refine_cells", "boundary", "latent_token"}
    assert {k.split(".")[1] for k in state if k.startswith("refine_cells")} == {"0", "2"}

    wrapper, tok, loaded_cfg = load_model_with_config(out)
    assert tok is not None and loaded_cfg == cfg
    assert wrapper.num_sidecar_params() == meta["sidecar_params"]
    for k, v in wrapper.sidecar_state_dict().items():
        assert torch.equal(v, state[k]), k
    # after surgery == baseline: the loaded model's logits equal the plain preset's
    base, _ = load_base("tiny")
    ids = torch.randint(3, 384, (2, 6))
    with torch.no_grad():
        assert torch.equal(wrapper(input_ids=ids).logits, base(input_ids=ids).logits)


def test_surgery_is_reproducible_and_replaces_atomically(tmp_path):
    cfg = RecursiveConfig()
    surgery("tiny", cfg, tmp_path / "s")  # (rkl surgery's tokenizer for a preset is tested above)
    first = load_file(str(tmp_path / "s" / "sidecar.safetensors"))
    surgery("tiny", cfg, tmp_path / "s")  # over an existing folder
    second = load_file(str(tmp_path / "s" / "sidecar.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_surgery_on_a_checkpoint_folder_references_it(tmp_path, base_dir):
    out = tmp_path / "surg"
    info = surgery(base_dir, RecursiveConfig(), out)
    assert info["base"] == str(base_dir.resolve())
    assert info["base_sha256"] == base_fingerprint(base_dir)[1]
    assert not list(out.glob("model*.safetensors"))  # never a copy of the base weights
    wrapper, _, cfg = load_model_with_config(out, recursive_enabled=False)
    assert not wrapper.enabled and cfg.recursive_enabled is False
    wrapper, _, cfg = load_model_with_config(out)
    assert wrapper.enabled

    moved = base_dir.with_name("moved_away")
    shutil.move(base_dir, moved)
    try:
        with pytest.raises(UserError, match=r"surgery checkpoint .* references base .*tiny_base, which does not exist"):
            load_model_with_config(out)
    finally:
        shutil.move(moved, base_dir)


def test_config_resolution_order(tmp_path):
    out = tmp_path / "s"
    surgery("tiny", RecursiveConfig(d_state=8), out)
    assert load_model_with_config(out)[2].d_state == 8  # the folder's recursive_config.json
    path = tmp_path / "other.json"
    RecursiveConfig(d_state=8, chunk_width=4).save(path)
    assert load_model_with_config(out, config_path=path)[2].chunk_width == 4  # config_path beats the folder
    explicit = RecursiveConfig(d_state=8, chunk_width=2)
    assert load_model_with_config(out, config=explicit, config_path=path)[2].chunk_width == 2  # explicit wins
    assert load_model_with_config("tiny")[2] == RecursiveConfig()  # nothing given: the defaults
    assert load_model_with_config("tiny", recursive_enabled=False)[0].refine_cells is None
    with pytest.raises(UserError, match=r"d_state: the sidecar in .* was built with 8, the config asks for 16"):
        load_model_with_config(out, config=RecursiveConfig(d_state=16))


def test_save_sidecar_into_a_checkpoint_folder_loads_back(tmp_path, base_dir):
    wrapper, _, _ = load_model_with_config(base_dir, config=RecursiveConfig(max_inner_steps=2))
    with torch.no_grad():
        wrapper.boundary.commit.bias.fill_(1.5)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base_dir, ckpt)
    save_sidecar(wrapper, ckpt)
    again, _, cfg = load_model_with_config(ckpt)
    assert cfg.max_inner_steps == 2
    assert torch.equal(again.boundary.commit.bias, torch.full((1,), 1.5))


def test_bad_inputs_fail_with_one_clear_error(tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="'llama' model; rkl needs a Kimi-Linear checkpoint"):
        load_model_with_config(llama)
    with pytest.raises(UserError, match="Kimi-Linear"):
        run_surgery(str(llama), RecursiveConfig(), tmp_path / "x")
    with pytest.raises(UserError, match=r"layer 9.*4 decoder layers"):
        run_surgery("tiny", RecursiveConfig(layers_to_refine=[9]), tmp_path / "y")
    with pytest.raises(UserError, match="neither a checkpoint folder nor a preset"):
        load_model_with_config(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="recursive_enabled"):
        run_surgery("tiny", RecursiveConfig(recursive_enabled=False), tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    bad = tmp_path / "bad_surgery"
    run_surgery("tiny", RecursiveConfig(), bad)
    (bad / "surgery.json").write_text(json.dumps({"base": "preset:gone"}))
    with pytest.raises(UserError, match="references base preset 'gone', which does not exist"):
        load_model_with_config(bad)


def test_a_moved_tree_still_loads(tmp_path, monkeypatch):
    """checkpoints/ copied elsewhere (base, surgery and phase folders together) loads from its new place: every folder
    records its base relative to itself too. A folder moved alone falls back to the absolute path, and of two bases
    found the one with the recorded fingerprint is taken."""
    from typer.testing import CliRunner

    from rkl.cli import app
    from rkl.model.surgery import find_base
    from rkl.paths import project_root

    runner = CliRunner()
    monkeypatch.chdir(tmp_path)  # logs/ of the runs land here
    (tmp_path / "configs").symlink_to(project_root() / "configs")
    data = ["--set", "data=arithmetic", "--set", "max_chars_per_source=5000", "--set", "arithmetic_digits=2"]
    run = ["--steps", "1", "--batch-size", "2", "--set", "seq_len=16", "--set", "eval_batches=1", *data]
    old = tmp_path / "old" / "checkpoints"
    for args in (["train", "--phase", "pretrain", "--model", "tiny", *run, "--out", f"{old}/baseline"],
                 ["surgery", "--model", f"{old}/baseline", "--out", f"{old}/after_surgery", *data],
                 ["train", "--phase", "a", "--model", f"{old}/after_surgery", *run, "--out", f"{old}/phase_a"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    for stage in ("after_surgery", "phase_a"):
        assert json.loads((old / stage / "surgery.json").read_text())["base_relative"] == "../baseline"
    ids = torch.tensor([[2, 5, 7, 9, 11, 4]])
    with torch.no_grad():
        before = load_model_with_config(old / "phase_a")[0](input_ids=ids).logits

    new = tmp_path / "new" / "checkpoints"
    shutil.move(tmp_path / "old", tmp_path / "new")  # the whole tree: the old absolute paths are gone
    with torch.no_grad():
        assert torch.equal(load_model_with_config(new / "phase_a")[0](input_ids=ids).logits, before)
    result = runner.invoke(app, ["train", "--phase", "b", "--model", f"{new}/phase_a", *run, "--out", f"{new}/phase_b"])
    assert result.exit_code == 0, result.output
    info = json.loads((new / "phase_b" / "surgery.json").read_text())
    assert (info["base"], info["base_relative"]) == (str((new / "baseline").resolve()), "../baseline")

    alone = tmp_path / "elsewhere" / "deep" / "phase_b"
    shutil.move(new / "phase_b", alone)  # moved without its base: ../baseline is not there, the absolute path is
    assert find_base(alone)["base"] == str((new / "baseline").resolve())
    decoy = alone.parent / "baseline"  # now ../baseline exists but is another model (another fingerprint)
    shutil.copytree(new / "baseline", decoy)
    (decoy / "config.json").write_text(json.dumps({**json.loads((decoy / "config.json").read_text()), "decoy": 1}))
    assert find_base(alone)["base"] == str((new / "baseline").resolve())
    shutil.rmtree(new / "baseline")  # only the decoy is left: it loads, with a warning
    with pytest.warns(UserWarning, match="differs from the one"):
        assert find_base(alone)["base"] == str(decoy.resolve())
