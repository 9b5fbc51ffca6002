"""The speed benchmark on the tiny model, in-process, ours and the PyTorch reference: speed.json is complete and
consistent, and the reference token step is a Break-a-Scene step (only the concept rows move). No timing
assertions: the numbers depend on the machine and its load."""

import json
import math

import numpy as np
import pytest

from jaxconcept.bench import speed, torch_reference, workload
from jaxconcept.model import loading as model

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    # one torch thread: on a loaded 2-core machine OpenMP spin-waits make 2 threads 100x slower
    speed.main(["--config", "tiny", "--iters", "2", "--timesteps", "2", "--sample-steps", "2",
                "--torch-threads", "1", "--out", str(out)])
    with open(out / "speed.json") as f:
        return json.load(f)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_step_timed_by_both_with_consistent_ratios(result):
    assert set(result["steps"]) == set(speed.STEPS)
    for name, row in result["steps"].items():
        assert _positive(row["ours_ms"]) and _positive(row["torch_ms"]), name
        assert row["speedup"] == pytest.approx(row["torch_ms"] / row["ours_ms"], rel=1e-9), name
        assert len(row["ours_all_ms"] or [0, 0]) == 2
        if name not in ("e_crf", "e_step"):  # timed in alternation: paired ratios, round by round
            ratios = [t / o for o, t in zip(row["ours_all_ms"], row["torch_all_ms"])]
            assert min(ratios) - 1e-3 <= row["speedup_paired"] <= max(ratios) + 1e-3, name
            assert row["speedup_p25"] <= row["speedup_paired"] <= row["speedup_p75"], name
            assert row["ours_p25_ms"] <= row["ours_ms"] <= row["ours_p75_ms"], name
    lora_row = result["steps"]["joint_lora"]
    assert lora_row["speedup_vs_torch_full_joint"] == pytest.approx(
        result["steps"]["joint"]["torch_ms"] / lora_row["ours_ms"], rel=1e-9)
    rows = result["steps"]
    assert rows["e_step"]["ours_ms"] == pytest.approx(rows["e_attn"]["ours_ms"] + rows["e_crf"]["ours_ms"])
    assert rows["e_step"]["torch_ms"] == pytest.approx(rows["e_attn"]["torch_ms"] + rows["e_crf"]["ours_ms"])
    assert rows["e_crf"]["torch_ms"] == rows["e_crf"]["ours_ms"]  # shared host code, counted once
    for name in ("token", "joint", "joint_lora", "e_attn", "sample"):
        assert _positive(rows[name]["ours_compile_s"]) and _positive(rows[name]["flops_xla"]), name
    share = result["estep_share"]
    t, e = rows["token"], rows["e_step"]
    assert share["ours"] == pytest.approx(e["ours_ms"] / (50 * t["ours_ms"] + e["ours_ms"]))
    assert share["torch"] == pytest.approx(e["torch_ms"] / (50 * t["torch_ms"] + e["torch_ms"]))
    assert result["config"]["name"] == "tiny" and result["config"]["estep_timesteps"] == 2
    assert result["versions"]["jax"] and result["versions"]["torch"] and result["device"]["kind"]


def test_torch_reference_token_step_moves_only_the_concept_rows(result):
    check = result["torch_reference_check"]
    concepts = check["concept_ids"]
    assert check["changed_rows"] == sorted(concepts)  # AdamW touched every row; the others were restored
    assert all(math.isfinite(x) and x > 0 for x in check["losses"])
    assert all(math.isfinite(x) and x > 0 for x in check["joint_losses"])
    assert all(math.isfinite(x) and x > 0 for x in check["joint_lora_losses"])  # peft adapters trained
    # the raw gradient reaches the prompt's rows (words, start/end tokens) and the drawn concepts' rows
    assert any(g > 0 for g in check["concept_grad_norm"])
    assert set(check["grad_rows_nonzero"]) - set(concepts), "no gradient on the prompt's other tokens"
    ours = result["ours_token_losses"]
    assert all(math.isfinite(x) and x > 0 for x in ours)


