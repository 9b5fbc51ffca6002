"""The learner's config, checked once at the boundary and frozen.

Every config field is declared once here, in the dataclasses below: its default, its check and what it
means; the ml_collections config (`default_config()`, which `config.get_config()` returns) and the checks
(`RULES`) are derived from them. `resolve(cfg)` takes that config (with overrides from the command line or
a notebook) and returns a `Settings`: the frozen dataclasses that the rest of the learner reads. All checks
run before any model is loaded: an unknown field (with
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
MASK_DOWNSAMPLES = ("nearest", "area")
SWAP_STAGES = ("both", "tokens", "joint")  # the stages whose prompts `background_swap` may put on a bank background
LORA_TARGETS = ("attention", "ff", "proj")  # groups of a transformer block's layers (model/lora.py's GROUPS)


def lora_targets(text) -> tuple[str, ...]:
    """"attention+ff" -> ("attention", "ff"); unknown or no names raise ValueError."""
    names = tuple(t.strip() for t in str(text).replace(",", "+").split("+") if t.strip())
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(f"unknown LoRA target {', '.join(unknown) or repr(text)}; use one or more of "
                         f"{', '.join(LORA_TARGETS)} joined by '+'")
    return names


class ConfigError(JaxconceptError):
    """A config field that is unknown, of the wrong type, or out of range."""


# ------------------------------------------------------------------------------------------ value checks

def _integer(lo: int | None = None, hi: int | None = None):
    def what():
        return f"an integer in [{lo}, {hi}]" if hi is not None else "an integer" + ("" if lo is None else f" >= {lo}")

    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return what()
        if lo is not None and v < lo or hi is not None and v > hi:
            return what()
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
    try:
        lora_targets(v)
    except ValueError:
        return f"one or more of {', '.join(LORA_TARGETS)} joined by '+', e.g. 'attention+ff'"


def _images(v):
    if not isinstance(v, (list, tuple)):
        return "a list of {'path': ..., 'concepts': [...]} (or empty: --concepts or the toy scene)"


def _model(v):
    if not isinstance(v, str) or not v.strip():
        return "'toy', 'tiny', a diffusers folder or a hub id"



# ------------------------------------------------------------------------------------------ the fields
# Each config field is declared once, below: its default, its check and what it means. `default_config()` (the
# ml_collections config of `python -m jaxconcept.train`, `config.get_config()`) and `RULES` are derived from
# these declarations; measurements behind the defaults are in docs/config_notes.md.


def field(default, rule: Callable[[Any], str | None], *, factory=None):
    """A config field: its default (or a factory for a mutable one) and the check of its values."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"rule": rule})
    return dataclasses.field(default=default, metadata={"rule": rule})


@dataclasses.dataclass(frozen=True)
class Init:
    """Stage 1: tokens from their init words (random without one), or a short unmasked inversion after that."""

    method: str = field("words", _choice(INIT_METHODS))
    inversion_steps: int = field(100, _integer(0))
    inversion_lr: float = field(5e-3, _number(0.0, above=True))

    @property
    def steps(self) -> int:
        """Unmasked inversion steps before the EM rounds (0 unless method is 'inversion')."""
        return self.inversion_steps if self.method == "inversion" else 0


