"""The run config: YAML + dotted overrides, strict validation, errors that name the key and the file."""

import json
from pathlib import Path

import pytest

from engine.config import (
    ConfigError,
    config_to_dict,
    describe_options,
    load_config,
    load_ds_config,
    resolve_ds_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = load_config()
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_yaml_then_overrides_with_sources(tmp_path):
    path = write(
        tmp_path,
        "train:\n  lr: 1e-4\ndata:\n  shards: /data/shard-{000000..000099}.tar\n  val_shards: /v.tar\n",
    )
    cfg = load_config(path, ["train.lr=3e-5", "data.views=front,right", "model.num_views=2"])
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.data.shards == "/data/shard-{000000..000099}.tar"  # braces survive, not parsed as YAML
    assert cfg.data.views == ["front", "right"]
    assert cfg.source_of("data.shards") == str(path)
    assert cfg.source_of("train.lr") == "command line"
    assert cfg.source_of("train.grad_clip") == "default"


def test_override_value_types():
    cfg = load_config(
        None, ["train.adam_betas=[0.8, 0.95]", "model.gradient_checkpointing=true", "run.max_steps=7"]
    )
    assert cfg.train.adam_betas == [0.8, 0.95]
    assert cfg.model.gradient_checkpointing is True
    assert cfg.run.max_steps == 7 and isinstance(cfg.run.max_steps, int)


def test_every_shipped_yaml_loads():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files, "configs/ ships no YAML"
    for path in files:
        load_config(path)


def test_help_lists_every_option_with_default():
    text = describe_options()
    for key in ("train.lr = 0.0001", "data.shards", "model.num_views = 6", "logging.wandb_entity"):
        assert key in text


# Each case: (yaml text or None, overrides, words the error must contain).
BAD_RUN_CONFIGS = {
    "unknown_key": (None, ["train.lrr=1"], ["train.lrr", "did you mean 'lr'"]),
    "unknown_section": ("trian:\n  lr: 1\n", [], ["trian", "run.yaml"]),
    "wrong_type_str_for_float": (None, ["train.lr=fast"], ["train.lr", "expected float"]),
    "wrong_type_in_yaml": ("run:\n  max_steps: many\n", [], ["run.max_steps", "run.yaml"]),
    "float_for_int": (None, ["train.micro_batch_size=1.5"], ["train.micro_batch_size", "integer"]),
    "bool_for_int": ("train:\n  grad_accum: true\n", [], ["train.grad_accum", "run.yaml"]),
    "not_a_choice": (None, ["train.precision=fp8"], ["train.precision", "'bf16'"]),
    "out_of_range": (None, ["train.drop_both=1.5"], ["train.drop_both", "out of range"]),
    "negative_lr": ("train:\n  lr: -0.1\n", [], ["train.lr", "run.yaml", "out of range"]),
    "views_vs_num_views": ("data:\n  views: [front, right]\n", [], ["model.num_views", "run.yaml"]),
    "unknown_view": (None, ["data.views=front,top", "model.num_views=2"], ["data.views", "top"]),
    "mix_mode_with_cross_domain": (
        None,
        ["data.mode=mix", "model.cd_attention_mid=true"],
        ["data.mode", "mix"],
    ),
    "resolution_not_multiple_of_8": (None, ["data.resolution=100"], ["data.resolution", "multiple of 8"]),
    "dropout_sum_over_one": (
        None,
        ["train.drop_image_embed=0.5", "train.drop_cond_latent=0.4", "train.drop_both=0.2"],
        ["train.drop_both", "> 1"],
    ),
    "bad_yaml": ("train: [lr: 1\n", [], ["run.yaml", "invalid YAML"]),
    "top_level_not_mapping": ("- 1\n- 2\n", [], ["run.yaml", "mapping"]),
    "section_not_mapping": ("train: 5\n", [], ["train", "run.yaml", "mapping"]),
    "override_without_equals": (None, ["train.lr"], ["train.lr", "section.key=value"]),
    "list_item_type": (None, ["train.adam_betas=[0.9, high]"], ["train.adam_betas", "float"]),
    "bad_lr_multiplier": (
        None,
        ["train.lr_multipliers=[class_embedding.*]"],
        ["train.lr_multipliers", "pattern=factor"],
    ),
    "no_held_out_objects": (
        None,
        ["data.shards=/d/shard-{0..9}.tar"],
        ["data.val_shards", "validation split"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_RUN_CONFIGS))
def test_bad_run_config_names_key_and_file(tmp_path, case):
    text, overrides, words = BAD_RUN_CONFIGS[case]
    path = write(tmp_path, text) if text is not None else None
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    for word in words:
        assert word in str(err.value), f"{word!r} missing from: {err.value}"


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def _ds(tmp_path: Path, patch: dict) -> Path:
    data = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    data.update(patch)
    return write(tmp_path, json.dumps(data), "ds.json")


def _resolve(path: Path, overrides=(), world_size: int = 1, cuda: bool = False) -> dict:
    cfg = load_config(None, list(overrides))
    return resolve_ds_config(load_ds_config(path), cfg, world_size=world_size, source=str(path), cuda=cuda)


def test_ds_auto_fields_are_filled(tmp_path):
    ds = _resolve(
        _ds(tmp_path, {}), ["train.micro_batch_size=3", "train.grad_accum=2", "train.precision=bf16"], 4
    )
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 2)
    assert ds["train_batch_size"] == 24
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 1.0


BAD_DS_CONFIGS = {
    "inconsistent_batch": ({"train_batch_size": 10}, ["train_batch_size", "train.grad_accum", "ds.json"]),
    "micro_batch_contradicts": ({"train_micro_batch_size_per_gpu": 5}, ["train_micro_batch_size_per_gpu"]),
    "typo_top_level": ({"zero_optimisation": {"stage": 2}}, ["zero_optimisation", "did you mean"]),
    "typo_in_zero_section": ({"zero_optimization": {"stage": 2, "overlap_com": True}}, ["overlap_com"]),
    "bad_stage_type": ({"zero_optimization": {"stage": "two"}}, ["zero_optimization.stage", "ds.json"]),
    "precision_contradicts": ({"bf16": {"enabled": True}}, ["bf16.enabled", "train.precision"]),
    "auto_where_unsupported": ({"steps_per_print": "auto"}, ["steps_per_print", '"auto"']),
}


@pytest.mark.parametrize("case", sorted(BAD_DS_CONFIGS))
def test_bad_ds_config_names_key_and_file(tmp_path, case):
    patch, words = BAD_DS_CONFIGS[case]
    with pytest.raises(ConfigError) as err:
        _resolve(_ds(tmp_path, patch))
    for word in words:
        assert word in str(err.value), f"{word!r} missing from: {err.value}"


def test_ds_invalid_json_and_missing_file(tmp_path):
    bad = write(tmp_path, "{not json", "broken.json")
    with pytest.raises(ConfigError, match=r"broken\.json: invalid JSON"):
        load_ds_config(bad)
    with pytest.raises(ConfigError, match=r"absent\.json: DeepSpeed config not found"):
        load_ds_config(tmp_path / "absent.json")


def test_fp16_refused_without_cuda(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        _resolve(_ds(tmp_path, {}), ["train.precision=fp16"])
    assert _resolve(_ds(tmp_path, {}), ["train.precision=fp16"], cuda=True)["fp16"]["enabled"] is True


def test_zero3_is_refused_for_training_with_a_reason():
    from engine.config import check_trainable_stage

    path = REPO / "ds_configs" / "zero3.json"
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage: ZeRO-3"):
        check_trainable_stage(load_ds_config(path), source=str(path))
    check_trainable_stage(load_ds_config(REPO / "ds_configs" / "zero2.json"), source="zero2.json")


def test_resume_refuses_a_different_architecture():
    from engine.checkpoint import check_same_architecture

    saved = load_config(None, ["model.cd_attention_mid=false"])
    check_same_architecture(
        saved, load_config(None, ["model.cd_attention_mid=false", "train.lr=1"]), source="x"
    )
    with pytest.raises(ConfigError) as err:
        check_same_architecture(saved, load_config(), source="ckpt/run_config.yaml")
    assert "model.cd_attention_mid: checkpoint False, run config True" in str(err.value)
    assert "ckpt/run_config.yaml" in str(err.value)
