"""Typed run configuration: YAML recipes (shipped in `megadiff/recipes/`) plus dotted
`key=value` overrides. Every user mistake is a one-line `ValueError` naming the key and the fix."""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

RECIPE_DIR = Path(__file__).parent / "recipes"
SECRET_KEY = re.compile(r"(token|secret|password|api_key|apikey)", re.IGNORECASE)


@dataclass
class ModelConfig:
    path: str | None = None               # local SD3/SD3.5 diffusers directory
    precision: Literal["bf16", "fp32", "fp16"] = "bf16"
    gradient_checkpointing: bool = False  # diffusers' non-reentrant checkpointing of MMDiT blocks
    max_sequence_length: int = 256        # T5 tokens when megadiff encodes prompts itself


@dataclass
class DemoConfig:
    enabled: bool = False                 # build a tiny model + synthetic shards in output_dir/demo
    num_samples: int = 64


@dataclass
class DataConfig:
    local: str | None = None              # shard directory (or streaming's local cache for remote)
    remote: str | None = None             # shard location: a path on a shared filesystem or a URL
    micro_batch_size: int = 1             # per rank, per forward
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None  # if set, must equal micro x accumulation x world size
    num_workers: int = 0
    shuffle: bool = True
    num_canonical_nodes: int | None = None  # fix it to resume on a different node count


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    schedule: Literal["constant", "cosine"] = "constant"   # both with linear warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0             # cosine floor as a fraction of lr
    grad_clip: float = 1.0                # 0 disables clipping


@dataclass
class DeepSpeedConfig:
    config: str = "zero3"                 # a name in ds_configs/ or a path to a JSON file
    zero_stage: int | None = None         # overrides the JSON's stage
    offload_optimizer: bool | None = None
    offload_param: bool | None = None


@dataclass
class FlowConfig:
    timestep_sampling: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 3.0                    # SD3 resolution shift of sigma
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    log_interval: int = 10
    save_interval: int = 500
    sample_interval: int = 0              # 0: samples only at the end
    keep_last: int = 0                    # 0 keeps every checkpoint
    log_samples: bool = False             # record each step's sample indices per rank
    max_consecutive_nonfinite: int = 20   # NaN/Inf micro-batches in a row before the run stops
    dist_timeout_minutes: float = 30.0    # how long ranks wait for each other (rendezvous, collectives)


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat"])
    num_inference_steps: int = 28
    guidance_scale: float = 1.0
    resolution: int | None = None         # pixels; default: the training latents' size
    seed: int = 0


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "megadiff"
    peak_tflops: float | None = None      # per device, for MFU; default from the device name
    progress: Literal["auto", "on", "off"] = "auto"


@dataclass
class LoRAConfig:
    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.0
    targets: list[str] | None = None      # peft target_modules; default: MMDiT attention + MLPs


@dataclass
class GeneratorConfig:
    num_steps: int = 1                    # few-step schedule length (1-4 in DMD2)
    sigmas: list[float] | None = None     # conditioning noise levels, decreasing; default SD3 grid
    shift: float | None = None            # resolution shift of the default grid (None: flow.shift)
    backward_simulation: bool = True      # inputs from the generator's own schedule, else data
    sample_type: Literal["sde", "ode"] = "sde"   # sde: re-noise each x0 (DMD2); ode: Euler steps (DMDR)


@dataclass
class GANConfig:
    enabled: bool = False                 # discriminator head on the fake score's features
    block: int | None = None              # MMDiT block feeding the head (None: the middle one)
    head_channels: int = 256
    gen_weight: float = 5.0e-3            # softplus(-D(fake)) in the generator loss
    disc_weight: float = 1.0e-2           # softplus(D(fake)) + softplus(-D(real)) in the fake score's
    sigma_max: float = 0.0                # 0: D sees clean latents (DMD2); >0: noised, sigma ~ U[0, max]