@dataclasses.dataclass(frozen=True)
class Masks:
    """The E-step: cross-attention over random timesteps, labels against a background level, a DenseCRF, clean-up;
    EM settling across rounds (masks/settle.py)."""

    num_timesteps: int = field(50, _integer(1))
    resolutions: tuple[int, ...] = field((16, 8), _resolutions)  # query-grid heights averaged (SD: latent/4, /2)
    background_level: float = field(0.55, _number(0.0, 1.0))
    crf: bool = field(True, _boolean)
    crf_min_iou: float = field(0.5, _number(0.0, 1.0))  # a CRF result further than this from its input is rejected
    crf_backend: str = field("host", _choice(CRF_BACKENDS))  # "host": pydensecrf; "device": exact CRF in JAX
    crf_size: str | int = field("image", _crf_size)  # the device CRF's grid: "image", "latent" or pixels per side
    mask_prior: float = field(0.0, _number(0.0, 1.0))  # maps blended with the last round's masks
    crf_hysteresis: bool = field(True, _boolean)  # a CRF result close to the last round's mask stays accepted
    same_noise: bool = field(True, _boolean)  # every E-step draws the same timesteps and noise
    timestep_chunk: int = field(0, _integer(0))  # timesteps per UNet call of the E-step (0: all at once)


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Stage 2: token optimisation with L_mask + attn_weight * L_attn, masks re-estimated every estep_every."""

    steps: int = field(400, _integer(0))
    estep_every: int = field(50, _integer(1))
    lr: float = field(1e-2, _number(0.0, above=True))  # the toy model's; SD presets: Break-a-Scene's 5e-4
    attn_weight: float = field(0.3, _number(0.0))  # the toy model's; SD presets: 0.01
    attn_resolution: int = field(16, _integer(1))  # query-grid height of the layers the attention loss reads
    loss_margin: int = field(0, _integer(0))  # latent cells the masked loss reaches past the masks
    loss_per_area: bool = field(False, _boolean)  # L_mask averaged over the masked cells only
    # how the losses' masks reach the latent grid: "nearest" (Break-a-Scene's) or "area" (a cell's object share)
    mask_downsample: str = field("nearest", _choice(MASK_DOWNSAMPLES))
    vectors: int = field(0, _integer(0))  # per concept; 0 = one per init word ("purple+ring": two)
    # the attention loss on every vector of a concept (each one's map against the concept's mask, averaged over its
    # vectors), not only on the first: no vector of one concept may attend to another's region
    attn_all_vectors: bool = field(False, _boolean)
    # mode em: after the EM rounds the rows start again from the token stage's start and take its steps once more
    # on the final masks, fixed, so that early rounds' wrong masks (random or one-word starts) do not shape them;
    # twice the token steps (docs/concepts_back.md §16)
    refit: bool = field(False, _boolean)
    # context regulariser (losses.context_loss): weight (0: off; it helps tokens whose init words already describe
    # their concept and costs those that must learn more, docs/concepts_back.md §11), and the phrases put after the
    # concepts ('|' between); the toy's name no background the toy judge samples on (teal, water)
    context_weight: float = field(0.0, _number(0.0))
    context_phrases: str = field("on a pink sand background|on a lime grass background|on a beige checker background",
                                 _text)
    batch_size: int = field(1, _integer(1))
    clip: float = field(1.0, _number(0.0, above=True))  # global gradient-norm clip
    weight_decay: float = field(1e-2, _number(0.0))
    # > 0: the token stage hands on (to the joint stage, or as the result) the exponential moving average of its
    # rows with this decay per step, not the last step's rows (0.98: about the last 50 steps); the E-steps read
    # the rows as they are
    ema: float = field(0.0, _number(0.0, 0.999))
    # > 0: a prompt's concepts may not change the noise prediction outside their masks: the squared difference
    # there between the prediction with the current rows and with the starting rows (their words), with this
    # weight (losses.outside_loss; one more UNet pass per step, without gradient). The toy's 0.3: less leakage on 9
    # validation scenes at two fresh seeds, nothing lost (docs/concepts_back.md section 25)
    outside_weight: float = field(0.3, _number(0.0))

    @property
    def rounds(self) -> int:
        return -(-self.steps // self.estep_every)

    def round_steps(self, r: int) -> int:
        """Token steps of EM round r (0-based): estep_every, the last one what is left."""
        return min(self.estep_every, self.steps - r * self.estep_every)


@dataclasses.dataclass(frozen=True)
class Joint:
    """Stage 3: tokens and UNet (or its LoRA adapters; the text encoder optionally) with the masks fixed."""

    steps: int = field(400, _integer(0))
    lr: float = field(3e-5, _number(0.0, above=True))  # the toy model's; SD presets: 1e-4 (LoRA)
    text_encoder: bool = field(False, _boolean)
    remat: str = field("none", _choice(REMATS))  # "full" recomputes the UNet's activations, "dots" keeps matmuls
    optimizer: str = field("adamw", _choice(OPTIMIZERS))  # or low-memory "adamw_bf16" / "adafactor"
    checkpoint_every: int = field(100, _integer(0))  # joint steps between checkpoints; 0 = only at the end
    clip: float = field(1.0, _number(0.0, above=True))  # global gradient-norm clip of the joint optimiser
    weight_decay: float = field(1e-2, _number(0.0))
    lora_rank: int = field(0, _integer(0))  # 0: the whole UNet is tuned; r > 0: LoRA adapters (model/lora.py)
    lora_alpha: float = field(4.0, _number(0.0, above=True))  # the adapters' output is scaled by alpha / rank
    lora_targets: str = field("attention", _lora_targets)  # "attention" (q, k, v, out), "+ff", "+proj"
    # False: the joint stage draws only prompts naming no background concept (the UNet is never tuned on the
    # source background's pixels); the token stage still learns the background token
    background_prompts: bool = field(True, _boolean)

    @property
    def lora(self):
        """The adapters' spec, or None when the whole UNet is tuned."""
        from .model import lora

        return lora.LoraSpec(self.lora_rank, self.lora_alpha, lora_targets(self.lora_targets)) \
            if self.lora_rank else None


