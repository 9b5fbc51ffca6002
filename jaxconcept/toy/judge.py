"""Do learned toy concepts come back? Samples judged as a user sees them, beside the words oracle.

For a run learned on a toy scene, three questions about its samples (the toy analysis reads each picture):
  * found alone: "a <tok> on a <new background>" shows the concept (its colour and shape);
  * all together: "a <t1> and a <t2> on a <new background>" shows every named concept in the same image;
  * leakage, in the single-concept samples: something the prompt did not ask for (`leaks`):
      - "other":      another object of the source image (its colour and shape);
      - "mixed":      the asked object drawn with another source object's shape or colour (a purple triangle
                      for <purple_dotted_ring> learned beside a red triangle);
      - "background": the source image's background colour where another background was asked.
The yardstick is the *words oracle*: the base model prompted with each concept's own words ("a purple dotted
ring on a ..."), the same prompts, noise and sampler. It is what a perfect token would give, so fidelity is
read as a ratio to it (`report`).

Pure functions judge pictures; `measure` generates (one compiled program for tokens and words alike).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import analysis, scene

# where the samples are drawn: a background no toy scene of the bundled example has, as in the table
DEFAULT_BACKGROUND = "teal water background"
# no background phrase: the prompts as `python -m jaxconcept.generate --run` writes them ("a <tok>"); what users
# see first, and where the tokens and the words can differ most (docs/concepts_back.md §15)
BARE = ""
LEAK_KINDS = ("other", "mixed", "background")


@dataclasses.dataclass(frozen=True)
class ToyConcept:
    """An object concept of a toy run: its token and the object it stands for."""

    token: str
    color: str
    shape: str
    pattern: str = "solid"

    @property
    def words(self) -> str:
        """The object in caption words, with its article ("an orange square"), as the toy model was trained."""
        words = scene.object_words(self.color, self.shape, self.pattern)
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)

    def as_expected(self) -> dict:
        return {"color": self.color, "shape": self.shape, "pattern": self.pattern}


def leaks(detected: list[dict], asked: ToyConcept, others: list[ToyConcept], sample_background: str,
          source_background: str | None, asked_background: str | None) -> dict[str, bool]:
    """What a single-concept sample shows that was not asked for (see the module docstring).

    detected: `analysis.find_objects` of the sample; others: the source image's other object concepts."""
    def is_(d, c):
        return d["color"] == c.color and d["shape"] == c.shape

    other = any(is_(d, o) for d in detected for o in others)
    mixed = any(not is_(d, asked) and not any(is_(d, o) for o in others)
                and ((d["color"] == asked.color and d["shape"] == o.shape and o.shape != asked.shape)
                     or (d["shape"] == asked.shape and d["color"] == o.color and o.color != asked.color))
                for d in detected for o in others)
    background = (source_background is not None and asked_background is not None
                  and source_background != asked_background and sample_background == source_background)
    return {"other": bool(other), "mixed": bool(mixed), "background": bool(background)}


def judge_single(picture_u8: np.ndarray, asked: ToyConcept, others: list[ToyConcept],
                 source_background: str | None, asked_background: str | None) -> dict:
    """{"found": the asked object is there, "leaks": {kind: bool}, "leaked": any leak} for one sample."""
    detected = analysis.find_objects(picture_u8)
    found = any(d["color"] == asked.color and d["shape"] == asked.shape for d in detected)
    bg = analysis.describe_background(picture_u8)["color"]
    kinds = leaks(detected, asked, others, bg, source_background, asked_background)
    return {"found": bool(found), "leaks": kinds, "leaked": bool(any(kinds.values()))}


def judge_together(picture_u8: np.ndarray, named: list[ToyConcept]) -> dict:
    """{"found": [each named object there, each detection used once], "all": every one of them}."""
    m = analysis.match_caption(picture_u8, [c.as_expected() for c in named])
    return {"found": [bool(f) for f in m["found"]], "all": bool(all(m["found"]))}