@dataclass
class DMDConfig:
    loss: Literal["dmd2", "ddmd"] = "dmd2"    # DMD2 distribution matching, or Decoupled DMD
    divergence: Literal["reverse_kl", "forward_kl", "js"] = "reverse_kl"   # f-divergence weighting
    fdiv_normalization: Literal["timestep", "batch", "none"] = "timestep"
    fdiv_logit_clamp: float = 10.0
    real_guidance_scale: float = 7.0      # CFG scale of the real score
    guidance_jitter: float = 0.0          # scale drawn from U[scale - j, scale + j] per micro-step
    sigma_min: float = 0.02               # DM re-noising range (DMD2: t ~ U[0.02, 0.98])
    sigma_max: float = 0.98
    timestep_shift: float = 1.0           # SD3 shift applied to the DM re-noising levels
    ca_schedule: Literal["below_input", "full"] = "below_input"   # Decoupled DMD's CA range
    dm_weight: float = 1.0
    ca_weight: float = 1.0
    update_ratio: int = 5                 # fake-score steps per generator step (DMD2: 5 or 10)
    cold_start_steps: int = 0             # DMD only for this many steps; later objectives wait
    teacher_steps: int = 28               # the teacher's own sampling steps (sample CLI, checks)
    real_score: Literal["teacher", "fake_base"] = "teacher"   # fake_base: LoRA fake score's base
    real_adapter_scale: tuple[float, float] = (1.0, 0.0)      # fake_base: gui scale, start -> end (cosine)
    real_adapter_decay_steps: int = 1000  # iterations of DMDR's "dynamic" schedules (scale, renoise_beta)
    fake_adapter_scale: float = 1.0       # gui adapter scale of the fake score (DMDR lora_scale_f: 2)
    renoise_beta: tuple[float, float] | None = None   # DMDR: sigma ~ Beta(a, b) -> Beta(1, 1), cosine
    after_cold_start_lr: dict[str, float] = field(default_factory=dict)   # {net: lr} from cold_start_steps
    lora: dict[str, dict] = field(default_factory=dict)       # {generator|fake_score: LoRAConfig}
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    gan: GANConfig = field(default_factory=GANConfig)

    def lora_for(self, net: str) -> LoRAConfig | None:
        if net not in self.lora:
            return None
        return _build(LoRAConfig, self.lora[net] or {}, f"dmd.lora.{net}.")


@dataclass
class ContextConfig:
    """Extended text context (megadiff/models/context.py): long prompts encoded past SD3's 77
    CLIP / max_sequence_length T5 tokens, projected by a trainable MLP into extra joint-attention
    tokens (padding masked), trained with the transformer in one engine."""
    enabled: bool = False
    clip_length: int | None = None        # CLIP prompt tokens, windows of 75 (75: no CLIP extension); None: the shards'
    t5_length: int | None = None          # T5 tokens; past model.max_sequence_length is extra (None: the shards')
    hidden_dim: int | None = None         # projector MLP width (None: the transformer's joint_attention_dim)


@dataclass
class RewardConfig:
    """One frozen reward model (megadiff/rewards/), loaded from local files only."""
    kind: Literal["hpsv2", "clip", "pickscore", "aesthetic", "imagereward"] = "hpsv2"
    path: str | None = None               # HPS_v2.1_compressed.pt, open_clip_pytorch_model.bin, HF dir, .pth
    weight: float = 1.0                   # weight of this reward in a weighted sum
    arch: str | None = None               # open_clip architecture name or model-config JSON
                                          # (default: hpsv2 ViT-H-14, clip ViT-H-14-quickgelu, aesthetic ViT-L-14-quickgelu)
    clip_path: str | None = None          # aesthetic: the CLIP ViT-L/14 open_clip state dict its MLP reads;
                                          # pickscore: the processor/tokenizer dir (default: path)
                                          # imagereward: the bert-base-uncased tokenizer dir (vocab.txt)
    name: str | None = None               # label in logs and eval tables (default: kind)


# ---- objective sections: each owned by its objective's file; fields documented there ------
@dataclass
class ReFLConfig:
    """ReFL (megadiff/objectives/refl.py)."""
    loss: Literal["hinge", "neg"] = "hinge"   # sum_k w_k relu(margin - r_k), or -sum_k w_k r_k
    margin: float = 0.7
    weight: float = 1.0                   # multiplies the whole reward term
    prompt_prefix: str = ""               # "Realistic photo" in DMDR: "<prefix> <caption>"
    prefix_rewards: list[str] | None = None   # reward names that see the prefix (None: all)


