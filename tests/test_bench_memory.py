"""The memory benchmark on the tiny architecture, CPU target (no libtpu needed): XLA's memory analysis of the token
step, the E-step pass and the joint step, full and LoRA, built from abstract parameters. The figures behave as the
programs do: the joint step holds the UNet, its gradients' AdamW moments and the donated state; LoRA holds the
frozen UNet once; bfloat16 halves the frozen weights. Entries are cached by fingerprint and redone by --force."""

import contextlib
import io
import json

import pytest

from jaxconcept.bench import memory
from jaxconcept.errors import JaxconceptError
from jaxconcept.parallel import sharding

PROGRAMS = "token:fp32,estep:fp32+bf16,joint:fp32+lora4"


def _main(*argv) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert memory.main(list(argv)) == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    printed = _main("--presets", "tiny", "--programs", PROGRAMS, "--out", str(out), "--jobs", "2")
    return out, printed, json.loads(out.read_text())


def _entry(results, program, option):
    return results["entries"][memory.entry_id("tiny", program, option, "cpu")]


def test_figures_are_consistent_and_the_frozen_model_is_an_argument(first):
    _, _, results = first
    assert len(results["entries"]) == 5
    for e in results["entries"].values():
        assert e["peak_bytes"] == e["argument_bytes"] + e["output_bytes"] - e["alias_bytes"] + e["temp_bytes"]
        assert e["argument_bytes"] > 0 and e["temp_bytes"] > 0 and e["compile_s"] > 0
        assert e["fingerprint"] and e["jax"] and e["resolution"] == 32 and e["latent"] == 16
    model_bytes = lambda e: e["unet_param_bytes"] + e["text_param_bytes"]  # noqa: E731
    token, estep = _entry(results, "token", "fp32"), _entry(results, "estep", "fp32")
    assert token["argument_bytes"] >= model_bytes(token)  # UNet and text encoder frozen, passed in
    # the E-step never reads the UNet's last level (it keeps the maps, not the prediction): jit leaves those
    # weights out of its arguments, and the entry counts them as held but unread
    assert 0 < estep["unread_bytes"] < 0.1 * model_bytes(estep) and token["unread_bytes"] < 1024
    assert estep["argument_bytes"] + estep["unread_bytes"] >= model_bytes(estep)
    assert token["trainable_bytes"] == 3 * 32 * 4 and token["opt_state_bytes"] >= 2 * token["trainable_bytes"]
    # the E-step runs 50 timesteps in one batch: its activations outweigh the token step's batch of 1
    assert estep["temp_bytes"] > token["temp_bytes"]


def test_joint_step_holds_unet_and_adam_moments_lora_far_less(first):
    _, _, results = first
    full, lora = _entry(results, "joint", "fp32"), _entry(results, "joint", "lora4")
    unet = full["unet_param_bytes"]
    assert full["argument_bytes"] >= 3 * unet  # the UNet and AdamW's two moments
    assert full["opt_state_bytes"] >= 2 * unet and full["trainable_bytes"] >= unet
    # the state is donated: the new state is written over it
    assert full["alias_bytes"] >= 0.9 * (full["trainable_bytes"] + full["opt_state_bytes"])
    # LoRA: the frozen UNet once, small adapters and their moments
    assert lora["trainable_bytes"] < 0.1 * unet
    assert unet <= lora["argument_bytes"] < 0.5 * full["argument_bytes"]
    assert lora["peak_bytes"] < full["peak_bytes"]


def test_bfloat16_halves_the_frozen_weights(first):
    _, _, results = first
    fp32, bf16 = _entry(results, "estep", "fp32"), _entry(results, "estep", "bf16")
    weights = fp32["unet_param_bytes"] + fp32["text_param_bytes"]
    assert bf16["unet_param_bytes"] * 2 == fp32["unet_param_bytes"]
    expected = fp32["argument_bytes"] - weights / 2  # rows, prompt ids, latents: a few kB
    assert abs(bf16["argument_bytes"] - expected) <= 0.02 * fp32["argument_bytes"]


def test_printed_table_has_a_row_per_entry(first):
    _, printed, results = first
    lines = printed.splitlines()
    for eid in results["entries"]:
        assert sum(line.startswith(eid + " ") for line in lines) == 1, eid
        assert any(f"{eid}: compiled in" in line for line in lines)


def test_cache_skips_present_entries_and_force_recomputes(first, monkeypatch):
    out, _, results = first
    calls = []
    build = memory.build_program

    def counting(program, st):
        calls.append((program, st.preset.name))
        return build(program, st)

    monkeypatch.setattr(memory, "build_program", counting)
    printed = _main("--presets", "tiny", "--programs", PROGRAMS, "--out", str(out))
    assert calls == [] and printed.count(": kept (fingerprint") == 5
    assert json.loads(out.read_text())["entries"] == results["entries"]
    printed = _main("--presets", "tiny", "--programs", "estep:fp32", "--out", str(out), "--force")
    assert calls == [("estep", "tiny")] and "tiny/estep/fp32/cpu: compiling" in printed
    again = json.loads(out.read_text())["entries"]
    assert set(again) == set(results["entries"])
    assert again["tiny/token/fp32/cpu"] == results["entries"]["tiny/token/fp32/cpu"]
    assert "--force" in again["tiny/estep/fp32/cpu"]["command"]


