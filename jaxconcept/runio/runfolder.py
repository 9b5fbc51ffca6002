"""A run folder's files: fingerprint and lock, config and input images, metrics, results.

    run.json            fingerprint of what decides the results (image and mask contents, concepts, the
                        result fields of the config) and whether the run finished
    .lock               held by the process that runs (pid, host); a stale one (its process is gone) is taken
    config.json, images/, metrics.jsonl, masks/round_NN/, masks/final/, overlays/, masks_evolution.png,
    concepts.safetensors, unet/ (joint tuning) or lora.safetensors (joint.lora_rank), text_encoder/ (joint.text_encoder;
    SDXL: text_encoder/ and text_encoder_2/), summary.json

Starting on a folder whose fingerprint differs is refused before anything is written. On a resume the
metrics past the checkpoint are dropped, so no entry is written twice. Only process 0 writes these
files (multi-host); every process writes the checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time

import flax.serialization
import jax
import numpy as np

from ..masks import estep, labels as masks, settle
from ..model import adapter, conditioning, tokens
from ..parallel import distributed
from . import images, inputs, outputs
from ..errors import JaxconceptError


class RunFolderError(JaxconceptError):
    """A run folder that holds another run, or that another process is using."""


# ------------------------------------------------------------------------------------------ fingerprint

def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def fingerprint(settings, specs) -> dict:
    """{"images", "concepts", "config"[, "prior"]}: what a run's results depend on (specs already checked);
    "prior": the prior-preservation images' names and contents, when `prior.folder` is set (runs without
    one have no such key, as before it was recorded)."""
    imgs = [_file_hash(s.path) for s in specs]
    concepts = [[[c.token, c.init_word, c.kind, None if not c.mask else _file_hash(c.mask)] for c in s.concepts]
                for s in specs]
    fp = {"images": imgs, "concepts": concepts, "config": settings.result_fields()}
    if settings.prior.folder:
        fp["prior"] = [[os.path.basename(p), _file_hash(p)] for p in inputs.prior_files(settings.prior.folder)]
    return fp


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    if old.get("images") != new["images"]:
        out.append("image contents")
    if old.get("concepts") != new["concepts"]:
        out.append("concepts or their masks")
    if old.get("prior") != new.get("prior"):
        out.append("the prior-preservation images (prior.folder's files or their contents)")
    flat_old, flat_new = _flat(old.get("config", {})), _flat(new["config"])
    fields = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
    if fields:
        out.append("config " + ", ".join(f"{k} ({flat_old.get(k)!r} then, {flat_new.get(k)!r} now)" for k in fields))
    return out


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def read_record(folder: str) -> dict | None:
    """The folder's run.json, None when it has none; a damaged one is a RunFolderError naming it."""
    path = os.path.join(folder, "run.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), dict):
            raise ValueError("no fingerprint in it")
        return record
    except (OSError, ValueError) as e:
        raise RunFolderError(
            f"{path!r} is damaged ({type(e).__name__}: {e}). It records what the run in {folder!r} was made from "
            "(images, concepts, config), so whether this command may resume it cannot be checked. Restore the file "
            "(from a backup), or give another --out to start fresh; nothing was written.") from e


def _what_is_there(folder: str, entries: list[str]) -> str:
    """The folder's entries for a message, and what they look like."""
    shown = ", ".join(e + ("/" if os.path.isdir(os.path.join(folder, e)) else "") for e in sorted(entries)[:6])
    if len(entries) > 6:
        shown += f" and {len(entries) - 6} more"
    looks = ""
    if "model_index.json" in entries:
        looks = ": a diffusers pipeline folder (an export of a run, or a model)"
    elif os.path.isfile(os.path.join(folder, "config.json")) and any(
            e.startswith(("diffusion_", "flax_model", "pytorch_model", "model.safetensors")) for e in entries):
        looks = ": a model folder"
    elif any(e.startswith("job_") for e in entries):
        looks = ": the job folders of a batch of jobs, without its run.json"
    return shown + looks


def _has_checkpoints(folder: str) -> bool:
    ckpt = os.path.join(folder, "checkpoints")
    return os.path.isdir(ckpt) and any(not e.startswith(".") for e in os.listdir(ckpt))


def check_fingerprint(folder: str, fp: dict, retrain: bool = False) -> str | None:
    """Refuse, before anything is written: a folder that is not a run folder and not empty, one with a
    damaged run.json, one that holds a run of other inputs or settings, and a finished run whose checkpoints
    are gone (it would be trained again from scratch, over its results) unless `retrain`. Returns a note for
    the user when the run will start from the beginning over an earlier run's files (None otherwise)."""
    if not os.path.isdir(folder):
        return None
    old = read_record(folder)
    if old is None:
        if _has_checkpoints(folder):
            raise RunFolderError(f"{folder!r} holds checkpoints but no run.json: it was written by an older version "
                                 "of jaxconcept and cannot be resumed. Give another --out, or delete the folder.")
        found = [e for e in os.listdir(folder) if not e.startswith(".")]  # .lock, .DS_Store: not a run's files
        if found:
            raise RunFolderError(
                f"{folder!r} is not a run folder (it has no run.json) and is not empty: it holds "
                f"{_what_is_there(folder, found)}. Training would write its files among these; nothing was "
                "written. Give --out a new or empty folder (or one of an earlier train run, to resume it).")
        return None
    diff = _differences(old.get("fingerprint", {}), fp)
    if diff:
        raise RunFolderError(
            f"{folder!r} holds another run (it differs in {'; '.join(diff)}); nothing was written. To start "
            f"fresh, give another --out or delete {folder}; to resume that run, start it with its own inputs and "
            f"config (see {os.path.join(folder, 'config.json')}).")
    if _has_checkpoints(folder):
        return None
    results = old.get("finished") or os.path.isfile(os.path.join(folder, "summary.json"))
    if results and not retrain:
        raise RunFolderError(
            f"{folder!r} holds a finished run whose checkpoints/ are gone: its results (concepts.safetensors, "
            "masks/final/, summary.json) are there and usable as they are (generate, evaluate and export read "
            "them), but the run cannot be resumed, and starting it again would train it from scratch, every stage, "
            "and overwrite them. Nothing was written. To train it again, add --retrain (Python: retrain=True); "
            "or give another --out.")
    if results:
        return (f"{folder!r}: its checkpoints/ are gone; training it again from scratch (--retrain): its results "
                "will be overwritten at the end.")
    if os.path.isfile(os.path.join(folder, "metrics.jsonl")):
        return f"{folder!r} has no checkpoint (none made yet, or checkpoints/ deleted): starting from the beginning."
    return None


def write_record(folder: str, fp: dict, finished: bool) -> None:
    if distributed.is_primary():
        outputs.write_json(os.path.join(folder, "run.json"), {"fingerprint": fp, "finished": finished})


# ------------------------------------------------------------------------------------------ lock

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: str) -> dict | None:
    """The lock's {"pid", "host"}, or None when it is stale (its process gone, or unreadable)."""
    try:
        with open(path) as f:
            held = json.load(f)
    except (OSError, ValueError):
        return None
    if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", -1))):
        return None
    return held