@dataclass
class SRPOConfig:
    """SRPO as DMDR uses it (megadiff/objectives/srpo.py)."""
    k: float = 0.1                        # reward against (1 + k) e(positive) - e(negative)
    weight: float = 1.0
    rewards: list[str] = field(default_factory=lambda: ["hpsv2"])   # reward names scored this way
    positive: list[str] = field(default_factory=lambda: ["Natural-lighting", "Detailed", "Realistic"])
    negative: list[str] = field(default_factory=lambda: ["Painting", "CG Render", "Oil"])


@dataclass
class DPOConfig:
    """Diffusion-DPO (megadiff/objectives/dpo.py)."""
    beta: float = 5000.0                  # beta_dpo: -beta/2 (d_model - d_ref) inside the logsigmoid
    sft: bool = False                     # flow matching on the preferred images only, no reference


@dataclass
class SDPOConfig:
    """SDPO (megadiff/objectives/sdpo.py); defaults are the seed's (ZiyiZhang27/sdpo
    `config/base_sdpo.py`) where it has one."""
    num_steps: int = 4                    # SDE sampling steps of each rollout (seed: 50)
    noise_level: float = 0.7              # Flow-GRPO's a: SDE std a sqrt(s / (1 - s))
    shift: float | None = None            # sampling schedule shift (None: flow.shift)
    guidance_scale: float = 1.0           # CFG while sampling and training (seed: 1.0, sd-turbo)
    resolution: int | None = None         # pixels (None: the transformer's native size)
    timesteps_per_update: int = 1         # per-sample shuffled timesteps per optimizer step
    gamma: float = 0.99                   # discount of the dense rewards
    lam: float = 0.99                     # weight lam^t of step t's log-ratio difference
    log_scale: float = 1.0                # log-ratio difference divided by this
    adv_clip_max: float = 5.0             # advantages clipped to [-max, max]
    clip_range: float = 1.0e-4            # log-prob clipping of the squared loss (0: off)


@dataclass
class RunConfig:
    recipe: str = ""
    objectives: list[str] = field(default_factory=lambda: ["flow_matching"])
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Per-network changes to `optim`, e.g. {fake_score: {lr: 2.0e-6}}; each trainable network
    # has its own DeepSpeed engine, optimizer and schedule.
    optim_nets: dict[str, dict] = field(default_factory=dict)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)   # objectives: [dmd]
    context: ContextConfig = field(default_factory=ContextConfig)   # long-prompt context extension
    rewards: list[RewardConfig] = field(default_factory=list)      # frozen reward models (refl, srpo, sdpo, eval)
    refl: ReFLConfig = field(default_factory=ReFLConfig)
    srpo: SRPOConfig = field(default_factory=SRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    sdpo: SDPOConfig = field(default_factory=SDPOConfig)

    def check_batch(self, world_size: int) -> int:
        """The global batch; raises if the configured one is inconsistent with the world size."""
        d = self.data
        derived = d.micro_batch_size * d.gradient_accumulation_steps * world_size
        if d.global_batch_size is not None and d.global_batch_size != derived:
            raise ValueError(
                f"data.global_batch_size={d.global_batch_size} but data.micro_batch_size "
                f"({d.micro_batch_size}) x data.gradient_accumulation_steps "
                f"({d.gradient_accumulation_steps}) x world size ({world_size}) = {derived}: "
                "make them agree or drop data.global_batch_size")
        return derived

    def optim_for(self, net: str) -> OptimConfig:
        over = self.optim_nets.get(net, {})
        base = dataclasses.asdict(self.optim) | dict(over)
        return _build(OptimConfig, base, f"optim_nets.{net}.")

    def to_dict(self, redact: bool = True) -> dict:
        return _redact(dataclasses.asdict(self)) if redact else dataclasses.asdict(self)


def _redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(k) and v else _redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _recipe_dict(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"recipe {name_or_path!r} does not exist: use one of "
                         f"{', '.join(available_recipes())} or a path to a YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of config sections")
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    if parent in seen:
        raise ValueError(f"recipe {path} inherits itself through {parent!r}")
    return _merge(_recipe_dict(parent, seen + (parent,)), raw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value: write e.g. optim.lr=1e-5")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        _set_dotted(tree, key.strip(), value)
    return tree


def load_config(recipe: str, overrides: list[str] = ()) -> RunConfig:
    raw = _merge(_recipe_dict(recipe), parse_overrides(list(overrides)))
    raw.setdefault("recipe", recipe)
    cfg = _build(RunConfig, raw, "")
    _validate(cfg)
    return cfg


def load_run_args(args_json: Path) -> RunConfig:
    """The RunConfig a run was started with, from its args.json (export, sample, eval)."""
    args_json = Path(args_json)
    if not args_json.is_file():
        raise ValueError(f"{args_json} is missing: --run must be a megadiff output directory")
    return _build(RunConfig, json.loads(args_json.read_text()), "")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]}: valid keys here are "
                         f"{', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):   # YAML reads on/off as booleans
            value = "on" if value else "off"
        if value not in args:
            raise ValueError(f"{key}={value!r} is not allowed: choose one of {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{key} must have {len(args)} items, got {value!r}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        return origin(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):     # PyYAML reads "2e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"{key}={value!r} has the wrong type: expected {tp.__name__}")
    return value


