"""The learner's config, checked once at the boundary and frozen.

`resolve(cfg)` takes the ml_collections config (defaults in `config.py`, overrides from the command
line or a notebook) and returns a `Settings`: frozen dataclasses that the rest of the learner reads.
Every value check lives here (`RULES`), and all run before any model is loaded: an unknown field (with
the nearest known name), a wrong type, or a value out of range is a `ConfigError` naming the field, the
value and what is allowed. The command line prints it and exits 2.

Checks that need the model (the resolution's multiple, the CRF size against the image size) are made
by `em/prepare.py` right after loading it, before any work.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from typing import Any, Callable

from .masks.crf import BACKENDS as CRF_BACKENDS
from .errors import JaxconceptError

# The names only (em/steps.py builds what they name, from these): a bad value is refused without importing the
# model code (diffusers, seconds at every start).
MODES = ("em", "attention", "user")
INIT_METHODS = ("words", "inversion")
RESIZE_MODES = ("crop", "pad")
DTYPES = ("float32", "bfloat16", "fp32", "bf16")
OPTIMIZERS = ("adamw", "adamw_bf16", "adafactor")
REMATS = ("none", "full", "dots")


class ConfigError(JaxconceptError):
    """A config field that is unknown, of the wrong type, or out of range."""


@dataclasses.dataclass(frozen=True)
class Init:
    method: str
    inversion_steps: int
    inversion_lr: float

    @property
    def steps(self) -> int:
        """Unmasked inversion steps before the EM rounds (0 unless method is 'inversion')."""
        return self.inversion_steps if self.method == "inversion" else 0


@dataclasses.dataclass(frozen=True)
class Masks:
    num_timesteps: int
    resolutions: tuple[int, ...]
    background_level: float
    crf: bool
    crf_min_iou: float
    crf_backend: str
    crf_size: str | int  # "image", "latent" or pixels per side
    mask_prior: float  # EM settling: maps blended with the last round's masks (settle.damp_maps)
    crf_hysteresis: bool  # EM settling: a CRF refinement close to the last round's mask stays accepted
    same_noise: bool  # EM settling: every E-step draws the same timesteps and noise (only the rows differ)


@dataclasses.dataclass(frozen=True)
class Tokens:
    steps: int
    estep_every: int
    lr: float
    attn_weight: float
    attn_resolution: int
    loss_margin: int
    loss_per_area: bool
    vectors: int
    batch_size: int
    clip: float
    weight_decay: float

    @property
    def rounds(self) -> int:
        return -(-self.steps // self.estep_every)

    def round_steps(self, r: int) -> int:
        """Token steps of EM round r (0-based): estep_every, the last one what is left."""
        return min(self.estep_every, self.steps - r * self.estep_every)


@dataclasses.dataclass(frozen=True)
class Joint:
    steps: int
    lr: float
    text_encoder: bool
    remat: str
    optimizer: str
    checkpoint_every: int  # joint steps between checkpoints; 0 = only at the end
    clip: float  # global gradient-norm clip of the joint optimiser
    weight_decay: float
    lora_rank: int  # 0: the whole UNet is tuned; r > 0: low-rank adapters on a frozen UNet (model/lora.py)
    lora_alpha: float  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_targets: str  # "attention", optionally "+ff" and "+proj"

    @property
    def lora(self):
        """The adapters' spec, or None when the whole UNet is tuned."""
        from .model import lora

        return lora.LoraSpec(self.lora_rank, self.lora_alpha, lora.parse_targets(self.lora_targets)) \
            if self.lora_rank else None


@dataclasses.dataclass(frozen=True)
class Devices:
    """The device mesh's settings (config group `mesh`)."""

    fsdp: int
    shard_frozen: bool
    fsdp_min_size: int


