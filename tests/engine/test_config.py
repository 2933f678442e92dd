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
    "rowwise_with_sparse": (
        "model:\n  rowwise_mv_attention: true\n  sparse_mv_attention: true\n",
        [],
        ["run.yaml", "model.rowwise_mv_attention", "model.sparse_mv_attention"],
    ),
    "rowwise_without_multiview": (
        None,
        ["model.rowwise_mv_attention=true", "model.multiview_attention=false"],
        ["model.rowwise_mv_attention", "command line", "needs model.multiview_attention=true"],
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


@pytest.mark.parametrize(("world_size", "accum"), [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_global_batch_size_derives_grad_accum_for_the_world_size(tmp_path, world_size, accum):
    """A user who changes the number of GPUs changes nothing else: the global batch stays 16."""
    overrides = ["train.global_batch_size=16", "train.micro_batch_size=2", "train.grad_accum=3"]  # overridden
    cfg = load_config(None, overrides)
    ds = resolve_ds_config(
        load_ds_config(_ds(tmp_path, {})), cfg, world_size=world_size, source="ds.json", cuda=False
    )
    assert cfg.train.grad_accum == ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == 16


def test_global_batch_size_the_world_does_not_divide_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        _resolve(_ds(tmp_path, {}), ["train.global_batch_size=6", "train.micro_batch_size=2"], 2)
    message = str(err.value)
    assert "train.global_batch_size" in message and "command line" in message and "= 4" in message, message
    assert "\n" not in message


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
    # Row-wise attention keeps the weights but changes what every attn1 computes: a resume must not flip it.
    with pytest.raises(ConfigError, match=r"model\.rowwise_mv_attention: checkpoint False, run config True"):
        check_same_architecture(
            load_config(), load_config(None, ["model.rowwise_mv_attention=true"]), source="x"
        )


def _manifest(tmp_path: Path, **fields) -> Path:
    """A converter manifest with no shards: all the views check reads."""
    path = tmp_path / "shards" / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": "gnn3d-shards/1", "shards": [], "skipped": [], **fields}
    path.write_text(json.dumps(record))
    return path


def test_views_the_shards_do_not_store_are_refused_in_one_line(tmp_path):
    manifest = _manifest(tmp_path, views=["front", "right", "back", "left"], cond_view="front")
    config = write(tmp_path, "data:\n  views: [front, front_left]\nmodel:\n  num_views: 2\n")
    load_config(config, [f"data.shards={manifest}", "data.views=front,back", "model.num_views=2"])
    with pytest.raises(ConfigError) as err:
        load_config(config, [f"data.shards={manifest}"])
    message = str(err.value)
    assert "\n" not in message
    for word in (str(config), "data.views", "['front_left']", str(manifest)):
        assert word in message, f"{word!r} missing from: {message}"


def test_shards_that_condition_on_another_view_are_refused(tmp_path):
    manifest = _manifest(tmp_path, views=["front", "back"], cond_view="back")
    with pytest.raises(ConfigError, match=r"data\.views: the data\.shards shards condition on 'back'"):
        load_config(None, [f"data.shards={manifest}", "data.views=front,back", "model.num_views=2"])


def test_a_manifest_without_views_holds_the_reference_six():
    from datapipes.manifest import manifest_views

    assert manifest_views({"format": "gnn3d-shards/1"}) == (
        ("front", "front_right", "right", "back", "left", "front_left"),
        "front",
    )


def test_data_views_select_exactly_those_views_through_the_run_loader(tmp_path):
    """The run config's data.views reaches the loader: a reorder gives the full batch's views, reindexed."""
    import torch

    from datapipes.convert import ConvertOptions, convert
    from datapipes.shards import build_train_loader
    from datapipes.synth.dataset import render_dataset
    from engine.train import _transform

    render_dataset(tmp_path / "src", 2, res=16, workers=1)
    convert(tmp_path / "src", tmp_path / "shards", ConvertOptions(samples_per_shard=1, val_fraction=0.0))
    views = ["front", "left", "back", "front_left", "right", "front_right"]
    overrides = [f"data.shards={tmp_path / 'shards'}", "data.resolution=16", "data.clip_size=16"]

    def first_batch(extra: list[str]) -> dict:
        cfg = load_config(None, overrides + extra)
        loader = build_train_loader(
            cfg.data.shards, batch_size=2, rank=0, world_size=1, seed=0, workers=0, max_epochs=1,
            transform=_transform(cfg, "white"), shuffle_shards=False, bad_sample="raise",
        )  # fmt: skip
        return next(iter(loader))

    full, chosen = first_batch([]), first_batch([f"data.views={','.join(views)}"])
    stored = load_config().data.views  # the default: every stored view, in stored order
    index = [stored.index(view) for view in views]
    for key in ("image_target", "normal_target", "camera_embed_image", "camera_embed_normal"):
        assert torch.equal(chosen[key], full[key][:, index]), f"{key} does not follow data.views={views}"


def test_rowwise_key_builds_a_unet_whose_attn1_is_rowwise():
    """model.rowwise_mv_attention in the run config reaches every attn1 processor of engine.build's UNet."""
    from engine.build import build_unet
    from modeling.attention import MultiViewAttnProcessor
    from modeling.blocks import MVTransformerBlock

    def attn1_processors(overrides: list[str]) -> list:
        unet = build_unet(load_config(None, overrides))
        return [m.attn1.processor for m in unet.modules() if isinstance(m, MVTransformerBlock)]

    rowwise = attn1_processors(["model.rowwise_mv_attention=true"])
    assert rowwise and all(isinstance(p, MultiViewAttnProcessor) and p.rowwise for p in rowwise)
    assert not any(p.rowwise for p in attn1_processors([]))
    assert load_config().model.rowwise_mv_attention is False  # dense stays the default
