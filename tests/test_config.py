"""RecursiveConfig: round-trip, every validation error names its key, stage files differ where they must."""

import json
from pathlib import Path

import pytest

from rkl import ConfigError, RecursiveConfig
from rkl.config import READERS, inheritance_chain, unused_fields
from rkl.paths import STAGE_CONFIGS, stage_config_path


def test_round_trip_dict_and_file(tmp_path):
    config = RecursiveConfig(chunk_width=12, layers_to_refine=[0, 2], corruption_mask="span", seed=7)
    assert RecursiveConfig.from_dict(config.to_dict()) == config
    config.save(tmp_path / "c.json")
    assert RecursiveConfig.from_file(tmp_path / "c.json") == config
    assert RecursiveConfig.from_file(tmp_path / "c.json") != RecursiveConfig()


def test_defaults_validate_clean():
    assert RecursiveConfig().validate() == []


@pytest.mark.parametrize("data, key", [
    ({"chunk_wdith": 8}, "chunk_wdith"),                      # unknown key
    ({"chunk_width": "8"}, "chunk_width"),                    # wrong type
    ({"chunk_width": 8.0}, "chunk_width"),                    # float for an int
    ({"recursive_enabled": 1}, "recursive_enabled"),          # int for a bool
    ({"chunk_width": 0}, "chunk_width"),                      # below range
    ({"commit_threshold": 1.5}, "commit_threshold"),          # above range
    ({"cache_reset_policy": "keep"}, "cache_reset_policy"),   # not a choice
    ({"layers_to_refine": [0, "1"]}, "layers_to_refine"),     # bad list item
    ({"layers_to_refine": [1, 1]}, "layers_to_refine"),       # duplicate
    ({"min_commit_threshold": 0.95}, "min_commit_threshold"),  # cross-field
    ({"draft_share": 1.5}, "draft_share"),                   # above range
    ({"lambda_halt": float("nan")}, "lambda_halt"),           # not finite
    ({"draft_walk_steps": 4, "lora_rank": 8}, "draft_walk_steps"),      # drafts ahead of a base that trains
    ({"draft_walk_steps": 4, "unfreeze_every": 4}, "draft_walk_steps"),
])
def test_each_error_names_its_key(data, key):
    with pytest.raises(ConfigError, match=key):
        RecursiveConfig.from_dict(data)


def test_validate_returns_every_problem():
    config = RecursiveConfig()
    config.chunk_width = -1
    config.corruption_rate = 2.0
    problems = config.validate()
    assert len(problems) == 2 and any("chunk_width" in p for p in problems)


def test_int_accepted_for_float_and_comment_keys_ignored():
    config = RecursiveConfig.from_dict({"lr": 1, "_comment": "note"})
    assert config.lr == 1.0 and isinstance(config.lr, float)