@contextlib.contextmanager
def locked(folder: str):
    """Hold `folder/.lock` while the run goes (process 0 only); a second run on the folder is refused."""
    if not distributed.is_primary():
        yield
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            held = _holder(path)
            if held is not None:
                raise RunFolderError(f"{folder!r} is in use by another run (process {held.get('pid')} on "
                                     f"{held.get('host')}): wait for it to end, or stop it. If no run is going, "
                                     f"delete {path}.") from None
            os.remove(path)  # stale: its process is gone
    else:
        raise RunFolderError(f"cannot take the lock {path!r}; delete it if no run is going.")
    with os.fdopen(fd, "w") as f:
        f.write(me)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


# ------------------------------------------------------------------------------------------ start, metrics

def start(run_dir: str, settings, setup) -> None:
    """Write the run's config.json and input images (process 0)."""
    if not distributed.is_primary():
        return
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "config.json")
    with open(cfg_path + ".tmp", "w") as f:
        f.write(settings.config_json)
    os.replace(cfg_path + ".tmp", cfg_path)
    for i, name in enumerate(setup.inputs.names):
        images.save_image(setup.images_u8[i], os.path.join(run_dir, "images", f"{name}.png"))


def _position(entry: dict) -> int:
    """Steps done when an entry was written (round entries: their checkpoint index)."""
    return int(entry["index"] if "round" in entry else entry.get("step", 0))


