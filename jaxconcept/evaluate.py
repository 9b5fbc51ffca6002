"""Batch evaluation of learned runs: runs x prompt templates x K images per prompt (the paper's Table 1 shape).

    python -m jaxconcept.evaluate --run runs/toy --out runs/eval                # toy: the toy analysis judges
    python -m jaxconcept.evaluate --run runs/a --run runs/b --clip openai/clip-vit-base-patch32 \\
        --template "a photo of {} at the beach" --template "{all} in the snow" --num-images 8 --out runs/eval

Templates: `{}` makes one prompt per object concept of a run; `{all}` one prompt with all of a run's object
concepts (joined as in training). Every prompt's K images are generated in one batch split over all devices.
Per image, and aggregated per run and overall:
  * CLIP-I: cosine of the image's CLIP embedding with the concept's reference (its training image cropped
    to the learned mask's box); CLIP-T: cosine with the prompt in words (tokens replaced by their
    descriptions); presence of each concept in multi-concept images (CLIP, see `metrics.concept_presence`);
    LPIPS-style diversity between the images of one prompt. All need a CLIP checkpoint (--clip).
  * on the toy model, the toy analysis: is each named object there with the right colour and shape
    (and pattern)? This stands in for CLIP there (the toy world has no CLIP). Beside it, what users see
    (`toy.judge`): each concept found alone, all named concepts found in the same image, and leakage (what a
    single-concept prompt did not ask for), each next to the *words oracle*: the base model prompted with the
    concepts' own words, the same prompts and noise.
  * mask IoU of each concept against ground truth, where the run had it (summary.json).
Writes results.json, results.csv (one row per image and concept) and index.html, a contact sheet.
Sampling follows the model's recommendation (its `sampling.json`: the toy model's DDIM 25 steps, guidance 5)
unless --steps, --guidance or --scheduler say otherwise, as `generate` does.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import html
import json
import os
import re
import sys
import time

import jax
import numpy as np

from . import generate
from .parallel import distributed
from .runio import images, outputs, runs, viz
from .errors import JaxconceptError
from .runio.inputs import init_word_parts

TOY_TEMPLATES = ("a {} on a teal water background", "a {all} on a beige sand background")
SD_TEMPLATES = ("a photo of {}", "a photo of {} at the beach", "a photo of {all}")


@dataclasses.dataclass(frozen=True)
class Concept:
    token: str
    kind: str  # "object" or "background"
    description: str  # the token in words, for CLIP-T ("red triangle", "dog")
    reference_u8: np.ndarray | None  # the training image cropped to the learned mask's box
    toy: dict | None  # {"color", "shape", "pattern"} when the token names a toy object
    mask_iou: float | None  # final mask vs ground truth, when the run had it


# ------------------------------------------------------------------------------------------ pure parts


def speaks_toy(bundle) -> bool:
    """A model of the toy world (the shipped one, or one trained by launch/train_toy.py): its vocabulary
    holds every scene word, so the toy analysis can judge its samples."""
    from .toy import scene

    vocab = bundle.tokenizer.get_vocab()
    return all(w + "</w>" in vocab or w in vocab for w in scene.vocabulary())


def toy_attributes(token: str) -> dict | None:
    """Colour, shape and pattern named by a toy token such as <purple_dotted_ring> (None otherwise)."""
    from .toy import scene

    words = re.sub(r"_s?\d+$", "", token.strip("<>")).split("_")
    color = next((w for w in words if w in scene.COLORS), None)
    shape = next((w for w in words if w in scene.SHAPES), None)
    if color is None or shape is None:
        return None
    return {"color": color, "shape": shape, "pattern": next((w for w in words if w in scene.PATTERNS), "solid")}


def describe(token: str, init_word: str | None) -> str:
    """Words for a token in CLIP-T prompts: toy tokens spell themselves out; else the init word."""
    toy = toy_attributes(token)
    if toy is not None:
        return " ".join(w for w in (toy["color"], None if toy["pattern"] == "solid" else toy["pattern"],
                                    toy["shape"]) if w)
    if init_word:
        return " ".join(init_word_parts(init_word))
    return token.strip("<>").replace("_", " ").replace("-", " ")


def reference_crop(image_u8_HxWx3: np.ndarray, mask_HxW: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """The image cropped to the mask's bounding box (plus a margin); the whole image for an empty mask."""
    ys, xs = np.nonzero(mask_HxW)
    if ys.size == 0:
        return image_u8_HxWx3
    h, w = mask_HxW.shape
    my, mx = int(margin * (ys.max() - ys.min() + 1)), int(margin * (xs.max() - xs.min() + 1))
    y0, y1 = max(0, ys.min() - my), min(h, ys.max() + 1 + my)
    x0, x1 = max(0, xs.min() - mx), min(w, xs.max() + 1 + mx)
    return image_u8_HxWx3[y0:y1, x0:x1]


