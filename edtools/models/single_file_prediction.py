"""The prediction type of a single-file checkpoint: its metadata, its marker keys, a .yaml beside it, the configs.

A1111's, ComfyUI's, kohya's and Stability's conventions, read in that order; used by single_file's loader.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ..errors import require

__all__ = ["with_sampling"]

logger = logging.getLogger("edtools.models")


def _file_prediction_type(
    path: Path, keys: Collection[str], metadata: Mapping[str, str]
) -> tuple[str, str] | None:
    """(prediction type, where it was read) from the file's metadata or keys, or the A1111 yaml beside it."""
    names = {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}
    for key in ("modelspec.prediction_type", "modelspec.predict_key"):
        value = str(metadata.get(key, "")).strip().lower()
        if value in names:
            return names[value], f"the file's metadata {key}={value}"
    kohya = str(metadata.get("ss_v_parameterization", "")).strip().lower()
    if kohya in ("true", "false"):
        found = "v_prediction" if kohya == "true" else "epsilon"
        return found, f"kohya metadata ss_v_parameterization={kohya}"
    if "v_pred" in keys:
        return "v_prediction", "the file's v_pred key (ComfyUI convention)"
    return _yaml_prediction_type(path)


def _yaml_prediction_type(path: Path) -> tuple[str, str] | None:
    """AUTOMATIC1111's convention: <stem>.yaml beside the checkpoint, with model.params.parameterization "v"
    for v-prediction (an LDM config without it is epsilon). An unreadable yaml is ignored."""
    config = path.with_suffix(".yaml")
    if not config.is_file():
        return None
    yaml = require("yaml", feature="reading a checkpoint's .yaml")
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        params = data["model"]["params"]
        if not isinstance(params, dict):
            raise TypeError("model.params is not a mapping")
    except Exception as exc:  # noqa: BLE001 - a broken yaml beside the file must not stop loading
        logger.warning("%s: ignoring %s (%s: %s)", path, config.name, type(exc).__name__, exc)
        return None
    if "parameterization" in params:
        v = str(params["parameterization"]).strip().lower() == "v"
    else:  # sgm (SDXL) configs name the scaling class; LDM configs without the key are epsilon
        v = "VScaling" in str(params.get("denoiser_config", ""))
    return ("v_prediction" if v else "epsilon"), f"{config.name} beside the file"


def with_sampling(
    scheduler: Any,
    path: Path,
    keys: Collection[str],
    metadata: Mapping[str, str],
    explicit: bool,
    source: str,
) -> Any:
    """The DDPM scheduler with the prediction type (and zero-terminal-SNR flag) the file calls for; an
    explicit model_config's scheduler wins. A scheduler without prediction types (flow matching) as it is."""
    diffusers = require("diffusers")
    config = dict(scheduler.config)
    if "prediction_type" not in config:
        return scheduler
    found = _file_prediction_type(path, keys, metadata)
    if explicit:
        if found and found[0] != config["prediction_type"]:
            logger.warning(
                "%s: %s says %s, but model_config %s's scheduler says %s; using model_config's",
                path,
                found[1],
                found[0],
                source,
                config["prediction_type"],
            )
        logger.info("%s: prediction type %s from model_config %s", path, config["prediction_type"], source)
        return scheduler
    if found:
        config["prediction_type"] = found[0]
        logger.info("%s: prediction type %s from %s", path, found[0], found[1])
    else:
        logger.info("%s: prediction type %s from %s's scheduler", path, config["prediction_type"], source)
        if "cond_stage_model.model.token_embedding.weight" in keys:
            logger.warning(
                "%s: SD 2.x files do not say whether they are v-prediction (768-v) or epsilon (512 base), and "
                "this one has no metadata or .yaml that does; using %s (%s). If that is wrong, pass a "
                "model_config (e.g. stabilityai/stable-diffusion-2-base for 512 base models)",
                path,
                config["prediction_type"],
                source,
            )
    if "ztsnr" in keys and not config.get("rescale_betas_zero_snr"):
        config["rescale_betas_zero_snr"] = True
        logger.info("%s: zero terminal SNR betas (the file's ztsnr key)", path)
    if config == dict(scheduler.config):
        return scheduler
    return diffusers.DDPMScheduler.from_config(config)