@dataclasses.dataclass(frozen=True)
class Devices:
    """The device mesh (config group `mesh`): (data, fsdp) over all devices; fsdp > 1 splits the joint stage's
    UNet, gradients and optimiser state over groups of fsdp devices (the frozen UNet too with shard_frozen)."""

    fsdp: int = field(1, _integer(1))
    shard_frozen: bool = field(False, _boolean)
    fsdp_min_size: int = field(2 ** 14, _integer(0))  # arrays smaller than this stay replicated


@dataclasses.dataclass(frozen=True)
class Prior:
    """Optional prior preservation: a folder of class images and their prompt."""

    folder: str = field("", _text)
    prompt: str = field("a photo at the beach", _text)
    weight: float = field(1.0, _number(0.0))


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = field("toy", _model)  # "toy", "tiny", a diffusers folder or a hub id
    dtype: str = field("float32", _choice(DTYPES))
    # self-attention computed in chunks (diffusers' Flax memory-efficient attention) in every training step: the
    # attention matrices of the finest levels (4096 x 4096 per head for SD at 512 px) are never held whole
    memory_efficient_attention: bool = field(False, _boolean)
    seed: int = field(0, _integer(0, 2 ** 63 - 1))  # what JAX's keys (int64) and NumPy's generators (>= 0) take
    mode: str = field("em", _choice(MODES))  # "em" re-estimates the masks, "attention" keeps stage 1's, "user"
    # images and their concepts: [{"path", "concepts": [{"token", "init_word", "kind", "mask"}]}]; empty = the
    # bundled toy scene (or what --concepts names)
    images: tuple = field(None, _images, factory=list)
    resolution: int = field(0, _integer(0))  # images are centre-cropped and resized to this; 0 = the model's own
    resize: str = field("crop", _choice(RESIZE_MODES))  # "pad" keeps the whole image (the padding in no mask)
    template: str = field("a {}", _template)  # prompts: template.format(joiner.join(tokens))
    joiner: str = field(" and a ", _text)
    flip_prob: float = field(0.5, _number(0.0, 1.0))
    # probability that a drawn prompt naming no background concept is trained on its objects put on a plain random
    # background instead of the source one (latent composite with the masks; em/data.swap_background); 0 = never
    background_swap: float = field(0.0, _number(0.0, 1.0))
    background_swap_stages: str = field("both", _choice(SWAP_STAGES))  # "joint": the UNet's tuning only
    # > 0: both stages also train on this many zoomed views of each image (a random square crop, its side at least
    # zoom_min of the image's, resized back; the masks cut alike each round; em/data.zoom_windows), each view drawn
    # as often as the image itself; 0 = the image only (with its flip)
    zoom_views: int = field(0, _integer(0))
    zoom_min: float = field(0.7, _number(0.1, 1.0))
    # > 0: both stages' diffusion losses weight each sample by Min-SNR-gamma (model/diffusion.min_snr_weights), as
    # the toy model was trained (gamma 5; docs/concepts_back.md section 21); 0 = every timestep alike (Break-a-Scene's,
    # the SD presets')
    min_snr_gamma: float = field(5.0, _number(0.0))
    log_every: int = field(10, _integer(1))
    init: Init = dataclasses.field(default_factory=Init)
    masks: Masks = dataclasses.field(default_factory=Masks)
    tokens: Tokens = dataclasses.field(default_factory=Tokens)
    joint: Joint = dataclasses.field(default_factory=Joint)
    mesh: Devices = dataclasses.field(default_factory=Devices)
    prior: Prior = dataclasses.field(default_factory=Prior)
    config_json: str = ""  # the config as given (config.json of the run); not a config field

    @property
    def refit_steps(self) -> int:
        """Token steps of the refit after the EM rounds (`tokens.refit`, mode em only; the others' masks never
        change, so a refit would repeat the token stage)."""
        return self.tokens.steps if self.tokens.refit and self.mode == "em" else 0

    @property
    def total_steps(self) -> int:
        return self.init.steps + self.tokens.steps + self.refit_steps + self.joint.steps

    def result_fields(self) -> dict:
        """The fields that decide a run's results (a run folder's fingerprint): all but logging, devices and
        checkpoint spacing."""
        out = json.loads(self.config_json)
        for name in ("log_every", "mesh", "images"):
            out.pop(name, None)
        joint = out.get("joint", {})
        joint.pop("checkpoint_every", None)
        # fields added later are left out at their neutral value, so that runs made before them still match
        if not joint.get("lora_rank"):  # the adapters' settings decide nothing then
            for name in ("lora_rank", "lora_alpha", "lora_targets"):
                joint.pop(name, None)
        for name in ("background_swap", "min_snr_gamma", "zoom_views"):
            if not out.get(name):
                out.pop(name, None)
        if not out.get("zoom_views"):
            out.pop("zoom_min", None)
        if out.get("background_swap_stages", "both") == "both":
            out.pop("background_swap_stages", None)
        if joint.get("background_prompts", True):
            joint.pop("background_prompts", None)
        for name in ("refit", "attn_all_vectors", "ema", "outside_weight"):
            if not out.get("tokens", {}).get(name):
                out.get("tokens", {}).pop(name, None)
        if not out.get("memory_efficient_attention"):
            out.pop("memory_efficient_attention", None)
        if not out.get("masks", {}).get("timestep_chunk"):
            out.get("masks", {}).pop("timestep_chunk", None)
        return out