def _validate(cfg: RunConfig) -> None:
    from megadiff.registry import OBJECTIVES

    positive = {"data.micro_batch_size": cfg.data.micro_batch_size,
                "data.gradient_accumulation_steps": cfg.data.gradient_accumulation_steps,
                "train.max_steps": cfg.train.max_steps, "train.log_interval": cfg.train.log_interval,
                "train.save_interval": cfg.train.save_interval,
                "train.max_consecutive_nonfinite": cfg.train.max_consecutive_nonfinite,
                "validation.num_inference_steps": cfg.validation.num_inference_steps}
    for key, v in positive.items():
        if v < 1:
            raise ValueError(f"{key}={v} must be at least 1")
    for net in ("", *cfg.optim_nets):
        optim = cfg.optim_for(net) if net else cfg.optim
        if optim.lr <= 0:
            raise ValueError(f"{'optim_nets.' + net if net else 'optim'}.lr={optim.lr} must be positive: "
                             "give a learning rate such as 1e-5")
    if not cfg.objectives:
        raise ValueError("objectives is empty: list at least one, e.g. objectives=[flow_matching]")
    for name in cfg.objectives:
        if name not in OBJECTIVES:
            raise ValueError(f"objective {name!r} is unknown: choose from {', '.join(sorted(OBJECTIVES))}")
    if not cfg.demo.enabled and cfg.model.path is None:
        raise ValueError("model.path is not set: pass model.path=/path/to/sd3-diffusers-dir")
    if not cfg.demo.enabled and cfg.data.local is None and cfg.data.remote is None:
        raise ValueError("no training data: pass data.local=SHARD_DIR (or data.remote=...)")
    if cfg.deepspeed.zero_stage not in (None, 0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} must be 0, 1, 2 or 3")
    if "dmd" in cfg.objectives:
        _validate_dmd(cfg.dmd)
    if cfg.rewards:
        _validate_rewards(cfg.rewards, cfg.demo.enabled)
    if "refl" in cfg.objectives or "srpo" in cfg.objectives:
        _validate_reward_objectives(cfg)
    if "dpo" in cfg.objectives or "sdpo" in cfg.objectives:
        _validate_preference(cfg)
    if cfg.context.enabled:
        _validate_context(cfg)


def _validate_context(cfg: RunConfig) -> None:
    from megadiff.models.context import check_lengths

    c = cfg.context
    if cfg.objectives != ["flow_matching"]:
        raise ValueError(f"context.enabled trains the context projector with flow matching: use "
                         f"objectives=[flow_matching], not {cfg.objectives}")
    if c.hidden_dim is not None and c.hidden_dim < 1:
        raise ValueError(f"context.hidden_dim={c.hidden_dim} must be at least 1")
    # Unset lengths come from the shards (checked against them there); the demo sets
    # model.max_sequence_length itself.
    if c.clip_length is not None:
        check_lengths(c.clip_length, 1, 0, "context.")
    if c.t5_length is not None and c.t5_length < 0:
        raise ValueError(f"context.t5_length={c.t5_length} must not be negative")
    if c.clip_length is not None and c.t5_length is not None and not cfg.demo.enabled:
        check_lengths(c.clip_length, c.t5_length, cfg.model.max_sequence_length, "context.")


