"""TrainConfig: defaults, validation messages, YAML/JSON files and the generated CLI options.

Round trips go through real files and a real argparse parser; every bad value must name its field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from edtools.config import ConfigError, TrainConfig, read_config_file
from edtools.flags import add_arguments, from_args, to_args

REQUIRED = {"data_root": "data", "model": "model", "out": "out"}


def make(**values) -> TrainConfig:
    return TrainConfig.from_dict({**REQUIRED, **values})


def full_config() -> TrainConfig:
    """A config with every field away from its default, so round trips cannot pass by falling back."""
    return make(
        epochs=3,
        batch_size=2,
        resolution=256,
        lr=2.5e-6,
        optimizer="adamw",
        weight_decay=0.0,
        mixed_precision="bf16",
        seed=7,
        gradient_checkpointing=True,
        grad_accum=4,
        max_grad_norm=None,
        lr_scheduler="cosine",
        lr_warmup_steps=10,
        train_text_encoder=False,
        train_text_encoder_2=False,
        model_config="configs/sd15",
        preset="sd15-full-t4",
        lora_rank=8,
        lora_alpha=4,
        lora_dropout=0.1,
        lora_text_encoder=True,
        lora_lr=5e-5,
        quantize_base="nf4",
        t5="drop",
        save_single_file=True,
        min_snr_gamma=5,
        sample_prompts=["a photo of alice", "a painting, in style"],
        sample_every_steps=50,
        sample_steps=12,
        sample_guidance_scale=5.0,
        checkpoint_every_epochs=2,
        checkpoint_every_minutes=30.5,
        keep_checkpoints=3,
        max_steps=100,
        resume=True,
        num_workers=2,
        cache_latents="disk",
        cache_dir="/fast/cache",
        text_encoder_lr=0.0,
        prediction_type="v_prediction",
        zero_terminal_snr=True,
        offset_noise=0.05,
        pyramid_noise_discount=0.3,
        timestep_sampling="mode",
        logit_mean=0.5,
        logit_std=0.8,
        mode_scale=1.0,
        flow_shift=3.0,
        flow_loss_weighting="cosmap",
        caption_dropout=0.1,
        shuffle_tags=True,
        keep_tags=1,
        caption_dropouts={"people/bob": 0.5},
        shuffle_tags_concepts=["style"],
        ema_decay=0.999,
        ema_on_cpu=True,
        log_with="tensorboard",
        validation_split=0.2,
        validate_every_epochs=2,
        validate_every_steps=10,
        bleed_images=4,
        concept_prompts={"people/alice": "a photo of alice"},
        live_balance=True,
        auto_balance=True,
        auto_balance_bounds=(0.5, 2.0),
        kohya_repeats=True,
        center_crop=False,
        flip_p=0.5,
        write_schedule=True,
        multipliers={"people/alice": 2, "preservation": 0.05},
        loss_scales={"style": -0.5},
        device="cuda:1",
        progress_bar=False,
    )


def test_every_field_differs_from_default_in_the_full_config():
    config = full_config()
    same = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.default is not dataclasses.MISSING and getattr(config, f.name) == f.default
    ]
    # left at their defaults: overwrite excludes resume, cache_text_embeddings excludes lora_text_encoder,
    # validation_root excludes validation_split
    assert same == ["cache_text_embeddings", "overwrite", "validation_root"]


def test_defaults_and_normalised_values():
    config = make()
    assert (config.epochs, config.batch_size, config.resolution, config.lr) == (10, 4, None, 1e-6)
    assert (config.mixed_precision, config.gradient_checkpointing, config.lora_rank) == ("auto", None, 0)
    assert config.optimizer == "adamw8bit" and config.seed == 555
    config = make(lr=1, sample_prompts=["x"], multipliers={"b": 2, "a": 1})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.sample_prompts == ("x",)
    assert config.multipliers == (("a", 1.0), ("b", 2.0))
    assert config.multiplier_overrides == {"a": 1.0, "b": 2.0}
    assert hash(config) == hash(make(lr=1.0, sample_prompts=("x",), multipliers=[("a", 1), ("b", 2)]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 2.0


def test_unknown_and_missing_keys_are_listed():
    with pytest.raises(ConfigError) as info:
        make(learning_rate=1e-5, epoch=3)
    message = str(info.value)
    assert "'epoch'" in message and "'learning_rate'" in message and "epochs" in message and "lr" in message
    with pytest.raises(ConfigError, match="missing required setting.*model, out"):
        TrainConfig.from_dict({"data_root": "x"})


@pytest.mark.parametrize(
    ("values", "field", "fragment"),
    [
        ({"epochs": 0}, "epochs", ">= 1"),
        ({"epochs": 2.5}, "epochs", "whole number"),
        ({"batch_size": True}, "batch_size", "whole number"),
        ({"resolution": 500}, "resolution", "multiple of 64"),
        ({"lr": 0}, "lr", "> 0"),
        ({"lr": "1e-6"}, "lr", "must be a number"),
        ({"lr": float("nan")}, "lr", "finite"),
        ({"optimizer": "sgd"}, "optimizer", "adamw8bit, paged_adamw8bit, lion8bit, adamw, prodigy"),
        ({"mixed_precision": "fp8"}, "mixed_precision", "no, fp16, bf16"),
        ({"seed": -1}, "seed", ">= 0"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing", "true or false"),
        ({"grad_accum": 0}, "grad_accum", ">= 1"),
        ({"max_grad_norm": -1}, "max_grad_norm", "> 0"),
        ({"lr_scheduler": "onecycle"}, "lr_scheduler", "cosine"),
        ({"lr_warmup_steps": 10}, "lr_warmup_steps", "constant_with_warmup"),
        ({"min_snr_gamma": 0}, "min_snr_gamma", "> 0"),
        ({"sample_prompts": "a cat"}, "sample_prompts", "list of text"),
        ({"sample_prompts": ["ok", ""]}, "sample_prompts", "non-empty"),
        ({"sample_steps": 0}, "sample_steps", ">= 1"),
        ({"checkpoint_every_minutes": -5}, "checkpoint_every_minutes", ">= 0"),
        ({"max_steps": 0}, "max_steps", ">= 1"),
        ({"resume": True, "overwrite": True}, "overwrite", "exclude each other"),
        ({"flip_p": 1.5}, "flip_p", "0 to 1"),
        ({"cache_latents": True}, "cache_latents", "off, memory, disk"),
        ({"zero_terminal_snr": True, "prediction_type": "epsilon"}, "zero_terminal_snr", "v_prediction"),
        ({"offset_noise": 1.5}, "offset_noise", "from 0 to 1"),
        ({"caption_dropout": -0.1}, "caption_dropout", "from 0 to 1"),
        (
            {"shuffle_tags": True, "cache_text_embeddings": True, "train_text_encoder": False},
            "shuffle_tags",
            "new caption",
        ),
        ({"caption_dropouts": {"a": 1.5}}, "caption_dropouts['a']", "from 0 to 1"),
        ({"caption_dropouts": {"a": "half"}}, "caption_dropouts['a']", "finite number"),
        ({"shuffle_tags_concepts": "a"}, "shuffle_tags_concepts", "list of text"),
        ({"shuffle_tags_concepts": ["a", "a"]}, "shuffle_tags_concepts", "names a folder twice"),
        (
            {"shuffle_tags_concepts": ["a"], "cache_text_embeddings": True, "train_text_encoder": False},
            "shuffle_tags_concepts",
            "new caption",
        ),
        ({"ema_decay": 1.0}, "ema_decay", "between 0 and 1"),
        ({"text_encoder_lr": -1}, "text_encoder_lr", ">= 0"),
        ({"optimizer": "sgd"}, "optimizer", "prodigy"),
        ({"log_with": "wandb"}, "log_with", "tensorboard"),
        ({"multipliers": {"a": 0}}, "multipliers", "> 0"),
        ({"multipliers": {"a": "2"}}, "multipliers", "finite number"),
        ({"multipliers": ["a=2"]}, "multipliers", "concept folder to a number"),
        ({"loss_scales": {"a": float("inf")}}, "loss_scales", "finite number"),
        ({"device": "gpu"}, "device", "cuda"),
        ({"data_root": "  "}, "data_root", "folder"),
        ({"model": None}, "model", "needs a value"),
    ],
)
def test_bad_values_name_the_field(values, field, fragment):
    with pytest.raises(ConfigError) as info:
        make(**values)
    message = str(info.value)
    assert message.startswith(field) and fragment in message


def test_yaml_and_json_round_trip(tmp_path):
    config = full_config()
    for name in ("run.yaml", "run.yml", "run.json"):
        path = config.to_file(tmp_path / name)
        assert TrainConfig.from_file(path) == config
    assert json.loads((tmp_path / "run.json").read_text())["multipliers"] == {
        "people/alice": 2.0,
        "preservation": 0.05,
    }


def test_yaml_reads_numbers_as_people_write_them(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data_root: d\nmodel: m\nout: o\nlr: 1e-6\nmax_grad_norm: null\nmultipliers: {a: 2}\n")
    config = TrainConfig.from_file(path)
    assert config.lr == 1e-6 and config.max_grad_norm is None and config.multipliers == (("a", 2.0),)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data_root: d\nmodel: m\nout: o\nepochs: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: epochs is 'many'"):
        TrainConfig.from_file(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_file(broken)
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.json"):
        TrainConfig.from_file(tmp_path / "run.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        TrainConfig.from_file(tmp_path / "missing.yaml")


def parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser())


def test_cli_round_trip():
    config = full_config()
    assert from_args(parser().parse_args(to_args(config))) == config


def test_cli_overrides_only_given_options(tmp_path):
    base = full_config()
    namespace = parser().parse_args(
        ["--epochs", "7", "--no-resume", "--max-grad-norm", "0.5", "--sample-prompts"]
    )
    namespace.config, namespace.command = "ignored.yaml", "train"  # other CLI attributes are left alone
    config = from_args(namespace, base=base)
    assert config == dataclasses.replace(base, epochs=7, resume=False, max_grad_norm=0.5, sample_prompts=())
    namespace = parser().parse_args(["--multipliers", "people/alice=3", "x=y=0.5", "--min-snr-gamma", "none"])
    config = from_args(namespace, base=base)
    assert config.multipliers == (("people/alice", 3.0), ("x=y", 0.5)) and config.min_snr_gamma is None


def test_cli_errors():
    with pytest.raises(ConfigError, match="--data-root, --model, --out"):
        from_args(parser().parse_args(["--epochs", "2"]))
    with pytest.raises(SystemExit):
        parser().parse_args(["--optimizer", "sgd"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--multipliers", "alice"])
    with pytest.raises(ConfigError, match="epochs is 0"):
        from_args(parser().parse_args(["--data-root", "d", "--model", "m", "--out", "o", "--epochs", "0"]))


def test_partial_config_file_completed_by_flags(tmp_path):
    """The CLI's flow: a --config file without data_root / model / out, which the flags then give."""
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 2\nlr: 1e-4\nsample_prompts: [a cat]\n")
    with pytest.raises(ConfigError, match="missing required setting"):
        TrainConfig.from_file(path)
    values = read_config_file(path)
    namespace = parser().parse_args(["--data-root", "d", "--model", "m", "--out", "o", "--epochs", "3"])
    config = from_args(namespace, base=values)
    assert (config.epochs, config.lr, config.sample_prompts, config.out) == (3, 1e-4, ("a cat",), "o")
    with pytest.raises(ConfigError, match="--model, --out"):
        from_args(parser().parse_args(["--data-root", "d"]), base=values)
    (tmp_path / "list.yaml").write_text("- epochs\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_config_file(tmp_path / "list.yaml")


def test_readme_lists_every_setting_as_generated():
    from pathlib import Path

    from edtools.flags import settings_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- settings -->\n", 1)[1].split("\n<!-- /settings -->", 1)[0]
    assert block == settings_table(), "the README's settings table is out of date: run make readme-settings"