GROUP_CLASSES = {f.name: f.default_factory for f in dataclasses.fields(Settings) if f.name in
                 ("init", "masks", "tokens", "joint", "mesh", "prior")}


def _declared(cls, prefix: str = "") -> dict:
    """{field name: dataclasses.Field} of the config fields of `cls` (a group's, or the top level's)."""
    return {f"{prefix}{f.name}": f for f in dataclasses.fields(cls) if "rule" in f.metadata}


RULES: dict[str, Callable[[Any], str | None]] = {
    name: f.metadata["rule"] for name, f in
    [*_declared(Settings).items(), *(x for g, cls in GROUP_CLASSES.items() for x in _declared(cls, g + ".").items())]}


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def default_config():
    """The learner's default ml_collections config, built from the declarations above."""
    import ml_collections

    c = ml_collections.ConfigDict({name: _default(f) for name, f in _declared(Settings).items()})
    for group, cls in GROUP_CLASSES.items():
        c[group] = ml_collections.ConfigDict({f.name: _default(f) for f in _declared(cls).values()})
    return c


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
    top = {name: flat[name] for name in _declared(Settings)}
    top["images"] = tuple(top["images"])
    text = cfg.to_json(indent=2) if hasattr(cfg, "to_json") else json.dumps(cfg, indent=2)
    groups = {group: _group(cls, flat, group) for group, cls in GROUP_CLASSES.items()}
    return Settings(**top, **groups, config_json=text)
