"""A finished learning run, loaded back for generation and evaluation: the base model with the run's
concept tokens added, their learned rows, and the tuned UNet (or its LoRA adapters, merged) and text encoder when
the run has them."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from ..model import adapter, conditioning, lora, tokens
from . import outputs, runfolder
from ..errors import JaxconceptError
from ..model.loading import ModelBundle, load_model


@dataclasses.dataclass(frozen=True)
class Adapted:
    """A LoRA run's UNet: the adapters, their spec and the base UNet's params (on the host, for export)."""

    adapters: dict
    spec: lora.LoraSpec
    base_unet: dict


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    bundle: ModelBundle  # tokenizer knows the concept tokens; params["unet"] is the tuned UNet if any
    tokens: tuple[str, ...]
    concept_ids: jnp.ndarray  # N
    rows_NxD: jnp.ndarray
    run_dir: str
    counts: tuple[int, ...] = ()  # vectors per token (empty: one each)
    adapted: Adapted | None = None  # a LoRA run's adapters (bundle.params["unet"] has them merged)

    def hidden_states(self, ids_BxT):
        """Text conditioning with the learned rows spliced in (SDXL: a `conditioning.SDXLCondition` for images
        of the model's resolution)."""
        return conditioning.encode(conditioning.text_model(self.bundle), self.bundle.params, ids_BxT,
                                   self.concept_ids, self.rows_NxD, conditioning.image_time_ids(self.bundle))


def load_run(run_dir: str, bundle: ModelBundle | None = None, dtype=jnp.float32) -> LoadedRun:
    """Load `run_dir` (written by `learner.learn`); `bundle` = its base model if already loaded."""
    if not os.path.isdir(run_dir):
        raise JaxconceptError(f"run folder {run_dir!r} does not exist: pass the --out folder of a "
                              "'python -m jaxconcept.train' run.")
    cfg_path = os.path.join(run_dir, "config.json")
    concepts_path = os.path.join(run_dir, "concepts.safetensors")
    for path in (cfg_path, concepts_path):
        if not os.path.isfile(path):
            raise JaxconceptError(f"{run_dir!r} is not a finished run folder: {os.path.basename(path)} is missing. "
                                  "Finish the run (start the same train command again to resume).")
    cfg = read_config(run_dir)
    rows, order = read_concepts(concepts_path)  # before the model loads: a damaged file is said at once
    bundle = bundle or load_model(cfg["model"], dtype, seed=cfg.get("seed", 0))
    bundle = with_tuned_text_encoders(run_dir, cfg, bundle)
    missing = [t for t in order if t not in rows]
    if missing:
        raise JaxconceptError(f"{concepts_path!r} lists {', '.join(missing)} but holds no embedding for it; the run "
                              "folder is damaged: start the same train command again to rewrite its results.")
    rows = {t: np.atleast_2d(rows[t]) for t in order}  # a token of n vectors is stored n x D
    bundle, concepts = tokens.add_concept_tokens(bundle, order, None, vectors=[len(rows[t]) for t in order])
    bundle, adapted = with_tuned_unet(run_dir, cfg, bundle, dtype)
    rows_NxD = jnp.asarray(np.concatenate([rows[t] for t in order]), dtype)
    return LoadedRun(bundle, tuple(order), concepts.ids_array, rows_NxD, os.path.abspath(run_dir), concepts.counts,
                     adapted)


def read_concepts(path: str) -> tuple[dict, list]:
    """(token -> rows, tokens in the run's order) of a run's concepts.safetensors. A missing or damaged file
    (cut off by a crash or a full disk, changed by hand) is a JaxconceptError that names it and says what to do."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise JaxconceptError(f"{os.path.dirname(path)!r} is not a finished run folder: {os.path.basename(path)} is "
                              "missing. Finish the run (start the same train command again to resume).")
    try:
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
            rows = {k: f.get_tensor(k) for k in f.keys()}
        order = json.loads(meta["tokens"]) if "tokens" in meta else sorted(rows)
        if not (isinstance(order, list) and all(isinstance(t, str) for t in order)):
            raise ValueError(f"its 'tokens' metadata is {meta['tokens'][:80]!r}, not a list of tokens")
        if not rows:
            raise ValueError("it holds no embedding")
    except (SafetensorError, OSError, ValueError) as e:
        raise JaxconceptError(
            f"cannot read the learned concepts {path!r} ({e}): the file is damaged (cut off by a crash or a full "
            "disk, or changed). Start the run's train command again with the same --out: a finished run writes its "
            "results again from its last checkpoint, without training again. Or copy the run folder again from "
            "where it was made.") from None
    return rows, order


def with_tuned_unet(run_dir: str, cfg: dict, bundle: ModelBundle, dtype) -> tuple[ModelBundle, Adapted | None]:
    """The base model with the run's tuned UNet: its unet/ folder, or its LoRA file merged into the base UNet."""
    unet_dir, lora_path = os.path.join(run_dir, "unet"), os.path.join(run_dir, outputs.LORA_FILE)
    joint = cfg.get("joint", {})
    if os.path.isfile(lora_path):
        adapters, spec = outputs.load_lora(lora_path, bundle.params["unet"])
        base = bundle.params["unet"]
        merged = jax.jit(lora.merge, static_argnums=2)(base, adapters, spec.scale)
        return bundle.replace(params={**bundle.params, "unet": merged}), Adapted(adapters, spec,
                                                                                jax.device_get(base))
    if not os.path.isdir(unet_dir) and joint.get("steps", 0):
        what = outputs.LORA_FILE if joint.get("lora_rank", 0) else "unet/"
        raise JaxconceptError(f"{run_dir!r} is incomplete: its config tunes the UNet ({joint['steps']} joint "
                              f"steps) but {what} is missing. Start the same train command again to finish it.")
    if not os.path.isdir(unet_dir):
        return bundle, None
    try:
        _, unet_params = adapter.load_flax_unet(unet_dir, dtype)
    except (OSError, ValueError, EnvironmentError) as e:
        raise JaxconceptError(f"cannot read the tuned UNet in {unet_dir!r} ({e}); the run folder is damaged: "
                              "delete unet/ and start the same train command again to rewrite it.") from e
    return bundle.replace(params={**bundle.params, "unet": unet_params}), None


def with_tuned_text_encoders(run_dir: str, cfg: dict, bundle: ModelBundle) -> ModelBundle:
    """The base model with the run's tuned text encoders (joint.text_encoder: text_encoder/, and SDXL's
    text_encoder_2/), when the run has them."""
    joint, tuned = cfg.get("joint", {}), {}
    for name, like in conditioning.text_params(bundle.params).items():
        folder = os.path.join(run_dir, name)
        if not os.path.isdir(folder):
            if joint.get("text_encoder") and joint.get("steps", 0):
                raise JaxconceptError(f"{run_dir!r} is incomplete: its config tunes the text encoders but {name}/ "
                                      "is missing. Start the same train command again to finish it.")
            continue
        try:
            tuned[name] = jax.device_put(runfolder.load_text_encoder(folder, like))
        except (OSError, ValueError, KeyError) as e:
            raise JaxconceptError(f"cannot read the tuned text encoder in {folder!r} ({e}); the run folder is "
                                  f"damaged: delete {name}/ and start the same train command again.") from e
    return bundle.replace(params={**bundle.params, **tuned}) if tuned else bundle


def read_config(run_dir: str) -> dict:
    """The run's resolved config (config.json), with at least its model."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
        cfg["model"]
        return cfg
    except (OSError, ValueError, KeyError) as e:
        raise JaxconceptError(f"{run_dir!r}: cannot read its config.json ({e}); is it a run folder?") from e


def read_summary(run_dir: str) -> dict:
    """The summary.json a finished run ends with."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        raise JaxconceptError(f"{run_dir!r} has no summary.json: it is not a finished run. Start its train "
                              "command again to finish it.")
    try:
        with open(path) as f:
            summary = json.load(f)
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
        return summary
    except (OSError, ValueError) as e:
        raise JaxconceptError(f"cannot read {path!r} ({e}): the file is damaged. Start the run's train command "
                              "again with the same --out: a finished run writes its results again from its last "
                              "checkpoint, without training again.") from e


def listed_concepts(summary: dict) -> list[dict]:
    """Each concept's {"token", "kind", ...} (runs written before kinds were recorded: all objects)."""
    return summary.get("concepts") or [{"token": t, "kind": "object"} for t in summary["tokens"]]


def object_concepts(listed: list):
    """The object concepts (what prompts name), or all of them when a run has only backgrounds."""
    kind = lambda c: c.get("kind", "object") if isinstance(c, dict) else c.kind  # noqa: E731
    return [c for c in listed if kind(c) == "object"] or list(listed)