def test_torch_reference_attention_loss_has_a_gradient_into_the_tokens():
    """The captured 16x16 probabilities keep their graph: the attention loss alone moves the concept rows."""
    import torch

    from jaxconcept.model import loading as model

    torch.manual_seed(0)
    work = _toy_workload()
    tm = torch_reference.torch_build(work, "float32", 0)
    store: list = []
    tm.unet.set_attn_processor(torch_reference.CaptureProcessor(store, {work.attn_grid ** 2}))
    emb = tm.text.get_input_embeddings().weight
    emb.requires_grad_(True)
    batch = torch_reference.torch_draw(np.random.default_rng(0), work, tm)
    with torch.no_grad():
        tm.unet(torch.zeros_like(batch["latents"]), batch["t"], tm.text(batch["ids"])[0])
    assert len(store) == 3  # tiny UNet at 16x16: down_blocks_0 (1 layer) and up_blocks_2 (2 layers)
    store.clear()
    context = tm.text(batch["ids"])[0]
    tm.unet(batch["latents"], batch["t"], context)
    maps = torch_reference.torch_attention_maps(store, work.attn_grid, batch["positions"])
    assert maps.shape == (1, len(work.concept_ids), work.attn_grid, work.attn_grid)
    present = batch["positions"][0] >= 0
    assert torch.allclose(maps[0][present].amax(dim=(-2, -1)), torch.ones(int(present.sum())), atol=1e-5)
    maps.sum().backward()
    grad = emb.grad.abs().sum(dim=1)
    drawn = [cid for cid, p in zip(work.concept_ids, batch["positions"][0].tolist()) if p >= 0]
    assert all(grad[cid] > 0 for cid in drawn)
    assert model.TINY_UNET["cross_attention_dim"] == tm.unet.config.cross_attention_dim


def _toy_workload() -> workload.Workload:
    """A Workload without our side: shapes of the tiny model, one image, three concepts."""
    bench = workload.CONFIGS["tiny"]
    rng = np.random.default_rng(0)
    vocab, ids = 64, (60, 61, 62)
    prompt = np.full((77,), 1, np.int64)
    prompt[:6] = [0, 5, 6, 60, 7, 61]
    masks = np.zeros((3, 16, 16), np.float32)
    masks[0, :8], masks[1, 8:], masks[2] = 1, 1, 0
    return workload.Workload(
        bench=bench, resolution=32, latent=16, batch=1, timesteps=2, sample_steps=2, vocab_size=vocab,
        concept_ids=ids,
        table={"ids_PxT": prompt[None], "positions_PxC": np.array([[3, 5, -1]]), "image_P": np.zeros(1, int),
               "weight_P": np.ones(1)},
        latents_Ix2xZxhxw=rng.standard_normal((1, 2, 4, 16, 16)).astype(np.float32), masks_Cxhxw=masks,
        image_u8=np.zeros((32, 32, 3), np.uint8), image_ids_T=prompt, image_positions_C=np.array([3, 5, -1]),
        kinds=("object", "object", "background"), sample_ids_2xT=np.stack([prompt, prompt]))


def test_without_torch_only_ours_is_timed(tmp_path, monkeypatch, result):
    """torch missing (or --skip-torch): ours alone, no ratios, a note; the programs come from the compile cache."""
    monkeypatch.setattr(speed, "torch_available", lambda: False)
    got = speed.run(speed.Options("tiny", iters=1, timesteps=2, sample_steps=2, out=str(tmp_path),
                                  groups=("token", "estep")))
    assert set(got["steps"]) == {"token", "e_attn", "e_crf", "e_step"}
    for row in got["steps"].values():
        assert _positive(row["ours_ms"]) and "torch_ms" not in row and "speedup" not in row
    assert got["torch_reference_check"] is None and "torch" not in got["estep_share"]
    assert any("not importable" in n for n in got["notes"])
    assert json.loads((tmp_path / "speed.json").read_text())["config"]["step_groups"] == ["token", "estep"]
    text = speed.format_tables(got)
    assert "token step" in text and "sample" not in text.split("E-step share")[0]


def test_bad_step_group_is_a_clear_error(capsys):
    assert speed.main(["--steps", "token,warp"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_tiny_sdxl_is_timed_by_both_with_sdxls_conditioning(tmp_path):
    """`--config tiny-sdxl`: SDXL's structure in miniature (`--config sdxl` is SDXL base at 1024 px, for an
    accelerator): both text encoders, the pooled embedding and the time ids on both sides, zero unconditional text
    in the sample; the reference's token step moves only the concept rows, in both of its tables. The joint steps
    are left out here (their compiles cost a minute; they share the token step's code on both sides)."""
    assert speed.main(["--config", "tiny-sdxl", "--iters", "1", "--timesteps", "2", "--sample-steps", "2",
                       "--torch-threads", "1", "--steps", "token,estep,sample", "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "speed.json").read_text())
    assert set(got["steps"]) == {"token", "e_attn", "e_crf", "e_step", "sample"}
    for name, row in got["steps"].items():
        assert _positive(row["ours_ms"]) and _positive(row["torch_ms"]), name
    cfg = got["config"]
    assert cfg["name"] == "tiny-sdxl" and cfg["text_2"] == model.TINY_SDXL_TEXT_2
    assert cfg["attn_grid"] == 8 and cfg["estep_grids"] == [8]  # tiny-sdxl's cross-attention grid
    check = got["torch_reference_check"]
    assert check["changed_rows"] == sorted(check["concept_ids"])  # both tables: the other rows restored
    assert all(math.isfinite(x) and x > 0 for x in check["losses"] + got["ours_token_losses"])