def prompts(concepts: list[ToyConcept], background: str = DEFAULT_BACKGROUND, template: str = "a {}",
            joiner: str = " and a ") -> list[dict]:
    """The measured prompts: each concept alone, then all together (two or more); in tokens (the run's
    template and joiner) and in words (the toy captions' form, "a red triangle and an orange ring"), followed by
    "on a <background>" unless the background is `BARE`."""
    where = f" on a {background}" if background else ""

    def tok(parts):
        return template.format(joiner.join(parts)) + where

    def words(parts):
        return " and ".join(parts) + where

    out = [{"kind": "alone", "concepts": [c], "tokens": tok([c.token]), "words": words([c.words])}
           for c in concepts]
    if len(concepts) > 1:
        out.append({"kind": "together", "concepts": list(concepts), "tokens": tok([c.token for c in concepts]),
                    "words": words([c.words for c in concepts])})
    return out


def background_color(background: str) -> str | None:
    """The colour word of a background phrase ("teal water background" -> "teal"), if it names one (none for
    `BARE` prompts: their samples' background is no leak)."""
    return next((w for w in (background or "").split() if w in scene.BACKGROUND_COLORS), None)


def judge(pictures_PxKx, measured: list[dict], all_concepts: list[ToyConcept], source_background: str | None,
          asked_background: str | None) -> list[dict]:
    """Per prompt, per sample judgements: alone prompts -> judge_single, together -> judge_together."""
    out = []
    for p, pics in zip(measured, pictures_PxKx):
        if p["kind"] == "alone":
            asked = p["concepts"][0]
            others = [c for c in all_concepts if c.token != asked.token]
            out.append([judge_single(np.asarray(x), asked, others, source_background, asked_background)
                        for x in pics])
        else:
            out.append([judge_together(np.asarray(x), p["concepts"]) for x in pics])
    return out