class Metrics:
    """metrics.jsonl, kept to the entries up to a checkpoint when a run resumes (process 0 writes). A line
    that cannot be read (what a crash or a full disk leaves at the end) is dropped; `note` says so."""

    def __init__(self, run_dir: str, through: int | None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.note = None
        kept, bad = [], []
        if through is not None and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                lines = [line for line in f if line.strip()]
            for n, line in enumerate(lines, 1):
                try:
                    entry = json.loads(line)
                    if isinstance(entry, dict) and _position(entry) <= through:
                        kept.append(entry)
                    elif not isinstance(entry, dict):
                        raise ValueError("not an entry")
                except (ValueError, KeyError, TypeError):
                    bad.append(n)
            if bad:
                where = (f"its last line ({bad[0]}), cut off" if bad == [len(lines)]
                         else f"{len(bad)} damaged line(s) ({', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})")
                self.note = (f"{self.path}: dropped {where} (what an interrupted write leaves); the entries up to "
                             f"the checkpoint are kept.")
        self.rounds = [e for e in kept if "round" in e]
        self.file = None
        self._rewrite(run_dir, kept)

    def _rewrite(self, run_dir: str, entries: list) -> None:
        if distributed.is_primary():
            if self.file is not None:
                self.file.close()
            os.makedirs(run_dir, exist_ok=True)
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(e) + "\n" for e in entries)
            os.replace(self.path + ".tmp", self.path)
            self.file = open(self.path, "a")

    def add_rounds(self, entries: list) -> None:
        """Round entries rebuilt after the fact (`learner.recover_round_entries`), put in their place."""
        if not entries:
            return
        self.rounds = sorted(self.rounds + list(entries), key=lambda e: e["round"])
        kept = []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                kept = [json.loads(line) for line in f if line.strip()]
        self._rewrite(os.path.dirname(self.path), sorted(kept + list(entries), key=_position))

    def write(self, entry: dict) -> None:
        if "round" in entry:
            self.rounds.append(entry)
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def round_masks(run_dir, setup, n_rounds: int) -> list[np.ndarray]:
    """The masks of rounds 0..n_rounds as the run wrote them (masks/round_NN)."""
    names, owner_C = setup.inputs.names, np.asarray(setup.inputs.owner_C)
    token_names = outputs.file_names(setup.concepts.tokens)
    return [outputs.load_masks(os.path.join(run_dir, "masks", f"round_{r:02d}"), names, token_names, owner_C)
            for r in range(n_rounds + 1)]


def unreadable_rounds(run_dir, setup, n_rounds: int) -> list[int]:
    """The rounds among 0..n_rounds whose masks/round_NN files are missing or cannot be read."""
    names, owner_C = setup.inputs.names, np.asarray(setup.inputs.owner_C)
    token_names = outputs.file_names(setup.concepts.tokens)
    out = []
    for r in range(n_rounds + 1):
        try:
            outputs.load_masks(os.path.join(run_dir, "masks", f"round_{r:02d}"), names, token_names, owner_C)
        except (OSError, ValueError, SyntaxError):
            out.append(r)
    return out


def save_round_masks(run_dir, setup, token_names, r: int, masks_CxHxW) -> None:
    if distributed.is_primary():
        outputs.save_masks(os.path.join(run_dir, "masks", f"round_{r:02d}"), setup.inputs.names, token_names,
                           np.asarray(setup.inputs.owner_C), masks_CxHxW)


# ------------------------------------------------------------------------------------------ results

