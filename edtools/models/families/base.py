"""The interface every model family implements: how to load it, condition it, sample it, adapt it, test it.

A family (SD 1.x/2.x, SDXL) is one module with one Family subclass; the rest of edtools asks the family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

__all__ = [
    "TEXT_ENCODER_LORA_PATTERN",
    "TEXT_ENCODER_TARGETS",
    "UNET_LORA_PATTERN",
    "UNET_TARGETS",
    "Family",
    "FlowSettings",
    "Parts",
    "TextEmbeddings",
    "TextEncoderSpec",
    "TextLayout",
    "TinyEncoder",
    "TinySpec",
    "has_prefix",
    "is_unet_index",
    "unwrapped",
]

# LoRA target modules: the same set kohya's sd-scripts LoRA (networks.lora, its default without conv_dim) trains:
# every Linear and 1x1 Conv2d inside the UNet's Transformer2DModel blocks, i.e. attn1/attn2 to_q, to_k, to_v,
# to_out.0, the feed-forward ff.net.0.proj (GEGLU) and ff.net.2, and proj_in / proj_out.
# - Why more than the attention projections (diffusers' example scripts' default): the feed-forward layers
#   hold about half of a transformer block's weights, so adapting them gives the LoRA room for a concept or
#   style at a small rank; and a file with kohya's module set is what A1111/ComfyUI users expect of a
#   "networks.lora" file of a given dim and alpha (same size, same strength scale).
# - proj_in / proj_out are 1x1 Conv2d in SD 1.x and nn.Linear in SD 2.x / SDXL. peft adapts both; a 1x1 conv
#   LoRA is written with 4-d weights ([rank, in, 1, 1] / [out, rank, 1, 1]) exactly as kohya writes it, which
#   A1111 requires (it builds a 1x1 Conv2d for 4-d weights on a Conv2d layer) and ComfyUI and diffusers read.
# - Names: every target sits in down_blocks.N/up_blocks.N/mid_block .attentions.N. SD 1.x/2.x files spell
#   that path the diffusers way, SDXL files the SGM way (input_blocks.N.1/middle_block.1/output_blocks.N.1),
#   each as kohya's scripts write and read it (Family.kohya_unet_module); A1111
#   (convert_diffusers_name_to_compvis), ComfyUI (its map of both spellings) and diffusers' load_lora_weights
#   read both. ResNet 3x3 convs (kohya's optional conv_dim, "LoCon") are not targeted.
# Text encoders: kohya's CLIPAttention + CLIPMLP linears, q/k/v/out_proj and mlp.fc1/fc2. All four attention
# projections are always adapted together: A1111 applies q/k/v/out LoRAs to OpenCLIP's fused attention
# (SD 2.x, SDXL's second encoder) only when all four are present.
UNET_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
)  # fmt: skip
TEXT_ENCODER_TARGETS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2",
)  # fmt: skip
# peft matches a str target_modules with re.fullmatch against each module's qualified name.
UNET_LORA_PATTERN = (
    r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.(?:proj_in|proj_out|"
    r"transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2)))"
)
# transformers >= 5.6 flattens CLIPTextModel (encoder.layers.N...); CLIPTextModelWithProjection and older
# versions keep text_model.encoder.layers.N...
TEXT_ENCODER_LORA_PATTERN = (
    r"(?:text_model\.)?encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])"
)


class Parts(Protocol):
    """What a family reads of a loaded model: models.components.SDComponents, or anything with these parts
    (families never import the loaders' classes, so imports go one way)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    text_encoder_2: Any
    tokenizer_2: Any
    text_encoder_3: Any
    tokenizer_3: Any

    @property
    def prediction_type(self) -> str: ...


@dataclass
class TextEmbeddings:
    """hidden: [n, tokens, cross_attention_dim]; pooled: SDXL's second encoder's projected embedding [n, d]."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class FlowSettings:
    """How a flow-matching family trains: the noise levels' density (diffusers'
    compute_density_for_timestep_sampling: "logit_normal" with logit_mean / logit_std, "mode" with mode_scale,
    "uniform") and the loss weighting per level (compute_loss_weighting_for_sd3: "none", "sigma_sqrt",
    "cosmap"). The defaults are the SD3 paper's logit-normal(0, 1), unweighted. DDPM families ignore it."""

    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"