def check_templates(templates) -> None:
    if not templates:
        raise JaxconceptError("no prompt template: give --template with {} (each concept) or {all}.")
    for tpl in templates:
        if "{all}" not in tpl and "{}" not in tpl:
            raise JaxconceptError(f"template {tpl!r} names no concept: use {{}} (each concept) or {{all}} "
                                  "(all of a run's objects together).")


def expand_templates(templates, concepts: list[Concept], template: str, joiner: str) -> list[dict]:
    """Prompts of one run: {"prompt", "words" (the prompt for CLIP-T), "template", "concepts" (tokens)}."""
    check_templates(templates)
    objects = runs.object_concepts(concepts)
    out = []
    for tpl in templates:
        groups = [objects] if "{all}" in tpl else [[c] for c in objects]
        for group in groups:
            tokens_text = joiner.join(c.token for c in group)
            words_text = joiner.join(c.description for c in group)
            fill = (lambda t: tpl.replace("{all}", t)) if "{all}" in tpl else (lambda t: tpl.replace("{}", t))
            out.append({"prompt": fill(tokens_text), "words": fill(words_text), "template": tpl,
                        "concepts": [c.token for c in group]})
    return out


def score_images(pictures_Kx, prompt: dict, concepts: dict, clip=None, toy: bool = False,
                 ref_cache: dict | None = None) -> tuple[list, dict]:
    """Per-image records and per-prompt figures for the K images of one prompt.

    concepts: token -> Concept. clip: a `metrics` CLIP bundle or None. toy: run the toy analysis.
    ref_cache: token -> reference embedding, shared by a run's prompts (each reference is embedded once).
    """
    from .eval import metrics

    named = [concepts[t] for t in prompt["concepts"]]
    records = [{"sample": k, "concepts": {}} for k in range(len(pictures_Kx))]
    per_prompt: dict = {}
    if clip is not None:
        emb_KxP = metrics.image_embeddings(clip, np.asarray(pictures_Kx))
        text_1xP = metrics.text_embeddings(clip, [prompt["words"]])
        clip_t = np.asarray(metrics.cosine_matrix(emb_KxP, text_1xP))[:, 0]
        refs = [c for c in named if c.reference_u8 is not None]
        ref_emb = {} if ref_cache is None else ref_cache
        for c in refs:
            if c.token not in ref_emb:
                ref_emb[c.token] = metrics.image_embeddings(clip, _square(c.reference_u8, pictures_Kx.shape[1])[None])
        # presence of each concept of a multi-concept prompt: its phrase against a neutral "a photo"
        presence = (metrics.concept_presence(clip, emb_KxP, [f"a photo of a {c.description}" for c in named])
                    if len(named) > 1 else None)
        for k, rec in enumerate(records):
            rec["clip_t"] = float(clip_t[k])
            for j, c in enumerate(named):
                entry = rec["concepts"].setdefault(c.token, {})
                if c.token in ref_emb:
                    entry["clip_i"] = float(np.asarray(metrics.cosine_matrix(emb_KxP[k:k + 1], ref_emb[c.token]))[0, 0])
                if presence is not None:
                    entry["present_clip"] = bool(np.asarray(presence[1])[k, j])
                    entry["presence_score"] = float(np.asarray(presence[0])[k, j])
        if len(pictures_Kx) >= 2:
            per_prompt["diversity"] = float(metrics.diversity(clip, np.asarray(pictures_Kx)))
    if toy:
        expected = [c.toy for c in named if c.toy is not None]
        from .toy import analysis

        for rec, pic in zip(records, pictures_Kx):
            if not expected:
                break
            m = analysis.match_caption(np.asarray(pic), expected)
            toy_named = [c for c in named if c.toy is not None]
            for c, found, pat in zip(toy_named, m["found"], m["pattern_matched"]):
                rec["concepts"].setdefault(c.token, {}).update({"toy_found": bool(found), "toy_pattern": bool(pat)})
            rec["toy_all_found"] = bool(all(m["found"]))
    return records, per_prompt