def summary_of(run_dir, settings, setup, masks_final, history, truth, seconds) -> dict:
    names, owner_C = setup.inputs.names, np.asarray(setup.inputs.owner_C)
    token_names = outputs.file_names(setup.concepts.tokens)
    summary = {
        "run": os.path.abspath(run_dir), "mode": settings.mode, "model": setup.bundle.source,
        "images": list(names), "tokens": list(setup.concepts.tokens), "seconds": round(seconds, 1),
        "rounds": len(history) - 1,
        "mask_area": {t: float(m.mean()) for t, m in zip(setup.concepts.tokens, masks_final)},
        # what evaluation needs to find each concept's reference: its image, final mask file and kind
        "concepts": [{"token": t, "kind": k, "init_word": w, "image": f"images/{names[owner_C[c]]}.png",
                      "mask": f"masks/final/{names[owner_C[c]]}__{token_names[c]}.png"}
                     for c, (t, k, w) in enumerate(zip(setup.concepts.tokens, setup.inputs.kinds,
                                                       setup.concepts.init_words))],
        "template": settings.template, "joiner": settings.joiner,
    }
    summary["mask_change_by_round"] = [h.get("mask_change") for h in history[1:]]
    if settings.mode == "em" and len(history) > 1:
        summary["final_round"] = settle.final_round(round_masks(run_dir, setup, len(history) - 1))
    tied = estep.tied_concepts(setup)
    if tied:
        summary["warning"] = settle.tie_warning(tied, setup.concepts.tokens, setup.concepts.init_words)
    if truth is not None:
        summary["iou_final"] = dict(zip(setup.concepts.tokens, masks.matched_ious(masks_final, truth, tied)))
        if tied:
            summary["iou_matching"] = estep.MATCHING_NOTE
            # which concept's true region each tied token learned: what its samples are to be judged against
            summary["matched_to"] = {t: setup.concepts.tokens[m] for t, m in
                                     zip(setup.concepts.tokens, masks.matched_truths(masks_final, truth, tied))}
        summary["iou_by_round"] = [h.get("mean_iou") for h in history]
        summary["iou_no_crf_by_round"] = [h.get("mean_iou_no_crf") for h in history]
    return summary


def write_results(run_dir, settings, setup, final, masks_final, history, truth, seconds) -> dict:
    """The run's files (process 0 only) and its summary; `final` = {"rows", "unet" or "lora", "text_encoder" (and
    SDXL's "text_encoder_2") if tuned} on the host. `history`: the round entries of metrics.jsonl."""
    summary = summary_of(run_dir, settings, setup, masks_final, history, truth, seconds)
    if not distributed.is_primary():
        return summary
    names, owner_C = setup.inputs.names, np.asarray(setup.inputs.owner_C)
    token_names = outputs.file_names(setup.concepts.tokens)
    outputs.save_masks(os.path.join(run_dir, "masks", "final"), names, token_names, owner_C, masks_final)
    for i, name in enumerate(names):
        mine = np.flatnonzero(owner_C == i)
        images.save_image(outputs.color_overlay(setup.images_u8[i], masks_final[mine]),
                          os.path.join(run_dir, "overlays", f"{name}.png"))
    rounds = round_masks(run_dir, setup, len(history) - 1)
    images.save_image(outputs.evolution_picture(setup.images_u8, owner_C, rounds, setup.concepts.tokens),
                      os.path.join(run_dir, "masks_evolution.png"))
    outputs.save_concepts(os.path.join(run_dir, "concepts.safetensors"), setup.concepts.tokens,
                          np.asarray(final["rows"]), setup.concepts.init_words, setup.concepts.counts)
    if "unet" in final:
        adapter.save_flax_unet(os.path.join(run_dir, "unet"), setup.bundle.unet, final["unet"])
    if "lora" in final:
        outputs.save_lora(os.path.join(run_dir, outputs.LORA_FILE), final["lora"], settings.joint.lora,
                          setup.bundle.params["unet"])
    for name in conditioning.text_params(final):  # joint.text_encoder: SD's one, SDXL's two (text_encoder_2/)
        save_text_encoder(os.path.join(run_dir, name), final[name], setup.concepts.ids)
    outputs.write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary


TEXT_ENCODER_FILE = "flax_params.msgpack"


def save_text_encoder(folder: str, text_params, concept_ids) -> None:
    """The tuned text encoder's params with the base vocabulary (the concept rows live in
    concepts.safetensors; the rows added for the tokens are dropped)."""
    table = np.asarray(tokens.embedding_table(text_params))
    base = tokens.with_embedding_table(text_params, table[:min(concept_ids)])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, TEXT_ENCODER_FILE), "wb") as f:
        f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, base)))


def load_text_encoder(folder: str, like_params):
    """The tuned text encoder saved by `save_text_encoder`, shaped like `like_params` (the base model's)."""
    with open(os.path.join(folder, TEXT_ENCODER_FILE), "rb") as f:
        state = flax.serialization.msgpack_restore(f.read())
    return flax.serialization.from_state_dict(like_params, state)