def _rate(flags) -> tuple[float, float]:
    """(mean, standard error) of 0/1 outcomes."""
    x = np.asarray(flags, float)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def summarize(measured: list[dict], judged: list[list[dict]]) -> dict:
    """Rates of one source (tokens or words): found alone per concept and its mean, all together, leakage
    (any, and per kind), each with its standard error over samples."""
    alone = {p["concepts"][0].token: j for p, j in zip(measured, judged) if p["kind"] == "alone"}
    together = [j for p, j in zip(measured, judged) if p["kind"] == "together"]
    singles = [x for j in alone.values() for x in j]
    out = {"found": {t: _rate([x["found"] for x in j])[0] for t, j in alone.items()},
           "found_mean": _rate([x["found"] for x in singles])[0] if singles else None,
           "leakage": _rate([x["leaked"] for x in singles])[0] if singles else None,
           "leakage_se": _rate([x["leaked"] for x in singles])[1] if singles else None,
           "leaks": {k: _rate([x["leaks"][k] for x in singles])[0] for k in LEAK_KINDS} if singles else {}}
    if together:
        flat = [x for j in together for x in j]
        out["together"], out["together_se"] = _rate([x["all"] for x in flat])
    else:
        out["together"], out["together_se"] = None, None
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, read as "of the words' rate"; None where unmeasured; inf-free (b = 0 -> 1.0 if a = 0 else 2.0)."""
    if a is None or b is None:
        return None
    if b == 0:
        return 1.0 if a == 0 else 2.0
    return a / b


def report(tok: dict, words: dict) -> dict:
    """Tokens beside the words oracle: the issue-27 targets' quantities (per-concept and mean found ratios,
    the weakest concept's ratio, together ratio, leakage excess over the words')."""
    per = {t: ratio(tok["found"][t], words["found"][t]) for t in tok["found"]}
    return {
        "found_ratio": ratio(tok["found_mean"], words["found_mean"]),
        "found_ratio_per_concept": per,
        "weakest_ratio": min(per.values()) if per else None,
        "together_ratio": ratio(tok["together"], words["together"]),
        "leakage_excess": (None if tok["leakage"] is None else tok["leakage"] - words["leakage"]),
    }


def lines(tok: dict, words: dict, *more: tuple[str, dict, dict], first: str = "") -> list[str]:
    """A short table for a terminal: each concept found alone, all together, leakage; tokens | words. `more`:
    further (title, tokens, words) measurements of the same concepts as column pairs beside the first (titled
    `first`), e.g. the same prompts without a background phrase."""
    def pct(v):
        return "  -  " if v is None else f"{100 * v:4.0f}%"

    cols = [(first, tok, words), *more]

    def row(label, get):
        return f"{label:34s}" + "".join(f" {pct(get(t)):>7s} {pct(get(w)):>7s}  " for _, t, w in cols)

    out = [f"{'':34s}" + "".join(f" {title[:17]:>17s}  " for title, _, _ in cols)] if more else []
    out.append(f"{'':34s}" + f" {'tokens':>7s} {'words':>7s}  " * len(cols))
    for t in tok["found"]:
        out.append(row(t + " found alone", lambda s, t=t: s["found"][t]))
    if tok["together"] is not None:
        out.append(row("all found together", lambda s: s["together"]))
    out.append(row("leakage (single-concept prompts)", lambda s: s["leakage"]))
    return [line.rstrip() for line in out]


def source_background(image_u8: np.ndarray, background_mask: np.ndarray | None = None) -> str:
    """The colour word of a training image's background (its background concept's mask, else its border)."""
    return analysis.describe_background(image_u8, background_mask)["color"]


@dataclasses.dataclass(frozen=True)
class Asked:
    """What `measure` asks the samples for: the run's object concepts, on which background, in the run's prompt
    form (its template and joiner); `prompts` spells it out."""

    concepts: list[ToyConcept]
    background: str = DEFAULT_BACKGROUND  # or BARE
    template: str = "a {}"
    joiner: str = " and a "


def measure(run, base_bundle, asked: Asked, source_bg: str | None, settings, *, mesh=None, progress: bool = False,
            words: dict | None = None) -> dict:
    """Sample the run's tokens and the base model's words on the same prompts and noise; judge both.
    `words`: a cache (dict) for the oracle's figures, shared by runs of one scene, base model and settings.

    run: a `runs.LoadedRun`; base_bundle: the base model (the words oracle); source_bg: the colour word of the
    training image's background; settings: `generate.Settings`.
    Returns {"prompts": [tokens, words], "tokens": summary, "words": summary, "report": ratios,
    "pictures": {"tokens": P x K x H x W x 3, "words": ...}, "judged": {...}}."""
    from .. import generate

    concepts = asked.concepts
    measured = prompts(concepts, asked.background, asked.template, asked.joiner)
    asked_bg = background_color(asked.background)
    pics, judged, summaries = {}, {}, {}
    cache_key = (tuple(p["words"] for p in measured), source_bg, settings)
    for model, key in ((run, "tokens"), (base_bundle, "words")):
        if key == "words" and words is not None and cache_key in words:
            pics[key], judged[key], summaries[key] = words[cache_key]
            continue
        pics[key] = generate.generate(model, [p[key] for p in measured], settings, mesh=mesh, progress=progress)
        judged[key] = judge(pics[key], measured, concepts, source_bg, asked_bg)
        summaries[key] = summarize(measured, judged[key])
        if key == "words" and words is not None:
            words[cache_key] = (pics[key], judged[key], summaries[key])
    return {"prompts": [{"kind": p["kind"], "tokens": p["tokens"], "words": p["words"]} for p in measured],
            "tokens": summaries["tokens"], "words": summaries["words"],
            "report": report(summaries["tokens"], summaries["words"]), "pictures": pics, "judged": judged}
