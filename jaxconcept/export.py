"""Export of a finished learning run to PyTorch diffusers, written without torch.

    OUT/embeddings/<token>.safetensors   one file per concept token, {token: row (D,) float32}: what
                                         `pipe.load_textual_inversion(file)` takes (the key names the token)
    OUT/tokens.json                      tokens, their files, the base model, whether the UNet is tuned
    OUT/README.md                        how to load it all in PyTorch
    OUT/unet/config.json                 the run's tuned UNet (the base UNet if the run tuned none) as a
    OUT/unet/diffusion_pytorch_model.safetensors   diffusers UNet2DConditionModel folder
    OUT/lora.safetensors                 a LoRA run's adapters (PEFT layout, `pipe.load_lora_weights(OUT)`); its
                                         unet/ is the base UNet, written only with the pipeline
  with pipeline=True (the default), the rest of a StableDiffusionPipeline folder:
    OUT/vae/config.json + diffusion_pytorch_model.safetensors          the base VAE (AutoencoderKL)
    OUT/text_encoder/config.json + model.safetensors                   the CLIPTextModel (the run's tuned one if
                                                                       joint.text_encoder), base vocabulary:
                                                                       the tokens come from embeddings/
    OUT/tokenizer/                       the base tokenizer
    OUT/scheduler/scheduler_config.json  the base model's noise schedule
    OUT/model_index.json                 StableDiffusionPipeline, no safety checker
  SDXL runs: a StableDiffusionXLPipeline folder, with OUT/text_encoder_2/ (CLIPTextModelWithProjection, base) and
  OUT/tokenizer_2/ besides; each embeddings/<token>.safetensors holds {"clip_l": n x D1, "clip_g": n x D2}, the
  token's rows in the two tables (the run's N x (D1 + D2) rows split at `Concepts.widths`), loaded by two
  `load_textual_inversion` calls, the second with `text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2`.

Names are made by inverting diffusers' / transformers' PyTorch -> Flax rules (`adapter.flax_to_pt_key`) and every
one is run back through the forward rule our loader uses before anything is written.

    python -m jaxconcept.export --run RUN_DIR --out DIR [--no-pipeline] [--overwrite]

DIR must be empty or new; --overwrite replaces a non-empty DIR as a whole (the export is written into a
temporary sibling and renamed into place, so DIR never mixes two exports and an interrupted export leaves it
as it was). A DIR that is a link is followed: the folder it points to receives the export, the link stays.
Exit codes: 2 for a mistake in the command or the run folder, 1 when writing fails (a full disk), 130 on Ctrl-C;
in every case DIR is left as it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from .model import adapter
from .runio import outputs, runs
from .errors import JaxconceptError
from .model.loading import NAMED_MODELS, load_model
from .model.tokens import embedding_table

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "model.safetensors"
_PT_METADATA = {"format": "pt"}  # transformers refuses safetensors files without a known format
# the parameter names of PyTorch's Linear / Conv / norms / Embedding. The forward rules pass names they do not
# know through unchanged, so a Flax name left as it is ("…/kernel", "…/scale") would map back to itself:
# checked separately.
PT_PARAM_NAMES = ("weight", "bias")


class ExportError(JaxconceptError):
    """An export that would be wrong (a name that does not map back) or cannot be written."""


# ------------------------------------------------------------------------------------------ state dicts


def _as_numpy_f32(x) -> np.ndarray:
    return np.asarray(jax.device_get(x)).astype(np.float32, copy=False)


def flax_to_pt_state(
    params: Mapping, shapes: Mapping, rename: Callable = adapter.flax_to_pt_key, *,
    forward: Callable = adapter.pt_to_flax_key, what: str = "model",
) -> dict[str, np.ndarray]:
    """PyTorch state dict (name -> float32 array in PyTorch layout) of Flax `params`.

    rename: (flax tuple key, array) -> (PyTorch name, array), the inverse naming rule;
    forward: (PyTorch name, array, flat shapes) -> (flax tuple key, array), the rule the loader uses.
    Every entry must be named like a PyTorch parameter (PT_PARAM_NAMES) and map back to its own Flax key with
    the same values, else ExportError: nothing is returned that the loader would read differently.
    (Not caught: a list index left as "<name>_<n>", which the forward rule treats like "<name>.<n>";
    tests/test_export.py compares the names with PyTorch's modules for that.)
    """
    flat_params, flat_shapes = flatten_dict(params), flatten_dict(shapes)
    if set(flat_params) != set(flat_shapes):
        extra = sorted("/".join(k) for k in set(flat_params) - set(flat_shapes))
        missing = sorted("/".join(k) for k in set(flat_shapes) - set(flat_params))
        raise ExportError(f"{what}: the params do not belong to the module being exported "
                          f"(extra {extra[:3]}, missing {missing[:3]}).")
    state: dict[str, np.ndarray] = {}
    owner: dict[str, tuple] = {}
    for key in sorted(flat_params):
        value = _as_numpy_f32(flat_params[key])
        pt_name, pt_value = rename(key, value)
        if pt_name in owner:
            raise ExportError(f"{what}: Flax parameters {'/'.join(owner[pt_name])} and {'/'.join(key)} both "
                              f"export as {pt_name!r}; the Flax -> PyTorch naming rule is wrong.")
        _check_round_trip(key, value, pt_name, np.asarray(pt_value), flat_shapes, forward, what)
        owner[pt_name] = key
        state[pt_name] = np.ascontiguousarray(pt_value, np.float32)
    return state


def _check_round_trip(key, value, pt_name, pt_value, flat_shapes, forward, what) -> None:
    if pt_name.rsplit(".", 1)[-1] not in PT_PARAM_NAMES:
        raise ExportError(
            f"{what}: Flax parameter {'/'.join(key)} would be written as {pt_name!r}, which is no PyTorch parameter "
            f"name (those end in {' or '.join(PT_PARAM_NAMES)}). This is a bug in the Flax -> PyTorch naming "
            "(jaxconcept.model.adapter.flax_to_pt_key); nothing was written."
        )
    try:
        back_key, back = forward(pt_name, pt_value, flat_shapes)
        if tuple(back_key) != tuple(key):
            problem = f"maps that name back to {'/'.join(back_key)}"
        elif np.shape(back) != value.shape or not np.array_equal(back, value):
            problem = f"maps it back with other values (shape {tuple(np.shape(back))}; a wrong transpose?)"
        else:
            return
    except Exception as e:  # diffusers' rule asserts on attention shapes; any failure is a naming bug here
        problem = f"fails on it ({type(e).__name__}: {e})"
    raise ExportError(
        f"{what}: Flax parameter {'/'.join(key)} would be written as {pt_name!r} {tuple(pt_value.shape)}, but the "
        f"PyTorch -> Flax rule our loader uses {problem}; PyTorch would load a wrong model. This is a bug in the "
        "Flax -> PyTorch naming (jaxconcept.model.adapter.flax_to_pt_key); nothing was written."
    )


def _save_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    tmp = path + ".tmp"
    save_file(dict(tensors), tmp, metadata=_PT_METADATA)
    os.replace(tmp, path)  # never a half-written weights file under the real name


def _save_pt_component(folder: str, config: dict, weights_name: str, state: Mapping[str, np.ndarray]) -> dict:
    os.makedirs(folder, exist_ok=True)
    outputs.write_json(os.path.join(folder, "config.json"), config)
    _save_safetensors(os.path.join(folder, weights_name), state)
    return {"folder": folder, "tensors": len(state), "parameters": int(sum(v.size for v in state.values()))}


def save_unet_pytorch(folder: str, unet_module, params) -> dict:
    """`folder`/config.json + diffusion_pytorch_model.safetensors, for `UNet2DConditionModel.from_pretrained`."""
    state = flax_to_pt_state(params, adapter.param_shapes(unet_module), what="UNet")
    return _save_pt_component(folder, adapter.pt_unet_config(unet_module), DIFFUSERS_WEIGHTS, state)


def save_vae_pytorch(folder: str, vae_module, params) -> dict:
    """`folder`/config.json + diffusion_pytorch_model.safetensors, for `AutoencoderKL.from_pretrained`."""
    state = flax_to_pt_state(params, adapter.param_shapes(vae_module), what="VAE")
    return _save_pt_component(folder, adapter.pt_vae_config(vae_module), DIFFUSERS_WEIGHTS, state)


def save_text_encoder_pytorch(folder: str, text_module, params) -> dict:
    """`folder`/config.json + model.safetensors, for transformers' `CLIPTextModel.from_pretrained`."""
    state = flax_to_pt_state(params, adapter.param_shapes(text_module),
                             adapter.flax_to_pt_text_key, forward=adapter.pt_to_flax_text_key, what="text encoder")
    return _save_pt_component(folder, adapter.pt_text_config(text_module), TEXT_WEIGHTS, state)


def save_textual_inversion(folder: str, tokens: Sequence[str], rows_NxD, counts: Sequence[int] = (),
                           widths: Sequence[int] = ()) -> dict[str, str]:
    """One safetensors file per token; returns token -> file name.

    SD 1/2 (no `widths`): `{token: row_D}` float32 (diffusers' textual-inversion format: a single-key dict, the key
    names the token); a token of n vectors (`counts`) is `{token: n x D}`, which diffusers loads as
    `token token_1 ...` and writes out in prompts itself.
    SDXL (`widths` = (D1, D2), the two tables' widths, `Concepts.widths`): `{"clip_l": n x D1, "clip_g": n x D2}`,
    the rows split at D1, the layout of SDXL's textual-inversion files; each half is loaded by its own
    `load_textual_inversion` call (see `load_snippet`)."""
    rows_NxD = np.asarray(rows_NxD, np.float32)
    counts = list(counts) or [1] * len(tokens)
    if rows_NxD.ndim != 2 or len(counts) != len(tokens) or len(rows_NxD) != sum(counts):
        raise ExportError(f"{len(tokens)} tokens of {counts} vectors but embedding rows of shape {rows_NxD.shape}: "
                          "need one row per vector.")
    if widths and (len(widths) != 2 or sum(widths) != rows_NxD.shape[1]):
        raise ExportError(f"SDXL rows of width {rows_NxD.shape[1]} cannot be split into the two text encoders' "
                          f"tables of widths {tuple(widths)}: the run's rows do not belong to this base model.")
    os.makedirs(folder, exist_ok=True)
    files = {}
    tensors = outputs.token_tensors(tokens, rows_NxD, counts)
    for token, name in zip(tokens, outputs.file_names(tokens)):
        files[token] = f"{name}.safetensors"
        _save_safetensors(os.path.join(folder, files[token]), _token_file(token, tensors[token], widths))
    return files


def _token_file(token: str, rows, widths: Sequence[int]) -> dict[str, np.ndarray]:
    if not widths:
        return {token: rows}
    rows_nxE = np.atleast_2d(rows)  # SDXL files hold n x D even for one vector
    return {"clip_l": np.ascontiguousarray(rows_nxE[:, :widths[0]]),
            "clip_g": np.ascontiguousarray(rows_nxE[:, widths[0]:])}


def sdxl_widths(bundle) -> tuple[int, ...]:
    """(D1, D2), the widths of an SDXL model's two token tables; () for SD 1/2."""
    if not bundle.is_sdxl:
        return ()
    return tuple(int(embedding_table(bundle.params[k]).shape[1]) for k in ("text_encoder", "text_encoder_2"))


def save_pipeline_extras(out_dir: str, bundle) -> list[str]:
    """tokenizer/ (and SDXL's tokenizer_2/), scheduler/ and model_index.json of a StableDiffusionPipeline or
    StableDiffusionXLPipeline folder; the files written."""
    bundle.tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    written = ["tokenizer/"]
    if bundle.is_sdxl:
        bundle.tokenizer_2.save_pretrained(os.path.join(out_dir, "tokenizer_2"))
        written.append("tokenizer_2/")
    sched = adapter.pt_scheduler_config(bundle.scheduler_config)
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    outputs.write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), sched)
    index = adapter.pt_pipeline_index(sched["_class_name"], sdxl=bundle.is_sdxl)
    outputs.write_json(os.path.join(out_dir, "model_index.json"), index)
    return written + ["scheduler/scheduler_config.json", "model_index.json"]