def _validate_rewards(rewards: list[RewardConfig], demo: bool) -> None:
    """megadiff/rewards/: what can be checked without reading the files (loading checks those).
    Demo runs write tiny rewards themselves and fill in the paths."""
    import math

    for i, r in enumerate(rewards):
        key = f"rewards[{i}]"
        if r.path is None and not demo:
            raise ValueError(f"{key}.path is not set: give the local {r.kind} checkpoint "
                             "(HPS_v2.1_compressed.pt, open_clip_pytorch_model.bin, a PickScore dir, "
                             "or the aesthetic .pth)")
        if r.kind == "aesthetic" and r.clip_path is None and not demo:
            raise ValueError(f"{key}.clip_path is not set: the aesthetic MLP reads CLIP ViT-L/14 "
                             "features; give its open_clip state dict (ViT-L-14-quickgelu)")
        if r.kind == "pickscore" and r.arch is not None:
            raise ValueError(f"{key}.arch does not apply to pickscore (a transformers CLIP directory "
                             "carries its config): remove it")
        if not math.isfinite(r.weight):
            raise ValueError(f"{key}.weight={r.weight} must be a finite number")


LORA_NETWORKS = ("generator", "fake_score")


def _validate_dmd(d: DMDConfig) -> None:
    from megadiff.generator import check_sigmas

    if d.update_ratio < 1:
        raise ValueError(f"dmd.update_ratio={d.update_ratio} must be at least 1: it is the number of "
                         "fake-score steps per generator step (DMD2 uses 5 or 10)")
    g = d.generator
    for key, v in {"dmd.generator.num_steps": g.num_steps, "dmd.teacher_steps": d.teacher_steps,
                   "dmd.real_adapter_decay_steps": d.real_adapter_decay_steps}.items():
        if v < 1:
            raise ValueError(f"{key}={v} must be at least 1")
    if g.num_steps >= d.teacher_steps:
        raise ValueError(f"dmd.generator.num_steps={g.num_steps} is not shorter than the teacher's "
                         f"schedule (dmd.teacher_steps={d.teacher_steps}): a few-step generator must "
                         "take fewer steps than the teacher it distils")
    if g.sigmas is not None:
        import torch

        check_sigmas(torch.tensor(g.sigmas, dtype=torch.float32), g.num_steps)
    if not 0 < d.sigma_min < d.sigma_max <= 1:
        raise ValueError(f"dmd.sigma_min={d.sigma_min}, dmd.sigma_max={d.sigma_max}: need "
                         "0 < sigma_min < sigma_max <= 1")
    if not 0 <= d.gan.sigma_max <= 1:
        raise ValueError(f"dmd.gan.sigma_max={d.gan.sigma_max} must lie in [0, 1]")
    if d.cold_start_steps < 0 or d.guidance_jitter < 0:
        raise ValueError("dmd.cold_start_steps and dmd.guidance_jitter must not be negative")
    for net in d.lora:
        if net not in LORA_NETWORKS:
            why = "it is frozen" if net == "teacher" else "there is no such trainable network"
            raise ValueError(f"dmd.lora.{net}: network {net!r} takes no LoRA adapter ({why}); "
                             f"LoRA applies to {' and '.join(LORA_NETWORKS)}")
        lc = d.lora_for(net)
        if lc.rank < 1 or lc.alpha <= 0:
            raise ValueError(f"dmd.lora.{net}: rank={lc.rank} must be >= 1 and alpha={lc.alpha} > 0")
    if d.divergence != "reverse_kl" and not d.gan.enabled:
        raise ValueError(f"dmd.divergence={d.divergence} weights the DM gradient by a density ratio "
                         "that the discriminator head estimates: set dmd.gan.enabled=true")
    if d.renoise_beta is not None and min(d.renoise_beta) <= 0:
        raise ValueError(f"dmd.renoise_beta={list(d.renoise_beta)} must be two positive Beta parameters "
                         "(DMDR: [4.0, 1.5])")
    if d.fake_adapter_scale <= 0:
        raise ValueError(f"dmd.fake_adapter_scale={d.fake_adapter_scale} must be positive")
    for net, lr in list(d.after_cold_start_lr.items()):
        try:                           # PyYAML reads "1e-4" (no dot) as a string
            lr = d.after_cold_start_lr[net] = float(lr)
        except (TypeError, ValueError):
            pass
        if net not in LORA_NETWORKS or not isinstance(lr, float) or not lr > 0:
            raise ValueError(f"dmd.after_cold_start_lr.{net}={lr!r}: give a positive learning rate "
                             f"for {' or '.join(LORA_NETWORKS)}")
    if d.real_score == "fake_base" and "fake_score" not in d.lora:
        raise ValueError("dmd.real_score=fake_base uses the LoRA fake score's frozen base as the "
                         "teacher: give the fake score an adapter (dmd.lora.fake_score.rank=...)")