def _square(image_u8, size: int) -> np.ndarray:
    """A crop resized to size x size (CLIP resizes again; this only gives references one shape)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.asarray(image_u8, np.uint8)).resize((size, size), Image.BICUBIC))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def aggregate(rows: list[dict], prompts: list[dict]) -> dict:
    """Means over image-concept rows and prompts (None where a metric was not measured)."""
    get = lambda key: [r.get(key) for r in rows]  # noqa: E731
    multi = [r for r in rows if r["num_concepts"] > 1]
    made = [f for p in prompts for f in p.get("files", ())]  # every image made, identical prompts included
    return {
        "images": len(made) if made else len({(r["run"], r["prompt"], r["sample"]) for r in rows}),
        "prompts": len(prompts),
        "clip_i": _mean(get("clip_i")), "clip_t": _mean(get("clip_t")),
        "diversity": _mean([p.get("diversity") for p in prompts]),
        "toy_found": _mean([float(v) for v in get("toy_found") if v is not None]),
        "toy_pattern": _mean([float(v) for v in get("toy_pattern") if v is not None]),
        "presence_clip_multi": _mean([float(r["present_clip"]) for r in multi if r.get("present_clip") is not None]),
        "toy_found_multi": _mean([float(r["toy_found"]) for r in multi if r.get("toy_found") is not None]),
        "mask_iou": _mean(list({(r["run"], r["concept"]): r.get("mask_iou") for r in rows}.values())),
    }


CLIP_METRICS = ("clip_i", "clip_t", "diversity", "presence_clip_multi")
CLIP_HINT = "pass --clip with a hub id (e.g. --clip openai/clip-vit-base-patch32) or a local transformers CLIP folder"


def not_measured(result: dict) -> dict:
    """Metric -> why it is null, for the metrics a plain run leaves empty (CLIP's, without --clip)."""
    out = {}
    if result.get("clip") is None and any(not r.get("toy_analysis") for r in result["runs"].values()):
        out.update({k: f"needs a CLIP model: {CLIP_HINT}" for k in CLIP_METRICS})
    if result["overall"].get("mask_iou") is None:
        out["mask_iou"] = "needs ground-truth masks, which only runs on rendered (toy) scenes have"
    return out


# figure name -> where `toy_judgement` keeps it (source, key): tokens, and their words-oracle twin
_TOY_PICK = {f"{name}{suffix}": (source, key) for name, key in (("found_alone", "found_mean"), ("together", "together"),
                                                                 ("leakage", "leakage"))
             for suffix, source in (("", "tokens"), ("_words", "words"))}
TOY_FIGURES = tuple(_TOY_PICK)


def toy_figures(judgements: list) -> dict:
    """Means over runs of what users see (None where no run was judged): found alone (mean over concepts),
    all found together, leakage, each for the tokens and for the words oracle."""
    got = [j for j in judgements if j is not None]
    return {"toy_" + name: _mean([j[a][b] for j in got]) for name, (a, b) in _TOY_PICK.items()}


# ------------------------------------------------------------------------------------------ runs and files


def toy_concepts(concepts: list[Concept]):
    """The run's object concepts the toy analysis can judge (`toy.judge.ToyConcept`)."""
    from .toy import judge

    return [judge.ToyConcept(c.token, **c.toy) for c in concepts if c.toy is not None and c.kind == "object"]


def source_background(run_dir: str) -> str | None:
    """The colour of the run's training background (its background concept's mask), for leakage."""
    from PIL import Image

    from .toy import judge

    listed = runs.listed_concepts(runs.read_summary(run_dir))
    bg = next((c for c in listed if c.get("kind") == "background" and c.get("image")), None)
    if bg is None:
        return None
    image = np.asarray(Image.open(os.path.join(run_dir, bg["image"])).convert("RGB"))
    mask_path = os.path.join(run_dir, bg["mask"]) if bg.get("mask") else ""
    mask = np.asarray(Image.open(mask_path).convert("L")) > 127 if os.path.isfile(mask_path) else None
    return judge.source_background(image, mask if mask is not None and mask.any() else None)


def toy_judgement(prompts: list[dict], pics_tokens, pics_words, concepts: list[Concept], source_bg) -> dict:
    """What users see, tokens beside the words oracle (`toy.judge`): {"tokens", "words", "report",
    "per_prompt": [{"tokens": [...], "words": [...]}]} for one run's prompts."""
    from .toy import judge

    toy = {c.token: c for c in toy_concepts(concepts)}
    keep = [i for i, p in enumerate(prompts) if p["concepts"] and all(t in toy for t in p["concepts"])]
    measured = [{"kind": "alone" if len(prompts[i]["concepts"]) == 1 else "together",
                 "concepts": [toy[t] for t in prompts[i]["concepts"]]} for i in keep]
    asked = [judge.background_color(prompts[i]["words"]) for i in keep]
    judged = {}
    for key, pics in (("tokens", pics_tokens), ("words", pics_words)):
        judged[key] = [judge.judge([pics[i]], [m], list(toy.values()), source_bg, a)[0]
                       for i, m, a in zip(keep, measured, asked)]
    out = {key: judge.summarize(measured, judged[key]) for key in judged}
    out["report"] = judge.report(out["tokens"], out["words"])
    out["per_prompt"] = {prompts[i]["prompt"]: {k: judged[k][n] for k in judged} for n, i in enumerate(keep)}
    return out


def run_concepts(run_dir: str) -> tuple[list[Concept], dict]:
    """The concepts of a finished run with their references, from its summary.json and files."""
    summary = runs.read_summary(run_dir)
    out = []
    for c in runs.listed_concepts(summary):
        ref = None
        if c.get("image") and c.get("mask") and os.path.isfile(os.path.join(run_dir, c["mask"])):
            from PIL import Image

            img = np.asarray(Image.open(os.path.join(run_dir, c["image"])).convert("RGB"))
            mask = np.asarray(Image.open(os.path.join(run_dir, c["mask"])).convert("L")) > 127
            ref = reference_crop(img, mask)
        out.append(Concept(c["token"], c.get("kind", "object"), describe(c["token"], c.get("init_word")), ref,
                           toy_attributes(c["token"]), (summary.get("iou_final") or {}).get(c["token"])))
    return out, summary


def evaluate(run_dirs, templates, out_dir: str, settings: generate.Settings, clip=None, *, toy: bool | None = None,
             mesh=None, progress: bool = True) -> dict:
    """Generate and score every run x template x K images; write results.json/.csv and index.html.

    Multi-host: every process takes part in generating (each host's devices make their share of a batch),
    gathers the images and scores them; process 0 writes the files."""
    outputs.check_writable(out_dir)
    save_image = images.save_image if distributed.is_primary() else (lambda *_: None)
    rows, prompt_records, per_run = [], [], {}
    base_cache: dict = {}
    for r_i, run_dir in enumerate(run_dirs):
        concepts, summary = run_concepts(run_dir)
        by_token = {c.token: c for c in concepts}
        cfg = runs.read_config(run_dir)
        if cfg["model"] not in base_cache:  # the base model, shared by every run on it
            from .model.loading import load_model

            base_cache[cfg["model"]] = load_model(cfg["model"], seed=cfg.get("seed", 0))
        run = runs.load_run(run_dir, bundle=base_cache[cfg["model"]])
        run_toy = speaks_toy(base_cache[cfg["model"]]) if toy is None else toy
        prompts = expand_templates(templates, concepts, summary.get("template", "{}"),
                                   summary.get("joiner", " and "))
        pics = generate.generate(run, [p["prompt"] for p in prompts], settings, mesh=mesh, progress=progress)
        run_name = f"{r_i:02d}_{outputs.safe_name(os.path.basename(os.path.abspath(run_dir)))}"
        folders = generate.prompt_folder_names([p["prompt"] for p in prompts])
        toy_result = None
        if run_toy and toy_concepts(concepts):  # the words oracle: the base model, same prompts in words and noise
            words_pics = generate.generate(base_cache[cfg["model"]], [p["words"] for p in prompts], settings,
                                           mesh=mesh, progress=progress)
            for p, folder, pics_K in zip(prompts, folders, words_pics):
                p["words_files"] = [os.path.join("images", run_name, "words", folder, f"sample_{k:02d}.png")
                                    for k in range(len(pics_K))]
                for f, pic in zip(p["words_files"], pics_K):
                    save_image(pic, os.path.join(out_dir, f))
            toy_result = toy_judgement(prompts, pics, words_pics, concepts, source_background(run_dir))
        ref_cache: dict = {}
        run_prompts = []
        for p, folder, pics_K in zip(prompts, folders, pics):
            files = [os.path.join("images", run_name, folder, f"sample_{k:02d}.png") for k in range(len(pics_K))]
            for f, pic in zip(files, pics_K):
                save_image(pic, os.path.join(out_dir, f))
            records, per_prompt = score_images(pics_K, p, by_token, clip, run_toy, ref_cache)
            run_prompts.append({**p, **per_prompt, "run": run_dir, "files": files})
            for rec, f in zip(records, files):
                base_row = {"run": run_dir, "prompt": p["prompt"], "template": p["template"], "sample": rec["sample"],
                            "file": f, "num_concepts": len(p["concepts"]), "clip_t": rec.get("clip_t"),
                            "toy_all_found": rec.get("toy_all_found")}
                for token in p["concepts"]:
                    rows.append({**base_row, "concept": token, "mask_iou": by_token[token].mask_iou,
                                 **rec["concepts"].get(token, {})})
        refs = {}
        for c in concepts:
            if c.reference_u8 is not None:
                refs[c.token] = os.path.join("images", run_name, f"reference_{outputs.safe_name(c.token)}.png")
                save_image(c.reference_u8, os.path.join(out_dir, refs[c.token]))
        prompt_records += run_prompts
        per_run[run_dir] = {"summary": {**aggregate([r for r in rows if r["run"] == run_dir], run_prompts),
                                        **toy_figures([toy_result])},
                            "references": refs, "mode": summary.get("mode"), "model": cfg["model"], "toy": toy_result,
                            "toy_analysis": bool(run_toy)}
    overall = {**aggregate(rows, prompt_records), **toy_figures([r["toy"] for r in per_run.values()])}
    result = {"settings": dataclasses.asdict(settings), "templates": list(templates),
              "clip": getattr(clip, "source", None), "overall": overall, "runs": per_run,
              "prompts": prompt_records, "devices": jax.device_count()}
    result["not_measured"] = not_measured(result)
    if not distributed.is_primary():
        return result
    outputs.write_json(os.path.join(out_dir, "results.json"), result)
    write_csv(os.path.join(out_dir, "results.csv"), rows)
    with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write(contact_sheet(result, rows))
    return result


CSV_COLUMNS = ("run", "concept", "prompt", "template", "sample", "file", "num_concepts", "clip_i", "clip_t",
               "present_clip", "presence_score", "toy_found", "toy_pattern", "toy_all_found", "mask_iou")


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def contact_sheet(result: dict, rows: list[dict]) -> str:
    """A self-contained HTML page (relative image paths): per run, its references, then a row of images
    per prompt with each image's scores under it."""
    e = html.escape
    keys = ("clip_i", "clip_t", "diversity", "toy_found", "toy_pattern", "presence_clip_multi", "toy_found_multi",
            *("toy_" + k for k in TOY_FIGURES), "mask_iou")
    head = "".join(f"<th>{k}</th>" for k in keys)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>jaxconcept evaluation</title><style>",
             "body{font-family:sans-serif;margin:1em} img{width:128px;height:128px;image-rendering:pixelated}",
             "figure{display:inline-block;margin:2px;text-align:center;font-size:11px}",
             "table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}",
             ".miss{outline:3px solid #d33} .hit{outline:3px solid #3a3}</style></head><body>",
             "<h1>jaxconcept evaluation</h1>", f"<p>{e(json.dumps(result['settings']))}; CLIP: "
             f"{e(str(result['clip']))}</p>", f"<table><tr><th>run</th>{head}</tr>"]
    for name, r in list(result["runs"].items()) + [("overall", {"summary": result["overall"]})]:
        parts.append(f"<tr><td>{e(name)}</td>" + "".join(f"<td>{_fmt(r['summary'].get(k))}</td>" for k in keys)
                     + "</tr>")
    parts.append("</table>")
    by_file: dict = {}
    for row in rows:
        by_file.setdefault(row["file"], []).append(row)
    for run_dir, r in result["runs"].items():
        parts.append(f"<h2>{e(run_dir)} ({e(str(r['mode']))}, {e(str(r['model']))})</h2><div>")
        for token, ref in r["references"].items():
            parts.append(f"<figure><img src='{e(ref)}'><figcaption>{e(token)} (reference)</figcaption></figure>")
        parts.append("</div>")
        for p in (p for p in result["prompts"] if p["run"] == run_dir):
            div = "" if p.get("diversity") is None else f" — diversity {p['diversity']:.3f}"
            parts.append(f"<h3>{e(p['prompt'])}{e(div)}</h3><div>")
            for f in p["files"]:
                cells = by_file.get(f, [])
                found = [c.get("toy_found") for c in cells if c.get("toy_found") is not None]
                cls = "" if not found else (" class='hit'" if all(found) else " class='miss'")
                caption = "<br>".join(
                    e(c["concept"]) + ": " + ", ".join(f"{k} {_fmt(c.get(k))}" for k in ("clip_i", "toy_found")
                                                       if c.get(k) is not None) for c in cells)
                parts.append(f"<figure><img src='{e(f)}'{cls}><figcaption>{caption}</figcaption></figure>")
            parts.append("</div>")
            if p.get("words_files"):  # the words oracle: what a perfect token would give
                parts.append(f"<p>the base model given the words: <i>{e(p['words'])}</i></p><div>")
                parts += [f"<figure><img src='{e(f)}'></figure>" for f in p["words_files"]]
                parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def check_toy_run(run_dir: str, num_images: int = 16, seed: int = 1234, bundle=None, progress: bool = False,
                  on_start=None) -> list[str] | None:
    """After training on the toy world: each object concept alone and all together on a new background and in
    bare prompts (no background phrase: what `generate --run` draws) (`toy.judge.measure`), tokens beside the words
    oracle, with the model's recommended sampling. Writes samples_check.png (for each prompt form, the token rows,
    then the same prompts in words) and samples_check.json (the bare prompts' figures under "bare") into the run;
    returns the table's lines, or None where the toy analysis cannot judge the run (not a toy model).
    on_start(): called once the run is known to be judged, before sampling."""
    from .model.loading import load_model, recommended_sampling
    from .toy import judge

    concepts, summary = run_concepts(run_dir)
    toy = toy_concepts(concepts)
    cfg = runs.read_config(run_dir)
    base = bundle or load_model(cfg["model"], seed=cfg.get("seed", 0))
    if not toy or not speaks_toy(base):
        return None
    settings = generate.Settings(num_images, seed=seed, **recommended_sampling(cfg["model"]))
    run = runs.load_run(run_dir, bundle=base)
    if on_start is not None:  # the command says what it does before the sampling starts
        on_start()
    form = dict(template=summary.get("template", "a {}"), joiner=summary.get("joiner", " and a "))
    got = {where: judge.measure(run, base, judge.Asked(toy, background=where, **form), source_background(run_dir),
                                settings, progress=progress) for where in (judge.DEFAULT_BACKGROUND, judge.BARE)}
    m, bare = got[judge.DEFAULT_BACKGROUND], got[judge.BARE]
    rows, labels = [], []
    for x in (m, bare):
        rows += [list(p) for p in x["pictures"]["tokens"]] + [list(p) for p in x["pictures"]["words"]]
        labels += [p["tokens"] for p in x["prompts"]] + [p["words"] + "   (base model, words)" for p in x["prompts"]]
    images.save_image(viz.grid(rows, cell=64, row_labels=labels), os.path.join(run_dir, "samples_check.png"))
    keep = ("prompts", "tokens", "words", "report")
    outputs.write_json(os.path.join(run_dir, "samples_check.json"),
                       {"settings": dataclasses.asdict(settings), **{k: m[k] for k in keep},
                        "bare": {k: bare[k] for k in keep}})
    return [f"samples ({num_images} per prompt, {settings.scheduler} {settings.steps} steps, guidance "
            f"{settings.guidance}): tokens beside the base model given the words, same prompts and noise, "
            f"'on a {judge.DEFAULT_BACKGROUND}' and bare, as `generate` prompts ('a <tok>')",
            *("  " + line for line in judge.lines(m["tokens"], m["words"], ("bare (generate)", bare["tokens"],
                                                                            bare["words"]), first="new background")),
            f"  pictures: {os.path.join(run_dir, 'samples_check.png')}"]