def test_report_renders_the_page(first, tmp_path):
    out, _, results = first
    md = tmp_path / "memory.md"
    _main("--out", str(out), "--md", str(md), "--report")
    text = md.read_text()
    assert "## What fits" in text and "arguments + outputs - aliased + temporaries" in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny | 32 | ")]
    assert len(rows) == len(results["entries"])
    assert "python -m jaxconcept.bench.memory --presets tiny" in text


def test_program_options_checked():
    assert memory.parse_programs("token,joint:lora4+fp32", ["fp32", "bf16", "lora16"]) == [
        ("token", "fp32"), ("token", "bf16"), ("joint", "lora4"), ("joint", "fp32")]
    with pytest.raises(JaxconceptError, match="dtype only"):
        memory.parse_programs("token:lora4", ["fp32"])
    with pytest.raises(JaxconceptError, match="unknown option set"):
        memory.parse_programs("joint:lora3", ["fp32"])


def test_sdxl_programs_build_with_both_text_encoders_on_the_tiny_sdxl_architecture():
    """The SDXL presets' programs take both encoders' weights (frozen) and rows of both tables' width; lowered only
    (the `sdxl` preset's programs lower the same way, in minutes: SDXL's joint step took 6 minutes on 2 busy cores)."""
    target = memory.make_target("cpu")
    for program, option in (("token", "mea"), ("estep", "mea_chunk10")):
        st = memory.make_setup(memory.PRESETS["tiny-sdxl"], option, target)
        frozen, _ = memory._frozen(st)
        assert sorted(frozen) == ["text_encoder", "text_encoder_2", "unet"] and st.rows.shape == (3, 32 + 64)
        lowered, trees, _ = memory.lower(st, program)
        assert trees["text_param_bytes"] > sharding.tree_bytes(st.bundle.params["text_encoder"])
        assert len(memory.fingerprint(st, program, target)) == 16
    sdxl = memory.PRESETS["sdxl"]
    s = sdxl.settings(memory.option_overrides("fp32"))
    assert (sdxl.resolution(s), tuple(s.masks.resolutions), s.tokens.attn_resolution) == (1024, (32, 64), 32)
    assert sdxl.text_2["hidden_size"] + sdxl.text["hidden_size"] == sdxl.unet["cross_attention_dim"]


def test_execute_runs_each_program_once_in_a_process_of_its_own(tmp_path):
    """--execute: the compiled program runs on placeholder inputs in a spawned process; the CPU backend keeps no
    allocator statistics, so its peak is left out with the reason, and the entry is kept on a second call."""
    out = tmp_path / "memory.json"
    _main("--presets", "tiny", "--programs", "token:fp32", "--execute", "--out", str(out))
    e = _entry(json.loads(out.read_text()), "token", "fp32")
    assert e["executed"] and e["run_s"] > 0
    assert e["run_peak_bytes"] is None and "keeps no allocator statistics" in e["run_note"]
    assert "kept (fingerprint" in _main("--presets", "tiny", "--programs", "token:fp32", "--execute", "--out",
                                        str(out))


def test_a_compiled_only_entry_is_run_again_when_execute_asks(first, tmp_path):
    out = tmp_path / "memory.json"
    out.write_text(first[0].read_text())
    assert "joint" not in _main("--presets", "tiny", "--programs", "token:fp32", "--out", str(out)).split("kept")[0]
    printed = _main("--presets", "tiny", "--programs", "token:fp32", "--execute", "--out", str(out))
    assert "in a process of its own (compiled before, not run)" in printed and "ran in" in printed
    assert _entry(json.loads(out.read_text()), "token", "fp32")["executed"]


class _Device:
    platform = "gpu"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_run_once_feeds_zeros_and_keys_placed_as_compiled_and_reads_the_allocators_peak():
    import jax
    import jax.numpy as jnp

    from jaxconcept.bench import run_peak

    def step(state, key):
        return {"w": state["w"] + jax.random.normal(key, state["w"].shape), "n": state["n"] + 1}

    lowered = jax.jit(step, donate_argnums=0).lower(
        {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32), "n": jax.ShapeDtypeStruct((), jnp.int32)},
        jax.eval_shape(lambda: jax.random.key(0)))
    compiled = lowered.compile()
    args = run_peak.placeholder_args(lowered, compiled)
    assert args[0]["w"].shape == (4, 3) and float(jnp.abs(args[0]["w"]).sum()) == 0.0 and args[0]["n"].dtype == jnp.int32
    assert jax.dtypes.issubdtype(args[1].dtype, jax.dtypes.prng_key)
    measured = run_peak.run_once(lowered, compiled, _Device({"peak_bytes_in_use": 12345, "bytes_limit": 80 << 30}))
    assert measured["run_peak_bytes"] == 12345 and measured["run_bytes_limit"] == 80 << 30 and measured["run_s"] >= 0
    assert run_peak.run_once(lowered, compiled, _Device(None))["run_peak_bytes"] is None


def test_execute_refuses_targets_compiled_ahead_of_time(tmp_path, capsys):
    assert memory.main(["--presets", "tiny", "--programs", "token:fp32", "--target", "tpu-v5e", "--execute",
                        "--out", str(tmp_path / "m.json")]) == 2
    assert "compiled ahead of time" in capsys.readouterr().err