def _validate_reward_objectives(cfg: RunConfig) -> None:
    """ReFL / SRPO (megadiff/objectives/refl.py, srpo.py): a reward on the DMD generator's x0."""
    if "dmd" not in cfg.objectives or cfg.objectives.index("dmd") > min(
            cfg.objectives.index(n) for n in ("refl", "srpo") if n in cfg.objectives):
        raise ValueError(f"objectives={cfg.objectives}: refl and srpo score the few-step generator's "
                         "x0, so they come after dmd: write objectives=[dmd, refl] (or [dmd, srpo])")
    if not cfg.rewards:
        raise ValueError("refl/srpo need at least one reward model: add rewards=[{kind: hpsv2, "
                         "path: HPS_v2.1_compressed.pt, weight: 0.1}]")
    names = [r.name or r.kind for r in cfg.rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names {names} repeat: give each reward a distinct name=")
    lists = {"refl.prefix_rewards": cfg.refl.prefix_rewards or []}
    if "srpo" in cfg.objectives:
        lists["srpo.rewards"] = cfg.srpo.rewards
        if not cfg.srpo.positive or not cfg.srpo.negative:
            raise ValueError("srpo.positive and srpo.negative need at least one control word each")
    for key, chosen in lists.items():
        for n in chosen:
            if n not in names:
                raise ValueError(f"{key} names {n!r}, which is not a reward of this run: choose from "
                                 f"{', '.join(names)}")


def _validate_preference(cfg: RunConfig) -> None:
    """Diffusion-DPO / SDPO (megadiff/objectives/dpo.py, sdpo.py): each trains `transformer` alone."""
    for name in ("dpo", "sdpo"):
        if name in cfg.objectives and cfg.objectives != [name]:
            raise ValueError(f"objectives={cfg.objectives}: {name} trains the transformer on its own; "
                             f"use objectives=[{name}]")
    if cfg.objectives == ["dpo"] and cfg.dpo.beta <= 0:
        raise ValueError(f"dpo.beta={cfg.dpo.beta} must be positive (DiffusionDPO: 5000 for SD1.5)")
    if cfg.objectives != ["sdpo"]:
        return
    s = cfg.sdpo
    if not cfg.rewards and not cfg.demo.enabled:     # the demo builds a tiny colour reward
        raise ValueError("sdpo needs a reward model: add rewards=[{kind: hpsv2, path: HPS_v2.1_compressed.pt}]")
    if s.num_steps < 2:
        raise ValueError(f"sdpo.num_steps={s.num_steps}: both trajectories share the first step's x0 "
                         "prediction, so one step gives no reward difference; sample with >= 2 steps "
                         "(the 1-step model improves too)")
    if s.timesteps_per_update < 1 or s.num_steps % s.timesteps_per_update:
        raise ValueError(f"sdpo.timesteps_per_update={s.timesteps_per_update} must divide "
                         f"sdpo.num_steps={s.num_steps}")
    if s.noise_level <= 0:
        raise ValueError(f"sdpo.noise_level={s.noise_level} must be positive: the SDE needs noise for log-probs")
    if not (0 < s.gamma <= 1 and 0 < s.lam <= 1):
        raise ValueError(f"sdpo.gamma={s.gamma} and sdpo.lam={s.lam} must lie in (0, 1]")
    if s.log_scale <= 0 or s.adv_clip_max <= 0 or s.clip_range < 0:
        raise ValueError("sdpo.log_scale and sdpo.adv_clip_max must be positive, sdpo.clip_range >= 0")