def test_overrides_parse_json_values():
    config = RecursiveConfig().with_overrides(["chunk_width=4", "layers_to_refine=[0,1]", "data=stdlib",
                                               "use_latent_token=true"])
    assert (config.chunk_width, config.layers_to_refine, config.data, config.use_latent_token) == (4, [0, 1], "stdlib", True)
    with pytest.raises(ConfigError, match="nope"):
        RecursiveConfig().with_overrides(["nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        RecursiveConfig().with_overrides(["chunk_width"])


def test_bad_json_file_is_a_config_error(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RecursiveConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not found"):
        RecursiveConfig.from_file(tmp_path / "missing.json")


def test_stage_files_load_and_phases_differ_as_the_spec_says():
    configs = {stage: RecursiveConfig.from_file(stage_config_path(stage)) for stage in STAGE_CONFIGS}
    assert not configs["baseline"].recursive_enabled and configs["after_surgery"].recursive_enabled
    a, b, c = configs["phase_a"], configs["phase_b"], configs["phase_c"]
    assert (a.lr_refine, a.lr_boundary, a.lr_latent) == (3e-4, 5e-4, 3e-4)
    assert a.lora_rank == 0 and a.unfreeze_every == 0 and a.draft_share > 0  # drafts from phase A on
    assert 8 <= b.lora_rank <= 16 and b.lr_lora == 1e-5 and b.draft_schedule != "none"
    assert b.draft_share_final > b.draft_share and b.unfreeze_every == 0
    # the sidecar's shape is surgery's: every phase config must build the same cells
    assert {cfg.refine_cell_type for cfg in (configs["after_surgery"], a, b, c)} == {a.refine_cell_type}
    assert c.unfreeze_every == 4 and c.l2_to_pretrained > 0
    # the vanilla control sees the same token budget as phase A (phase A's prefix length is uniform in a range)
    from rkl.train.refine_phases import prefix_range

    v = configs["finetuned_vanilla"]
    lo, hi = prefix_range(a)
    assert v.steps * v.batch_size * v.seq_len == a.steps * a.batch_size * ((lo + hi) / 2 + a.chunk_width)


def test_field_docs_cover_every_field():
    rows = RecursiveConfig.field_docs()
    assert {r[0] for r in rows} == set(RecursiveConfig().to_dict())
    assert all(r[3] for r in rows)
    json.dumps([r[:3] for r in rows], default=str)


def test_configs_written_before_the_commit_rule_still_load():
    """recursive_config.json files saved before the length head was removed keep loading: renamed keys map to
    their new names, keys of removed features are dropped."""
    old = {"chunk_width": 8, "max_chunk_len": 32, "enable_length_head": True, "lambda_len": 0.1,
           "lambda_stability": 0.02, "scheduled_sampling": "linear", "scheduled_sampling_final": 0.5}
    cfg = RecursiveConfig.from_dict(old)
    assert (cfg.lambda_keep, cfg.draft_schedule, cfg.draft_share_final) == (0.02, "linear", 0.5)
    assert cfg.draft_share == 0.0  # scheduled sampling started at probability 0
    assert "max_chunk_len" not in cfg.to_dict()


# ------------------------------------------------------------------------------ stage files that inherit
def test_stage_files_resolve_to_what_the_full_files_gave():
    """The stage files became minimal (each inherits the one before it); resolved, each gives exactly the config the
    full 26-field files of commit 4341c70 gave (captured then into tests/data/stage_configs_4341c70.json)."""
    snapshot = json.loads((Path(__file__).parent / "data" / "stage_configs_4341c70.json").read_text())
    assert set(snapshot) == set(STAGE_CONFIGS)
    defaults = RecursiveConfig().to_dict()
    for stage, expected in snapshot.items():
        got = RecursiveConfig.from_file(stage_config_path(stage)).to_dict()
        added = set(got) - set(expected)  # fields added since (drift_new_tokens, ...): no stage file sets them
        assert added <= {"drift_new_tokens", "lora_experts", "draft_walk_steps", "draft_walk_graph",
                         "chunk_pass_graph"}, (stage, added)
        assert all(got[k] == defaults[k] for k in added), (stage, added)
        got = {k: got[k] for k in expected}
        assert got == expected, (stage, {k: (expected[k], got[k]) for k in expected if expected[k] != got[k]})


def test_stage_files_hold_only_what_their_stage_changes():
    """Every key of a stage file changes the config it inherits (or the defaults), except the learning rates of
    what the stage trains, which each file states; the phases inherit one another in order."""
    for stage in STAGE_CONFIGS:
        chain = inheritance_chain(stage_config_path(stage))
        own = {k: v for k, v in chain[-1][1].items() if not k.startswith("_")}
        parent = RecursiveConfig.from_file(chain[-2][0]) if len(chain) > 1 else RecursiveConfig()
        repeated = [k for k, v in own.items() if v == getattr(parent, k) and not k.startswith("lr")]
        assert not repeated, f"{chain[-1][0].name} repeats {repeated} from what it inherits"
    names = [p.name for p, _ in inheritance_chain(stage_config_path("phase_c"))]
    assert names == ["baseline.json", "after_surgery.json", "recursive_phase_a.json", "recursive_phase_b.json",
                     "recursive_phase_c.json"]
    phase_b = inheritance_chain(stage_config_path("phase_b"))[-1][1]
    assert {k for k in phase_b if not k.startswith("_")} == {"lora_rank", "lr_lora", "draft_schedule",
                                                              "draft_share_final"}


def test_inheritance_overrides_in_order_and_names_the_file_at_fault(tmp_path):
    (tmp_path / "parent.json").write_text('{"chunk_width": 4, "d_state": 8, "_comment": "x"}')
    (tmp_path / "child.json").write_text('{"inherits": "parent.json", "chunk_width": 6}')
    child = RecursiveConfig.from_file(tmp_path / "child.json")
    assert (child.chunk_width, child.d_state) == (6, 8)
    # a config of one's own builds on a stage file by its bare name (found under configs/)
    (tmp_path / "mine.json").write_text('{"inherits": "recursive_phase_b.json", "lora_rank": 16}')
    mine = RecursiveConfig.from_file(tmp_path / "mine.json")
    assert mine == RecursiveConfig.from_file(stage_config_path("phase_b")).replace(lora_rank=16)
    (tmp_path / "parent.json").write_text('{"lora_rnak": 4}')
    with pytest.raises(ConfigError, match=r"parent\.json: unknown config key\(s\): lora_rnak \(did you mean lora_rank"):
        RecursiveConfig.from_file(tmp_path / "child.json")
    # cross-field rules apply to the merged values, and the error names the file that was asked for
    (tmp_path / "parent.json").write_text('{"commit_threshold": 0.6}')
    (tmp_path / "child.json").write_text('{"inherits": "parent.json", "min_commit_threshold": 0.7}')
    with pytest.raises(ConfigError, match=r"child\.json: min_commit_threshold: must be <= commit_threshold"):
        RecursiveConfig.from_file(tmp_path / "child.json")
    (tmp_path / "parent.json").write_text('{"inherits": "child.json"}')
    with pytest.raises(ConfigError, match=r"makes a cycle \(child\.json -> parent\.json -> child\.json\)"):
        RecursiveConfig.from_file(tmp_path / "child.json")
    (tmp_path / "child.json").write_text('{"inherits": "gone.json"}')
    with pytest.raises(ConfigError, match="gone.json not found"):
        RecursiveConfig.from_file(tmp_path / "child.json")
    with pytest.raises(ConfigError, match="read only in a config file"):
        RecursiveConfig().with_overrides(["inherits=parent.json"])


def test_every_field_says_who_reads_it_and_unused_sets_are_refused():
    readers = {name: read_by for name, _, _, _, read_by in RecursiveConfig.field_docs()}
    assert all(readers.values()) and set().union(*readers.values()) <= set(READERS)
    assert readers["lr"] == ("pretrain", "vanilla") and "a" not in readers["lr"]
    assert unused_fields(["lr"], "a") == ["lr is not used by phase a; its learning rates are lr_refine, lr_boundary, "
                                          "lr_latent (and lr_lora, lr_unfrozen)"]
    assert unused_fields(["chunk_width", "seq_len"], "pretrain") == [
        "chunk_width is not used by phase pretrain; it is read by train a, b, c; eval"]
    assert unused_fields(["steps"], "eval") == ["steps is not used by rkl eval; it is read by train pretrain, "
                                                "vanilla, a, b, c"]
    assert unused_fields(["lambda_keep"], "surgery") and not unused_fields(["edit_margin", "d_state"], "surgery")
    # a recursive phase's checkpoint carries its config to `rkl eval`: a generation field set at training counts
    assert readers["commit_threshold"] == ("eval",) and not unused_fields(["commit_threshold"], "a")
    assert not unused_fields(["lora_rnak"], "b")  # unknown keys are left to the did-you-mean of known_fields