@dataclasses.dataclass(frozen=True)
class Prior:
    folder: str
    prompt: str
    weight: float


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str
    dtype: str
    seed: int
    mode: str
    images: tuple
    resolution: int
    resize: str  # "crop" | "pad"
    template: str
    joiner: str
    flip_prob: float
    log_every: int
    init: Init
    masks: Masks
    tokens: Tokens
    joint: Joint
    mesh: Devices
    prior: Prior
    config_json: str  # the config as given (config.json of the run)

    @property
    def total_steps(self) -> int:
        return self.init.steps + self.tokens.steps + self.joint.steps

    def result_fields(self) -> dict:
        """The fields that decide a run's results (a run folder's fingerprint): all but logging, devices and
        checkpoint spacing."""
        out = json.loads(self.config_json)
        for name in ("log_every", "mesh", "images"):
            out.pop(name, None)
        joint = out.get("joint", {})
        joint.pop("checkpoint_every", None)
        if not joint.get("lora_rank"):  # the adapters' settings decide nothing then (runs made before them match)
            for name in ("lora_rank", "lora_alpha", "lora_targets"):
                joint.pop(name, None)
        return out


# ------------------------------------------------------------------------------------------ rules

def _integer(lo: int | None = None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return "an integer" + ("" if lo is None else f" >= {lo}")
        if lo is not None and v < lo:
            return f"an integer >= {lo}"
    return check


def _number(lo: float | None = None, hi: float | None = None, above: bool = False):
    def what():
        if lo is not None and hi is not None:
            return f"a number in [{lo}, {hi}]"
        return "a number" + ("" if lo is None else f" {'>' if above else '>='} {lo}")

    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return what()
        if lo is not None and (v < lo or (above and v == lo)) or hi is not None and v > hi:
            return what()
    return check


def _choice(options):
    def check(v):
        if v not in options:
            return "one of " + ", ".join(repr(o) for o in options)
    return check


def _boolean(v):
    if not isinstance(v, bool):
        return "True or False"


def _text(v):
    if not isinstance(v, str):
        return "a string"


def _template(v):
    if not isinstance(v, str) or "{}" not in v:
        return "a string with '{}' where the concept tokens go, e.g. 'a photo of {}'"


def _resolutions(v):
    if (not isinstance(v, (tuple, list)) or not v
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
        return "a non-empty tuple of query-grid heights (positive integers), e.g. (16, 32)"


def _crf_size(v):
    if v in ("image", "latent"):
        return None
    if isinstance(v, str) and v.strip().isdigit() and int(v) > 0:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return None
    return "'image', 'latent' or a number of pixels per side (e.g. '96')"


def _lora_targets(v):
    from .model import lora

    try:
        lora.parse_targets(v)
    except ValueError:
        return f"one or more of {', '.join(lora.GROUPS)} joined by '+', e.g. 'attention+ff'"


def _images(v):
    if not isinstance(v, (list, tuple)):
        return "a list of {'path': ..., 'concepts': [...]} (or empty: --concepts or the toy scene)"


def _model(v):
    if not isinstance(v, str) or not v.strip():
        return "'toy', 'tiny', a diffusers folder or a hub id"


RULES: dict[str, Callable[[Any], str | None]] = {
    "model": _model,
    "dtype": _choice(DTYPES),
    "seed": _integer(),
    "mode": _choice(MODES),
    "images": _images,
    "resolution": _integer(0),
    "resize": _choice(RESIZE_MODES),
    "template": _template,
    "joiner": _text,
    "flip_prob": _number(0.0, 1.0),
    "log_every": _integer(1),
    "init.method": _choice(INIT_METHODS),
    "init.inversion_steps": _integer(0),
    "init.inversion_lr": _number(0.0, above=True),
    "masks.num_timesteps": _integer(1),
    "masks.resolutions": _resolutions,
    "masks.background_level": _number(0.0, 1.0),
    "masks.crf": _boolean,
    "masks.crf_min_iou": _number(0.0, 1.0),
    "masks.crf_backend": _choice(CRF_BACKENDS),
    "masks.crf_size": _crf_size,
    "masks.mask_prior": _number(0.0, 1.0),
    "masks.crf_hysteresis": _boolean,
    "masks.same_noise": _boolean,
    "tokens.steps": _integer(0),
    "tokens.estep_every": _integer(1),
    "tokens.lr": _number(0.0, above=True),
    "tokens.attn_weight": _number(0.0),
    "tokens.attn_resolution": _integer(1),
    "tokens.loss_margin": _integer(0),
    "tokens.loss_per_area": _boolean,
    "tokens.vectors": _integer(0),
    "tokens.batch_size": _integer(1),
    "tokens.clip": _number(0.0, above=True),
    "tokens.weight_decay": _number(0.0),
    "joint.steps": _integer(0),
    "joint.lr": _number(0.0, above=True),
    "joint.text_encoder": _boolean,
    "joint.remat": _choice(REMATS),
    "joint.optimizer": _choice(OPTIMIZERS),
    "joint.checkpoint_every": _integer(0),
    "joint.clip": _number(0.0, above=True),
    "joint.weight_decay": _number(0.0),
    "joint.lora_rank": _integer(0),
    "joint.lora_alpha": _number(0.0, above=True),
    "joint.lora_targets": _lora_targets,
    "mesh.fsdp": _integer(1),
    "mesh.shard_frozen": _boolean,
    "mesh.fsdp_min_size": _integer(0),
    "prior.folder": _text,
    "prior.prompt": _text,
    "prior.weight": _number(0.0),
}
GROUPS = sorted({k.split(".")[0] for k in RULES if "." in k})


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) or hasattr(value, "to_dict") and not isinstance(value, (list, tuple)):
            out.update(_flatten(value.to_dict() if hasattr(value, "to_dict") else value, name + "."))
        else:
            out[name] = value
    return out


def unknown_field_message(name: str) -> str:
    """'config has no field X' with the nearest known names (difflib)."""
    near = difflib.get_close_matches(name, list(RULES) + GROUPS, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(near)}?" if near else f" Known groups: {', '.join(GROUPS)}."
    return f"unknown config field {name!r}.{hint}"


def command_line_error(argv, error: Exception) -> str:
    """What to print when the command line's --config.FIELD=VALUE overrides cannot be parsed."""
    for arg in argv[1:]:
        if arg.startswith("--config."):
            name, _, value = arg[len("--config."):].partition("=")
            if name not in RULES and name not in GROUPS:
                return unknown_field_message(name)
            if f"--config.{name}" in str(error) and name in RULES:  # a value of the wrong type
                return f"config field {name} = {value!r} is not allowed: use {RULES[name](value) or 'another value'}."
    return f"bad command line: {str(error).strip()}"


def check(cfg) -> dict:
    """The flat {field: value} of `cfg` after every check (raises ConfigError on the first bad field)."""
    flat = _flatten(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    for name in flat:
        if name not in RULES:
            raise ConfigError(unknown_field_message(name))
    for name, rule in RULES.items():
        if name not in flat:
            raise ConfigError(f"config field {name!r} is missing: start from jaxconcept.config.get_config().")
        allowed = rule(flat[name])
        if allowed:
            raise ConfigError(f"config field {name} = {flat[name]!r} is not allowed: use {allowed}.")
    return flat


def _group(cls, flat: dict, prefix: str):
    return cls(**{f.name: flat[f"{prefix}.{f.name}"] for f in dataclasses.fields(cls)})


def resolve(cfg) -> Settings:
    """Settings from a config (checked); a Settings is returned as it is."""
    if isinstance(cfg, Settings):
        return cfg
    flat = check(cfg)
    flat["masks.resolutions"] = tuple(flat["masks.resolutions"])
    size = flat["masks.crf_size"]
    flat["masks.crf_size"] = int(size) if isinstance(size, str) and size.strip().isdigit() else size
    top = {f.name: flat[f.name] for f in dataclasses.fields(Settings)
           if f.name in flat}
    top["images"] = tuple(top["images"])
    text = cfg.to_json(indent=2) if hasattr(cfg, "to_json") else json.dumps(cfg, indent=2)
    return Settings(**top, init=_group(Init, flat, "init"), masks=_group(Masks, flat, "masks"),
                    tokens=_group(Tokens, flat, "tokens"), joint=_group(Joint, flat, "joint"),
                    mesh=_group(Devices, flat, "mesh"), prior=_group(Prior, flat, "prior"), config_json=text)