# ------------------------------------------------------------------------------------------ command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxconcept.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", default=[], help="a finished run folder (repeatable)")
    p.add_argument("--template", action="append", default=[],
                   help="prompt template with {} (each concept) or {all}; repeatable. Default: toy or SD set")
    p.add_argument("--templates-file", default=None, help="a text file with one template per line")
    p.add_argument("--clip", default=None, help="CLIP checkpoint: a folder, a hub id, or 'tiny-clip' (tests)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=None, help="default: the model's recommendation, else 50")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's recommendation, else 7.5")
    p.add_argument("--scheduler", default=None, help="ddim, pndm, dpm++; default: the model's, else ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--distributed", default="auto", choices=distributed.MODES,
                   help="join a multi-host job (TPU pod, SLURM): auto = when the environment says so")
    return p.parse_args(argv)


def sampling_settings(args) -> generate.Settings:
    """What --steps/--guidance/--scheduler give, else the runs' model's recommendation (`generate.settings_for`);
    runs of different base models take the plain defaults for what was not given."""
    models = {runs.read_config(r)["model"] for r in args.run}
    return generate.settings_for(argparse.Namespace(**vars(args), negative_prompt=""),
                                 models.pop() if len(models) == 1 else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if not args.run:
            raise JaxconceptError("no run given: pass --run RUN_DIR (repeatable).")
        distributed.initialize(args.distributed)  # before anything touches a device
        templates = list(args.template)
        if args.templates_file:
            try:
                with open(args.templates_file, encoding="utf-8") as f:
                    templates += [line.strip() for line in f if line.strip() and not line.startswith("#")]
            except OSError as err:
                raise JaxconceptError(f"cannot read --templates-file {args.templates_file!r}: {err.strerror}") from err
        for run_dir in args.run:  # before any model is loaded
            if not os.path.isdir(run_dir):
                raise JaxconceptError(f"run folder {run_dir!r} does not exist: pass the --out folder of a "
                                      "'python -m jaxconcept.train' run.")
            run_concepts(run_dir)
            runs.read_concepts(os.path.join(run_dir, "concepts.safetensors"))  # a damaged file: said at once
        if not templates:
            models = {runs.read_config(r)["model"] for r in args.run}
            templates = list(TOY_TEMPLATES if models == {"toy"} else SD_TEMPLATES)
        check_templates(templates)
        settings = sampling_settings(args)
        generate.check_settings(settings)
        clip = None
        if args.clip:
            from .eval import metrics

            clip = metrics.load_clip(args.clip)
        t0 = time.time()
        result = evaluate(args.run, templates, args.out, settings, clip, progress=distributed.is_primary())
    except (JaxconceptError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not distributed.is_primary():
        return 0
    o = result["overall"]
    print(f"{o['images']} image{'s' if o['images'] != 1 else ''}, {o['prompts']} prompt"
          f"{'s' if o['prompts'] != 1 else ''}, {len(args.run)} run(s) in {time.time() - t0:.0f} s on "
          f"{jax.device_count()} device(s)")
    print(f"sampling: {settings.scheduler}, {settings.steps} steps, guidance {settings.guidance}")
    for k, v in o.items():
        if v is not None and k not in ("images", "prompts"):
            print(f"  {k:<24} {v:.3f}")
    missing = result["not_measured"]
    clip_missing = [k for k in CLIP_METRICS if k in missing]
    if clip_missing:
        print(f"  not measured: {', '.join(clip_missing)}: they need a CLIP model; {CLIP_HINT}")
    if "mask_iou" in missing:
        print(f"  not measured: mask_iou ({missing['mask_iou']})")
    if not any(v is not None for k, v in o.items() if k not in ("images", "prompts")):
        print("  no metric was measured: results.json lists them as null")
    for run_dir, r in result["runs"].items():
        if r.get("toy"):
            from .toy import judge

            print(f"{run_dir}: what users see (tokens beside the base model given the words, same prompts and noise)")
            print("\n".join("  " + line for line in judge.lines(r["toy"]["tokens"], r["toy"]["words"])))
    print(f"contact sheet: {os.path.join(args.out, 'index.html')}\ntables: {os.path.join(args.out, 'results.json')}, "
          f"{os.path.join(args.out, 'results.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