_DEFAULT_FLOW = FlowSettings()


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family: its SDComponents field and diffusers subfolder (`part`), its transformers
    class, its tokenizer's field and subfolder, and the tokenizer's transformers class."""

    part: str  # "text_encoder", "text_encoder_2", "text_encoder_3"
    model_class: str  # "CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"
    tokenizer: str  # "tokenizer", "tokenizer_2", "tokenizer_3"
    tokenizer_class: str = "CLIPTokenizer"  # "T5TokenizerFast"
    # a model may lack it (SD3's T5-XXL: model_index.json without the part, or [null, null]); the family then
    # conditions without it
    optional: bool = False

    @property
    def is_clip(self) -> bool:
        """Whether it is a CLIP text model (LoRA's CLIP targets; the files' text_model. prefix)."""
        return self.model_class.startswith("CLIP")

    @property
    def is_t5(self) -> bool:
        """Whether it is a T5 encoder (TrainConfig.t5 decides how it is loaded: as it is, in 8-bit, or not)."""
        return self.model_class.startswith("T5")


@dataclass(frozen=True)
class TextLayout:
    """Where one text encoder's weights sit in a single file: the key prefix (OpenAI CLIP under
    "...transformer.", OpenCLIP otherwise), the part it loads into, its name in messages, and whether the file
    carries OpenCLIP's last layer and projection that diffusers drops (SD 2.x; written as kohya does)."""

    prefix: str
    part: str
    label: str
    pad_last_layer: bool = False
    # readers take this encoder's text_projection as the identity whatever the file holds (SD3's CLIP-L, whose
    # pooled output is not projected): the writer warns when the model's is another
    identity_projection: bool = False


@dataclass(frozen=True)
class TinyEncoder:
    """A tiny text encoder: CLIPTextConfig width, layers and activation; projection_dim for one with projection
    (CLIPTextModelWithProjection); the tokenizer's pad token (None: <|endoftext|>); identity_projection: the
    projection is the identity, as the real model's (SD3's CLIP-L; projection == width). A T5 encoder (kind
    "t5") has the width, the layers and a generated sentencepiece-style tokenizer of `tokens` tokens."""

    width: int
    layers: int
    act: str
    projection: int | None = None
    pad_token: str | None = None
    identity_projection: bool = False
    kind: str = "clip"  # "clip" or "t5"
    tokens: int = 77  # a T5 tokenizer's model_max_length (CLIP's is 77)


@dataclass(frozen=True)
class TinySpec:
    """A tiny model of a variant, as plain configs that models.tiny builds: the denoiser's kwargs (less
    sample_size; for the family's denoiser_class), one TinyEncoder per text encoder (in the family's order),
    the VAE's latent scaling factor and whether it asks for float32."""

    unet: Mapping[str, Any]
    encoders: tuple[TinyEncoder, ...]
    vae_scaling_factor: float
    vae_force_upcast: bool
    # a VAE with other latent channels, SD3's shift_factor, no quant convs (SD3's); the training scheduler's
    # kwargs when it is not SD's DDPM (the family's noise_scheduler_class)
    vae_latent_channels: int = 4
    vae_shift_factor: float | None = None
    vae_quant_conv: bool = True
    scheduler: Mapping[str, Any] | None = None


def has_prefix(keys: Iterable[str], *prefixes: str) -> bool:
    """Whether any key starts with one of prefixes."""
    return any(key.startswith(prefixes) for key in keys)


def is_unet_index(index: Mapping[str, Any]) -> bool:
    """Whether a diffusers model_index.json is of a UNet2DConditionModel pipeline (no transformer)."""
    unet = index.get("unet") or [None, None]
    return unet[1] == "UNet2DConditionModel" and "transformer" not in index