# ------------------------------------------------------------------------------------------ run -> folder


def check_run_folder(run_dir: str) -> dict:
    """The run's config, after checking that the folder holds a finished run (before any slow loading)."""
    if not os.path.isdir(run_dir):
        raise ExportError(f"run folder {run_dir!r} does not exist: pass the --out folder of a finished "
                          "'python -m jaxconcept.train' run.")
    for name in ("config.json", "concepts.safetensors"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise ExportError(f"{run_dir!r} is not a finished run folder: {name} is missing. Finish the run "
                              "(start the same train command again to resume) and export again.")
    runs.read_concepts(os.path.join(run_dir, "concepts.safetensors"))  # a damaged file: said before any loading
    unet_dir = os.path.join(run_dir, "unet")
    if os.path.isdir(unet_dir):
        lacking = [f for f in ("config.json", "diffusion_flax_model.msgpack")
                   if not os.path.isfile(os.path.join(unet_dir, f))]
        if lacking:
            raise ExportError(f"the tuned UNet in {unet_dir!r} is incomplete ({', '.join(lacking)} missing): "
                              "start the same train command again to rewrite it.")
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {os.path.join(run_dir, 'config.json')}: {e}") from e
    if not isinstance(cfg, dict) or not cfg.get("model"):
        raise ExportError(f"{os.path.join(run_dir, 'config.json')} names no base model ('model'); "
                          "is it a jaxconcept run folder?")
    return cfg


def _check_out_dir(run_dir: str, out_dir: str, overwrite: bool) -> None:
    """Refuse an --out that is the run folder, holds it, is a file, or (without `overwrite`) is not empty.
    A link is followed: the export goes into the folder it points to (the link stays a link)."""
    run, out = os.path.realpath(run_dir), os.path.realpath(out_dir)
    if run == out:
        raise ExportError(f"--out {out_dir!r} is the run folder itself: its unet/ would be overwritten. "
                          "Choose another folder.")
    if os.path.commonpath([run, out]) == out:
        raise ExportError(f"--out {out_dir!r} holds the run folder {run_dir!r}: replacing it would delete the run. "
                          "Choose another folder.")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out_dir!r} is a file, not a folder. Choose another path.")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and not overwrite:
        shown = ", ".join(repr(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
        raise ExportError(f"--out {out_dir!r} is not empty ({count}: {shown}); nothing was written. "
                          "Choose a new folder, or pass --overwrite to replace its whole contents with this export.")
    try:
        outputs.check_writable(os.path.dirname(out))
    except JaxconceptError as e:
        raise ExportError(str(e)) from e


def staging_dir(out_dir: str, kind: str = "export") -> str:
    """An empty sibling `.NAME.<kind>-*` of `out_dir` (same file system, so the final rename is atomic)."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=f".{name}.{kind}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o777 & ~umask)  # mkdtemp makes it private; the output gets the usual permissions
    return staged


def swap_in(staged: str, out_dir: str) -> None:
    """Put the finished `staged` folder at `out_dir` (a real folder, links resolved by the caller); what was
    there is removed only once it has moved aside, so `out_dir` holds either the old contents or the new ones,
    never a mixture. Interrupted between the two renames, the old contents are put back."""
    out = os.path.abspath(out_dir)
    old = None
    if os.path.isdir(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(staged, out)
    except BaseException:
        if old is not None and not os.path.lexists(out):
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(run_dir: str, out_dir: str, *, pipeline: bool = True, overwrite: bool = False) -> dict:
    """Write the run as PyTorch diffusers files (see module docstring); returns a summary of what was written.

    `out_dir` must be empty or absent unless `overwrite`, which replaces its whole contents. Everything is
    written into a temporary sibling first and renamed into place at the end: an export that fails or is
    interrupted leaves `out_dir` as it was. An `out_dir` that is a link is followed: the export replaces the
    contents of the folder it points to, and the link stays."""
    cfg = check_run_folder(run_dir)
    _check_out_dir(run_dir, out_dir, overwrite)
    target = os.path.realpath(out_dir)
    staged = staging_dir(target)
    try:
        summary = _write_export(cfg, run_dir, staged, os.path.abspath(out_dir), pipeline)
        swap_in(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return summary


def _write_export(cfg: dict, run_dir: str, folder: str, out_dir: str, pipeline: bool) -> dict:
    """Write the export into `folder`; the summary and README name `out_dir`, where it will end up."""
    base = load_model(cfg["model"], "float32", seed=int(cfg.get("seed", 0)))
    run = runs.load_run(run_dir, bundle=base)  # grows a copy of the tokenizer/text encoder; `base` stays as is
    adapted = run.adapted
    state = "lora" if adapted else "tuned" if os.path.isdir(os.path.join(run_dir, "unet")) else "base"
    if state == "base":
        log.info("%s has no unet/ (no joint tuning): exporting the base model's UNet", run_dir)

    files = save_textual_inversion(os.path.join(folder, EMBEDDINGS), run.tokens, run.rows_NxD, run.counts,
                                   sdxl_widths(base))
    written = [f"{EMBEDDINGS}/{f}" for f in files.values()]
    unet = {"parameters": None}
    if adapted:  # the adapters beside the base UNet, as pipe.load_lora_weights reads them
        outputs.save_lora(os.path.join(folder, outputs.LORA_FILE), adapted.adapters, adapted.spec, adapted.base_unet)
        written.append(outputs.LORA_FILE)
    if pipeline or not adapted:  # a LoRA run's UNet is the base one: only a whole pipeline needs it
        params = adapted.base_unet if adapted else run.bundle.params["unet"]
        unet = save_unet_pytorch(os.path.join(folder, "unet"), run.bundle.unet, params)
        written += ["unet/config.json", f"unet/{DIFFUSERS_WEIGHTS}"]
    tuned_text = os.path.isdir(os.path.join(run_dir, "text_encoder"))
    if pipeline or tuned_text:  # a tuned text encoder is part of the run: written in any case
        text_params = runs.with_tuned_text_encoder(run_dir, cfg, base).params["text_encoder"]
        save_text_encoder_pytorch(os.path.join(folder, "text_encoder"), base.text_encoder, text_params)
        written += ["text_encoder/config.json", f"text_encoder/{TEXT_WEIGHTS}"]
    if pipeline and base.is_sdxl:  # SDXL's second encoder is never tuned (prepare refuses joint.text_encoder)
        save_text_encoder_pytorch(os.path.join(folder, "text_encoder_2"), base.text_encoder_2,
                                  base.params["text_encoder_2"])
        written += ["text_encoder_2/config.json", f"text_encoder_2/{TEXT_WEIGHTS}"]
    if pipeline:
        save_vae_pytorch(os.path.join(folder, "vae"), base.vae, base.params["vae"])
        written += ["vae/config.json", f"vae/{DIFFUSERS_WEIGHTS}"]
        written += save_pipeline_extras(folder, base)

    summary = {
        "run": os.path.abspath(run_dir), "out": out_dir, "base_model": cfg["model"], "sdxl": base.is_sdxl,
        "tokens": list(run.tokens), "files": {t: f"{EMBEDDINGS}/{f}" for t, f in files.items()},
        "unet": state, "unet_parameters": unet["parameters"], "pipeline": pipeline,
        "lora": None if not adapted else {"file": outputs.LORA_FILE, "rank": adapted.spec.rank,
                                          "alpha": adapted.spec.alpha, "targets": "+".join(adapted.spec.targets)},
        "text_encoder": "tuned" if tuned_text else "base",
    }
    outputs.write_json(os.path.join(folder, "tokens.json"), summary)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(readme(summary))
    summary["written"] = written + ["tokens.json", "README.md"]
    return summary


def pipeline_class(summary: dict) -> str:
    return "StableDiffusionXLPipeline" if summary.get("sdxl") else "StableDiffusionPipeline"


def load_snippet(summary: dict) -> str:
    """The Python lines that load the export in PyTorch diffusers."""
    out, cls = summary["out"], pipeline_class(summary)
    if summary["pipeline"]:
        head = f"pipe = diffusers.{cls}.from_pretrained({out!r})"
    else:  # the rest comes from the base model (named test models have no PyTorch original)
        base = "BASE_MODEL" if summary["base_model"] in NAMED_MODELS else repr(summary["base_model"])
        unet = "" if summary.get("lora") else (f", unet=diffusers.UNet2DConditionModel.from_pretrained("
                                               f"os.path.join({out!r}, 'unet'))")
        head = f"pipe = diffusers.{cls}.from_pretrained({base}{unet})"
    lines = ["import diffusers, json, os" + (", safetensors.torch" if summary.get("sdxl") else ""), head]
    if summary.get("lora"):
        lines.append(f"pipe.load_lora_weights({out!r}, weight_name={summary['lora']['file']!r})")
    files = f"json.load(open(os.path.join({out!r}, 'tokens.json')))['files']"
    if not summary.get("sdxl"):
        lines.append(f"for token, file in {files}.items(): "
                     f"pipe.load_textual_inversion(os.path.join({out!r}, file), token=token)")
        return "\n".join(lines)
    # SDXL: each file holds the token's rows in both tables, loaded into each encoder by its own call
    lines += [f"emb = {{token: safetensors.torch.load_file(os.path.join({out!r}, file)) for token, file in "
              f"{files}.items()}}",
              "pipe.load_textual_inversion([e['clip_l'] for e in emb.values()], token=list(emb), "
              "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
              "pipe.load_textual_inversion([e['clip_g'] for e in emb.values()], token=list(emb), "
              "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"]
    return "\n".join(lines)


def _unet_line(summary: dict) -> str:
    if summary.get("lora"):
        lo = summary["lora"]
        where = "beside the base UNet in `unet/`" if summary["pipeline"] else "for the base model's UNet"
        return (f"`{lo['file']}` holds the run's LoRA adapters (rank {lo['rank']}, alpha {lo['alpha']:g}, on "
                f"{lo['targets']}) {where}, in PEFT's layout: `pipe.load_lora_weights` loads it.")
    return f"`unet/` holds the {'tuned' if summary['unet'] == 'tuned' else 'base (this run tuned no UNet)'} UNet."


def _one_token_line(summary: dict) -> str:
    if not summary.get("sdxl"):
        return 'One token: `pipe.load_textual_inversion("OUT/embeddings/<file>.safetensors", token="<v1>")`.'
    return ("Each SDXL file holds a token's rows in both tables: `clip_l` (n x width of `text_encoder`) and `clip_g` "
            "(n x width of `text_encoder_2`). One token: `e = safetensors.torch.load_file(\"OUT/embeddings/<file>"
            ".safetensors\")`, then `pipe.load_textual_inversion(e[\"clip_l\"], token=\"<v1>\", "
            "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)` and `pipe.load_textual_inversion("
            "e[\"clip_g\"], token=\"<v1>\", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)`.")


def readme(summary: dict) -> str:
    lines = [
        "# jaxconcept export", "",
        f"Learned concept tokens of the run `{summary['run']}` (base model `{summary['base_model']}`), "
        "for PyTorch diffusers.", "",
        "| token | embedding file |", "|---|---|",
        *[f"| `{t}` | `{f}` |" for t, f in summary["files"].items()], "",
        _unet_line(summary),
    ]
    if summary["pipeline"]:
        encoders = "the text encoders have" if summary.get("sdxl") else "the text encoder has"
        lines.append(f"The folder is a whole `{pipeline_class(summary)}` ({encoders} the base vocabulary: "
                     "load the tokens into it as below).")
    else:
        lines.append(f"Only the {'LoRA adapters were' if summary.get('lora') else 'UNet was'} exported: the rest "
                     "comes from the run's base model, which must be a PyTorch diffusers folder or hub id (replace "
                     "BASE_MODEL where shown).")
    lines += ["", "```python", load_snippet(summary), "```", "", _one_token_line(summary), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxconcept.export",
                                description="Export a finished jaxconcept run to PyTorch diffusers (no torch needed).")
    p.add_argument("--run", required=True, help="the run folder (the --out of jaxconcept.train)")
    p.add_argument("--out", required=True, help="folder to write the PyTorch files into")
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                   help="write only the UNet and the token embeddings, not a whole StableDiffusionPipeline folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out folder (its whole contents; never mixed with the new files)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = export_run(args.run, args.out, pipeline=args.pipeline, overwrite=args.overwrite)
    except JaxconceptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's failure (a full disk, an I/O error), not the command's: exit 1
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: cannot write the export{where}: {e.strerror or e}. Nothing was exported: {args.out!r} is as "
              "it was. Free some space (or choose another --out) and run the same command again.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing was exported, {args.out!r} is as it was.", file=sys.stderr)
        return 130
    unet = {"base": "base UNet (the run has no unet/: no joint tuning)", "tuned": "tuned UNet",
            "lora": "UNet's LoRA adapters"}[summary["unet"]]
    print(f"exported {len(summary['tokens'])} token(s) {', '.join(summary['tokens'])} and the {unet} "
          f"to {summary['out']}" + (f" as a {pipeline_class(summary)} folder" if summary["pipeline"] else ""))
    for path in summary["written"]:
        print(f"  {path}")
    print("load it in PyTorch:\n" + load_snippet(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
