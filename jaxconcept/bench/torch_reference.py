"""The PyTorch reference of the speed benchmark, written on diffusers' PyTorch UNet2DConditionModel /
AutoencoderKL / DDIMScheduler and transformers' CLIPTextModel (SDXL: and CLIPTextModelWithProjection, conditioned as
StableDiffusionXLPipeline conditions), built from the same configs with random weights.
It does what Break-a-Scene's trainer does: the whole embedding table requires grad and is in AdamW, the
non-concept rows are restored after each step; an attention processor keeps the chosen cross-attention
probabilities for the attention loss (SDPA everywhere else); the sample runs the cond/uncond halves as one batch
of 2. The tests' parity checks record cross-attention with the same processor (`record_cross_attention`).
The memory benchmark's PyTorch figure (`torch_training_memory`: Break-a-Scene's full UNet tuning, from parameter
counts on the meta device) is here too: the only modules that import diffusers / transformers model classes are
this one and `model/adapter/`.
torch is imported inside the functions: importing this module does not need it."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import math
import re
from typing import Any, Callable

import numpy as np

from ..model import loading as model
from .workload import (ATTN_WEIGHT, CLIP, GUIDANCE, LORA_ALPHA, LORA_RANK, STAGE_LR, WEIGHT_DECAY, Workload)

def torch_available() -> bool:
    try:
        for name in ("torch", "diffusers", "transformers"):
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 - absent or broken: the benchmark runs without it
        return False
    return True


class CaptureProcessor:
    """Attention processor: cross-attention at the chosen query counts (None: every one) forms its probabilities
    explicitly and appends them, with their graph, to `store` (B x heads x Q x T); everything else goes through
    SDPA."""

    def __init__(self, store: list, query_counts=None):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.store, self.sdpa = store, AttnProcessor2_0()
        self.query_counts = None if query_counts is None else set(query_counts)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        if (encoder_hidden_states is None or hidden_states.ndim != 3
                or (self.query_counts is not None and hidden_states.shape[1] not in self.query_counts)):
            return self.sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)
        residual = hidden_states
        batch, num_q, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        heads = attn.heads
        q, k, v = (x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
        self.store.append(probs)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(batch, num_q, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def record_cross_attention(unet) -> dict[str, list]:
    """A `CaptureProcessor` on every attention layer of a PyTorch UNet; returns {our layer path: the list its
    cross-attention probabilities are appended to} ("down_blocks.0.attentions.0.transformer_blocks.0.attn2" ->
    "down_blocks_0/attentions_0/transformer_blocks_0/attn2", the path `model/capture.py` names it by)."""
    stores, procs = {}, {}
    for name in unet.attn_processors:
        layer = name[: -len(".processor")]
        ours = re.sub(r"(\w+)\.(\d+)", r"\1_\2", layer).replace(".", "/")
        procs[name] = CaptureProcessor(stores.setdefault(ours, []))
    unet.set_attn_processor(procs)
    return stores


@dataclasses.dataclass
class TorchModels:
    text: Any
    unet: Any
    vae: Any
    alphas_cumprod: Any
    device: Any
    autocast_dtype: Any  # None: full precision
    text_2: Any = None  # SDXL: the second text encoder, CLIPTextModelWithProjection
    time_ids: Any = None  # SDXL: the workload image's micro-conditioning, 1 x 6

    @property
    def encoders(self) -> list:
        return [m for m in (self.text, self.text_2) if m is not None]


def torch_build(work: Workload, dtype: str, seed: int) -> TorchModels:
    """diffusers / transformers PyTorch models from the same configs, default random init."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bench = work.bench
    text = CLIPTextModel(CLIPTextConfig(**bench.text, vocab_size=work.vocab_size)).to(device).eval()
    text_2 = time_ids = None
    if bench.text_2 is not None:  # SDXL
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**bench.text_2, vocab_size=work.vocab_size))
        text_2 = text_2.to(device).eval()
        time_ids = torch.as_tensor(work.time_ids_K, device=device)[None]
    unet = UNet2DConditionModel(**bench.unet).to(device).eval()
    vae = AutoencoderKL(**bench.vae).to(device).eval()
    for m in (text, text_2, unet, vae):
        if m is not None:
            m.requires_grad_(False)
    sched = DDPMScheduler(**{k: v for k, v in model.SD_SCHEDULER.items()
                             if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    return TorchModels(text, unet, vae, sched.alphas_cumprod.to(device), device, autocast, text_2, time_ids)


def torch_condition(tm: TorchModels, ids) -> tuple:
    """(context, added_cond_kwargs or None) of prompt ids B x T. SD: the text encoder's last states. SDXL, as
    StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate states concatenated, the second's projected
    pooled state and the time ids. The second encoder reads the first tokenizer's ids: SDXL's second tokenizer pads
    with another token, which only the states after the end token read (same cost)."""
    import torch

    if tm.text_2 is None:
        return tm.text(ids)[0], None
    states_1 = tm.text(ids, output_hidden_states=True).hidden_states[-2]
    out_2 = tm.text_2(ids, output_hidden_states=True)
    context = torch.cat([states_1, out_2.hidden_states[-2]], dim=-1)
    return context, {"text_embeds": out_2.text_embeds, "time_ids": tm.time_ids.expand(ids.shape[0], -1)}


def _expand(cond: tuple, batch: int) -> tuple:
    """A one-prompt condition repeated for a batch."""
    context, added = cond
    grow = lambda x: x.expand(batch, *x.shape[1:])  # noqa: E731
    return grow(context), None if added is None else {k: grow(v) for k, v in added.items()}


def _autocast(tm: TorchModels):
    import contextlib

    import torch

    if tm.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(tm.device.type, dtype=tm.autocast_dtype)


def _sync(tm: TorchModels) -> None:
    import torch

    if tm.device.type == "cuda":
        torch.cuda.synchronize()


def torch_draw(rng: np.random.Generator, work: Workload, tm: TorchModels) -> dict:
    """One step's batch as `data.draw_batch` draws it (host RNG): prompt, flip, timestep, noise."""
    import torch

    t = work.table
    p = rng.choice(len(t["weight_P"]), size=work.batch, p=t["weight_P"])
    flip = rng.random(work.batch) < 0.5
    image = t["image_P"][p]
    lat = work.latents_Ix2xZxhxw[image, flip.astype(int)]
    m = np.where(flip[:, None, None, None], work.masks_Cxhxw[None, :, :, ::-1], work.masks_Cxhxw[None])
    dev = tm.device
    return {"ids": torch.as_tensor(t["ids_PxT"][p], dtype=torch.long, device=dev),
            "positions": torch.as_tensor(t["positions_PxC"][p], dtype=torch.long, device=dev),
            "latents": torch.as_tensor(np.ascontiguousarray(lat), device=dev),
            "masks": torch.as_tensor(np.ascontiguousarray(m), dtype=torch.float32, device=dev),
            "t": torch.as_tensor(rng.integers(0, 1000, work.batch), dtype=torch.long, device=dev)}


def torch_attention_maps(store: list, grid: int, positions):
    """B x C x grid x grid: captured probs averaged over heads and layers, the concepts' tokens picked,
    clamped at 0 and divided by their max (Break-a-Scene's attention loss input)."""
    import torch

    maps = torch.stack([p.float().mean(dim=1) for p in store]).mean(dim=0)  # B x Q x T
    b = maps.shape[0]
    maps = maps.reshape(b, grid, grid, -1).permute(0, 3, 1, 2)  # B x T x g x g
    picked = torch.gather(maps, 1, positions.clamp(min=0)[:, :, None, None].expand(-1, -1, grid, grid))
    picked = picked.clamp(min=0)
    return picked / (picked.amax(dim=(-2, -1), keepdim=True) + 1e-8)


def torch_concept_loss(tm: TorchModels, store: list, batch: dict, grid: int):
    """L_mask + 0.01 L_attn of one batch, as steps.concept_loss computes it (docs/method.md §2)."""
    import torch
    import torch.nn.functional as F

    latents = batch["latents"]
    noise = torch.randn_like(latents)
    a = tm.alphas_cumprod[batch["t"]].to(latents.dtype)[:, None, None, None]
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    store.clear()
    with _autocast(tm):
        context, added = torch_condition(tm, batch["ids"])
        eps = tm.unet(noisy, batch["t"], context, added_cond_kwargs=added).sample
    present = (batch["positions"] >= 0).float()
    union = (batch["masks"] * present[:, :, None, None]).amax(dim=1, keepdim=True)
    l_mask = (((eps.float() - noise) * union) ** 2).mean()
    maps = torch_attention_maps(store, grid, batch["positions"])
    small = F.interpolate(batch["masks"], size=(grid, grid), mode="nearest")
    l_attn = ((((maps - small) ** 2).mean(dim=(-2, -1))) * present).sum() / maps.shape[0]
    store.clear()
    return l_mask + ATTN_WEIGHT * l_attn


def make_torch_train_step(tm: TorchModels, work: Workload, stage: str, seed: int):
    """(step(), record): a Break-a-Scene step. The whole token table (SDXL: both tables) requires grad and sits in
    AdamW; the non-concept rows are written back after each step. Joint: the UNet's parameters join the optimizer;
    joint_lora: peft LoRA adapters (rank LORA_RANK on the attention projections) do instead."""
    import torch

    tables = [m.get_input_embeddings().weight for m in tm.encoders]
    emb = tables[0]
    for table in tables:
        table.requires_grad_(True)
    params = list(tables)
    if stage == "joint":
        tm.unet.requires_grad_(True)
        tm.unet.train()
        params += [p for p in tm.unet.parameters()]
    elif stage == "joint_lora":  # peft adapters on the frozen UNet, as diffusers' LoRA DreamBooth trains them
        from peft import LoraConfig

        tm.unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        tm.unet.train()
        params += [p for name, p in tm.unet.named_parameters() if "lora" in name]
        for p in params[len(tables):]:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=STAGE_LR[stage], betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    keep = torch.ones(emb.shape[0], dtype=torch.bool, device=tm.device)
    keep[list(work.concept_ids)] = False
    originals = [table.detach().clone() for table in tables]
    store: list = []
    tm.unet.set_attn_processor(CaptureProcessor(store, {work.attn_grid ** 2}))
    rng = np.random.default_rng(seed)
    record = {"losses": [], "grad_rows": None, "tables_before": [t.cpu().numpy() for t in originals]}

    def step():
        batch = torch_draw(rng, work, tm)
        opt.zero_grad(set_to_none=True)
        loss = torch_concept_loss(tm, store, batch, work.attn_grid)
        loss.backward()
        if record["grad_rows"] is None:
            record["grad_rows"] = emb.grad.detach().abs().sum(dim=1).cpu().numpy()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        with torch.no_grad():
            for table, before in zip(tables, originals):
                table[keep] = before[keep]
        record["losses"].append(loss.detach())
        _sync(tm)

    return step, record


def torch_release_training(tm: TorchModels, work: Workload) -> None:
    """Frozen again, any LoRA adapter removed (the next phase starts from the same model)."""
    for m in tm.encoders:
        m.get_input_embeddings().weight.requires_grad_(False)
    if getattr(tm.unet, "peft_config", None):
        tm.unet.delete_adapters(list(tm.unet.peft_config))
    tm.unet.requires_grad_(False)
    tm.unet.eval()
    for p in list(tm.unet.parameters()) + [p for m in tm.encoders for p in m.parameters()]:
        p.grad = None
    gc.collect()


def _changed_rows(tm: TorchModels, tables_before) -> np.ndarray:
    """The rows that differ from `tables_before` in any of the encoders' token tables (SDXL: both)."""
    changed = [np.any(m.get_input_embeddings().weight.detach().cpu().numpy() != before, axis=1)
               for m, before in zip(tm.encoders, tables_before)]
    return np.flatnonzero(np.any(changed, axis=0))


def torch_train_call(tm: TorchModels, work: Workload, stage: str, seed: int):
    """(step, finish): one reference train step per call; finish() releases the training state and returns what
    the step did (losses, the rows it changed in any table, the rows its gradient reached in the first)."""
    step, record = make_torch_train_step(tm, work, stage, seed)

    def finish() -> dict:
        changed = _changed_rows(tm, record["tables_before"])
        out = {"losses": [float(x) for x in record["losses"]], "changed_rows": [int(i) for i in changed],
               "grad_rows_nonzero": [int(i) for i in np.flatnonzero(record["grad_rows"] > 0)],
               "concept_grad_norm": [float(record["grad_rows"][i]) for i in work.concept_ids]}
        torch_release_training(tm, work)
        return out

    return step, finish


def torch_concept_maps(tm: TorchModels, work: Workload, store: list, generator):
    """C x h x w soft maps of the image's concepts: T timesteps in one batch, conditional branch only, under
    no_grad; per resolution mean over heads and layers, bilinear to latent size, mean over resolutions and
    timesteps, min-max normalised (as `steps.make_concept_maps`)."""
    import torch
    import torch.nn.functional as F

    n = work.timesteps
    latents = torch.tensor(work.latents_Ix2xZxhxw[0, 0], device=tm.device)[None].expand(n, -1, -1, -1)
    t = torch.randint(0, 1000, (n,), device=tm.device, generator=generator)
    noise = torch.randn(latents.shape, device=tm.device, generator=generator)
    a = tm.alphas_cumprod[t][:, None, None, None]
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    ids = torch.as_tensor(work.image_ids_T, dtype=torch.long, device=tm.device)[None]
    store.clear()
    with torch.no_grad(), _autocast(tm):
        context, added = _expand(torch_condition(tm, ids), n)
        tm.unet(noisy, t, context, added_cond_kwargs=added)
    by_q: dict[int, list] = {}
    for p in store:
        by_q.setdefault(p.shape[2], []).append(p.float().mean(dim=1))
    store.clear()
    h = work.latent
    resized = []
    for q, maps in by_q.items():
        g = math.isqrt(q)
        m = torch.stack(maps).mean(dim=0).reshape(n, g, g, -1).permute(0, 3, 1, 2)  # T x tokens x g x g
        resized.append(m if g == h else F.interpolate(m, size=(h, h), mode="bilinear", align_corners=False))
    agg = torch.stack(resized).mean(dim=0).clamp(min=0).mean(dim=0)  # tokens x h x w
    pos = torch.as_tensor(np.maximum(work.image_positions_C, 0), device=tm.device)
    soft = agg[pos]
    lo, hi = soft.amin(dim=(-2, -1), keepdim=True), soft.amax(dim=(-2, -1), keepdim=True)
    return (soft - lo) / (hi - lo + 1e-8)


def torch_estep_call(tm: TorchModels, work: Workload, seed: int) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    store: list = []
    tm.unet.set_attn_processor(CaptureProcessor(store, {g * g for g in work.estep_grids}))
    gen = torch.Generator(device=tm.device).manual_seed(seed)
    size = work.image_u8.shape[:2]

    def call():
        soft = torch_concept_maps(tm, work, store, gen)
        np.asarray(F.interpolate(soft[None], size=size, mode="bilinear", align_corners=False)[0].clamp(min=0).cpu())

    return call


def _sample_condition(tm: TorchModels, ids_2xT) -> tuple:
    """The guided sample's condition, uncond then cond: SD encodes both prompts; SDXL zeros the unconditional
    text states and pooled embedding (its pipelines' force_zeros_for_empty_prompt), keeping its time ids."""
    import torch

    if tm.text_2 is None:
        return torch_condition(tm, ids_2xT)
    context, added = torch_condition(tm, ids_2xT[1:])
    zero = lambda x: torch.cat([torch.zeros_like(x), x])  # noqa: E731
    return zero(context), {"text_embeds": zero(added["text_embeds"]), "time_ids": tm.time_ids.expand(2, -1)}


def torch_sample_call(tm: TorchModels, work: Workload, seed: int) -> Callable[[], None]:
    """Guided DDIM: text encoding of cond + uncond (SDXL: zero unconditional text, as StableDiffusionXLPipeline
    samples SDXL base without a negative prompt), `sample_steps` UNet calls on a batch of 2, VAE decode."""
    import torch
    from diffusers import DDIMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    tm.unet.set_attn_processor(AttnProcessor2_0())
    sched = DDIMScheduler(**model.SD_SCHEDULER)
    ids = torch.as_tensor(work.sample_ids_2xT, dtype=torch.long, device=tm.device)
    gen = torch.Generator(device=tm.device).manual_seed(seed)
    scale = float(work.bench.vae["scaling_factor"])

    @torch.no_grad()
    def call():
        with _autocast(tm):
            context, added = _sample_condition(tm, ids)
            latents = torch.randn((1, 4, work.latent, work.latent), device=tm.device, generator=gen)
            sched.set_timesteps(work.sample_steps, device=tm.device)
            latents = latents * sched.init_noise_sigma
            for t in sched.timesteps:
                x = sched.scale_model_input(torch.cat([latents, latents]), t)
                eps_u, eps_c = tm.unet(x, t, context, added_cond_kwargs=added).sample.chunk(2)
                latents = sched.step(eps_u + GUIDANCE * (eps_c - eps_u), t, latents).prev_sample
            image = tm.vae.decode(latents / scale).sample.clamp(-1, 1)
        np.asarray(image.float().cpu())

    return call


def torch_training_memory(preset, num_concepts: int) -> dict | None:
    """Break-a-Scene-style full UNet tuning in PyTorch (diffusers / transformers models built from the same configs
    on the meta device: parameter counts only): the UNet and the whole token table trainable in fp32 with AdamW
    (4 bytes of weight, 4 of gradient, 8 of moments per parameter), the rest of the text encoder and the VAE frozen
    in fp32 (4 bytes). Arithmetic from the parameter counts; no activations. None without torch. `preset`:
    a `memory.Preset`; `num_concepts`: the concept rows added to its token table."""
    try:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    except Exception:  # noqa: BLE001 - absent or broken: the reference is left out
        return None
    vocab = preset.base_vocab() + num_concepts
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in preset.unet.items()})
        text = CLIPTextModel(CLIPTextConfig(**dict(preset.text, vocab_size=vocab)))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(preset.text_2, vocab_size=vocab))) \
            if preset.text_2 else None
        vae = AutoencoderKL(**{k: list(v) if isinstance(v, tuple) else v for k, v in preset.vae.items()})

    def count(m):
        return int(sum(p.numel() for p in m.parameters()))

    n_unet, n_text, n_vae = count(unet), count(text), count(vae)
    n_table = int(text.get_input_embeddings().weight.numel())
    if text_2 is not None:  # SDXL: both encoders, both token tables
        n_text += count(text_2)
        n_table += int(text_2.get_input_embeddings().weight.numel())
    trained = n_unet + n_table
    frozen = n_text - n_table + n_vae
    return {"unet_params": n_unet, "text_params": n_text, "table_params": n_table, "vae_params": n_vae,
            "trained_state_bytes": 16 * trained, "frozen_bytes": 4 * frozen,
            "total_bytes": 16 * trained + 4 * frozen, "torch": torch.__version__}