def unwrapped(module: Any) -> Any:
    """The model inside torch.compile / DistributedDataParallel wrappers (families read its config)."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif type(module).__name__ in ("DistributedDataParallel", "DataParallel"):
            module = module.module
        else:
            return module


class Family(ABC):
    """One model family. Instances are stateless; register one in families/__init__.py (FAMILIES).

    Names: `name` is the family ("sd", "sdxl"): presets, SDComponents.architecture and run records use it;
    `variants` are the kinds of checkpoint it loads ("sd1", "sd2"; "sdxl"), as single-file detection and tiny
    models name them. Every method takes plain values or a model's Parts and returns plain values.
    """

    name: str
    label: str  # in messages: "a diffusers {label} folder"
    short_label: str  # "a typical {short_label} model"
    variants: tuple[str, ...]
    variant_labels: Mapping[str, str]  # variant -> "Stable Diffusion 1.x"
    variant_articles: Mapping[str, str]  # variant -> "a Stable Diffusion 1.x"
    text_encoders: tuple[TextEncoderSpec, ...]
    # words in a hub id that tell this family when its files are not here ("xl" in "...-xl-base-1.0")
    name_hints: tuple[str, ...] = ()
    # parameters of a typical model of this family (unet, text, vae, and lora_unet / lora_text per unit of
    # LoRA rank on the targets below), for hub ids not downloaded yet
    typical_parameters: Mapping[str, int] = MappingProxyType({})
    # whether gradient_checkpointing "none" means on whatever the GPU (it always is for SDXL's big UNet)
    gradient_checkpointing_always: bool = False
    unet_lora_targets: tuple[str, ...] = UNET_TARGETS
    text_encoder_lora_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS
    unet_lora_pattern: str = UNET_LORA_PATTERN
    text_encoder_lora_pattern: str = TEXT_ENCODER_LORA_PATTERN
    # the text encoders (parts) a run may train or adapt with LoRA (Flux's T5 is always frozen)
    trainable_text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    # kohya key prefixes renamed after diffusers' PEFT -> kohya conversion (lora_te1_ -> lora_te_ for one encoder)
    kohya_renames: Mapping[str, str] = MappingProxyType({})
    # The denoiser (SDComponents.unet, whatever its kind): its diffusers subfolder and pipeline argument
    # ("unet", "transformer") and its diffusers class; the training scheduler's diffusers class.
    denoiser_part: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    noise_scheduler_class: str = "DDPMScheduler"
    # How the LoRA file is written: "kohya" (kohya-ss / A1111 / ComfyUI keys, see models.lora.kohya_state_dict)
    # or "diffusers" (peft keys "<denoiser_part>.<module>.lora_A.weight", what the family's pipeline's
    # save_lora_weights writes and load_lora_weights reads).
    lora_file_format: str = "kohya"
    # whether edtools reads and writes single files (A1111 / ComfyUI checkpoints) of this family; the
    # single-file methods below are only asked when it does
    single_files: bool = True
    # The denoiser in messages about single files ("UNet", "transformer").
    denoiser_label: str = "UNet"
    # Whether a single file may hold only some parts (SD3.5 files are often the transformer alone, or it and
    # the VAE): the parts it lacks then load from model_config, which such files need; config_repos names the
    # diffusers models whose folders or hub ids fit (in messages). False: a file must hold every part.
    single_file_partial: bool = False
    config_repos: tuple[str, ...] = ()
    # The key prefix of a T5-XXL text encoder a single file may hold (ComfyUI's "text_encoders.t5xxl.";
    # "" none), read when the model loads T5 (models.single_file_t5)
    single_file_t5: str = ""
    # whether the frozen denoiser can be loaded quantised under LoRA (quantize_base nf4, QLoRA): a transformer
    # whose weights are nearly all nn.Linear, which bitsandbytes' Linear4bit replaces
    quantizable: bool = False

    # ---- loading: diffusers folders and hub ids

    @property
    def subfolders(self) -> tuple[str, ...]:
        """The subfolders a diffusers folder of this family has (unet, vae, scheduler, the encoders' and
        tokenizers'; an optional encoder's are not required)."""
        extra = tuple(
            name
            for spec in self.text_encoders[1:]
            if not spec.optional
            for name in (spec.part, spec.tokenizer)
        )
        return (self.denoiser_part, "vae", "text_encoder", "tokenizer", "scheduler") + extra

    @abstractmethod
    def matches_index(self, index: Mapping[str, Any], model: str) -> bool:
        """Whether a diffusers model_index.json (already known to be a UNet2DConditionModel pipeline) is of this
        family; a ModelError when it is of this family but not something edtools trains (an SDXL refiner)."""

    @abstractmethod
    def matches_parts(self, parts: Parts) -> bool:
        """Whether loaded parts are of this family (families' answers exclude one another)."""

    # ---- loading: single files and their key layout

    @abstractmethod
    def guess_keys(self, keys: Collection[str]) -> bool:
        """A quick look at a .safetensors file's tensor names: whether they look like this family (no checks;
        answers exclude one another)."""

    @abstractmethod
    def detect_keys(self, keys: Collection[str]) -> str | None:
        """The variant of an original-layout checkpoint whose UNet input is 4 latent channels and that is none
        of the other model types edtools refuses, from its key names alone; None when not of this family. A
        family whose denoiser is no UNet (denoiser_part) is asked first, before the UNet checks, so its answer
        must rest on its own block names."""

    @abstractmethod
    def variant_of(self, parts: Parts) -> str:
        """The variant of loaded parts of this family."""

    @abstractmethod
    def variant_of_configs(self, unet_config: Mapping[str, Any], text_config: Any) -> str | None:
        """The variant that a diffusers UNet config and first text encoder CLIPTextConfig describe, or None."""

    @abstractmethod
    def single_file_text(self, variant: str) -> tuple[TextLayout, ...]:
        """The text encoders' layouts in a single file of the variant, in the order of text_encoders."""

    @abstractmethod
    def diffusers_model_type(self, variant: str) -> str:
        """diffusers' model type of the variant (a key of single_file_utils.DIFFUSERS_DEFAULT_PIPELINE_PATHS)."""

    def diffusers_model_types(self, variant: str) -> tuple[str, ...]:
        """Every diffusers model type (infer_diffusers_model_type's answer) of files of the variant; by default
        diffusers_model_type's alone."""
        return (self.diffusers_model_type(variant),)

    def original_denoiser_entries(self, config: Mapping[str, Any], keys: Iterable[str]) -> list[Any]:
        """The denoiser's weights under their single-file names (models.keymap.Entry), from its diffusers
        config and state-dict keys; by default the UNet table of models.keymap."""
        from ..keymap import map_by_rules, unet_rules

        return map_by_rules(keys, unet_rules(config), self.denoiser_label)

    def normalise_keys(self, state_dict: MutableMapping[str, Any], variant: str) -> None:  # noqa: B027
        """Rename a single file's keys in place into the layout diffusers' converters read (default: as they
        are)."""

    @abstractmethod
    def modelspec_architecture(self, variant: str, v_prediction: bool) -> str:
        """Stability's ModelSpec modelspec.architecture of a model of the variant."""

    # ---- training: text conditioning and the noise objective

    @abstractmethod
    def encode_text(self, parts: Parts, input_ids: Sequence[torch.Tensor]) -> TextEmbeddings:
        """Run the text encoder(s) on token ids (one tensor per tokenizer) on the encoders' device."""

    def unet_conditioning(
        self, parts: Parts, embeddings: TextEmbeddings, time_ids: torch.Tensor | None, *, device: Any
    ) -> dict[str, Any]:
        """Keyword arguments of unet(noisy, timesteps, **kwargs); by default the text's hidden states."""
        return {"encoder_hidden_states": embeddings.hidden.to(device)}

    def prediction_target(
        self, noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the UNet learns to output: the scheduler's prediction type's target (noise for epsilon
        models, velocity for v_prediction), as edtools.models.objective.prediction_target."""
        from ..objective import prediction_target

        return prediction_target(noise_scheduler, latents, noise, timesteps)

    # The noise objective in four steps, each on "positions": integers in [0, num_train_timesteps) that index
    # the training schedule (DDPM: the timestep itself; flow matching: an index into the scheduler's shifted
    # sigmas). Validation draws its fixed positions per image the same way for every family.

    def training_positions(
        self, noise_scheduler: Any, count: int, generator: torch.Generator, flow: FlowSettings = _DEFAULT_FLOW
    ) -> torch.Tensor:
        """`count` schedule positions (int64, CPU) for a training batch, drawn from `generator`; by default
        uniform over the timesteps, as diffusers' training scripts draw them (flow: a flow family's density)."""
        import torch

        steps = noise_scheduler.config.num_train_timesteps
        return torch.randint(0, steps, (count,), generator=generator, dtype=torch.int64)

    def noisy_input(
        self, noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, the timestep values the denoiser is given) at the positions; by default the
        scheduler's add_noise and the positions themselves."""
        return noise_scheduler.add_noise(latents, noise, positions), positions

    def loss_weights(
        self, noise_scheduler: Any, positions: torch.Tensor, flow: FlowSettings = _DEFAULT_FLOW
    ) -> torch.Tensor | None:
        """Per-image weights of the MSE at the positions from the objective itself (flow matching's loss
        weighting), or None (the default: Min-SNR and loss_scale alone weight it)."""
        return None

    def denoise(self, model: Any, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping) -> Any:
        """The denoiser's output tensor on noisy latents (conditioning: unet_conditioning's keywords)."""
        return model(noisy, timesteps, **conditioning).sample

    def shift_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Latents already multiplied by the VAE's scaling_factor as the denoiser sees them (default: as they
        are; a VAE with a shift_factor subtracts shift * scaling)."""
        return latents

    def sampling_scheduler(self, noise_scheduler: Any) -> Any:
        """The sampler of the family's pipeline, from the training scheduler's config (a new object, so
        sampling never changes the training scheduler): DDIM with SD's own set_alpha_to_one=False unless the
        config says otherwise."""
        from ...errors import require

        diffusers = require("diffusers")
        return diffusers.DDIMScheduler.from_config({"set_alpha_to_one": False, **noise_scheduler.config})

    def lora_file_tensors(self, named: Mapping[str, torch.Tensor], rank: int, alpha: float) -> dict[str, Any]:
        """The LoRA file's tensors when lora_file_format is "diffusers": `named` is the adapter's peft
        weights "<unet|text_encoder|text_encoder_2>.<module>.lora_A.weight" / lora_B. The denoiser's keys are
        named for denoiser_part, and the scale alpha / rank is folded into lora_B, so that a loader that
        assumes alpha = rank (diffusers without adapter metadata) applies exactly the trained update."""
        scale = float(alpha) / float(rank)
        result = {}
        for name, value in named.items():
            component, rest = name.split(".", 1)
            if component == "unet":
                component = self.denoiser_part
            if rest.endswith(".lora_B.weight") and scale != 1.0:
                value = (value.float() * scale).to(value.dtype)
            result[f"{component}.{rest}"] = value.contiguous()
        return result

    def native_resolution(self, parts: Parts) -> int:
        """The image side the model was trained at: its denoiser's sample_size (latents) times the VAE's
        downsampling."""
        size = unwrapped(parts.unet).config.sample_size
        latent_side = size[0] if isinstance(size, list | tuple) else size
        return int(latent_side) * 2 ** (len(parts.vae.config.block_out_channels) - 1)

    # ---- sampling

    @abstractmethod
    def make_pipeline(self, parts: Parts, scheduler: Any) -> Any:
        """The diffusers text-to-image pipeline sharing the parts' modules, with `scheduler` as its sampler."""

    def pipeline_embeddings(
        self, parts: Parts, prompts: TextEmbeddings, negative: TextEmbeddings, *, device: Any
    ) -> dict[str, Any]:
        """The pipeline's keyword arguments that stand for its prompts (prompt_embeds and the like) from cached
        embeddings of the prompts and of the empty negative prompt, so that sampling needs no text encoder (one
        was freed after caching: T5). Only the families that free an encoder answer."""
        raise NotImplementedError(f"{self.label} pipelines are sampled from their prompts")

    # ---- LoRA

    def kohya_unet_module(self, unet_config: Mapping[str, Any], path: str) -> str:
        """A UNet module path as kohya's files of this family spell it (default: the diffusers path)."""
        return path

    @abstractmethod
    def lora_metadata(self, parts: Parts) -> dict[str, str]:
        """The LoRA file metadata that names the base model: ss_base_model_version, ss_v2,
        modelspec.architecture and modelspec.implementation."""

    # ---- tests

    @abstractmethod
    def tiny(self, variant: str, *, real_blocks: bool) -> TinySpec:
        """A tiny model of the variant; real_blocks keeps the real model's block structure."""

    # ---- names

    def variant_label(self, variant: str) -> str:
        return self.variant_labels[variant]

    def variant_article(self, variant: str) -> str:
        return self.variant_articles[variant]

    def __repr__(self) -> str:
        return f"<model family {self.name}: {', '.join(self.variants)}>"
