"""Low-rank adapters (LoRA) on a frozen UNet, as intercepted Flax modules.

The joint stage can tune, instead of the whole UNet, a pair of small matrices per target layer: the layer's
output becomes  W x + scale * B(A x)  with A (in x r) and B (r x out), scale = alpha / r, B starting at
zero so the adapted UNet starts as the base one. The UNet's own weights stay frozen (one shared copy, never
in the optimiser, the checkpoints or the FSDP split); the adapters are a small pytree shaped like the UNet's
params, holding {"a", "b"} at each target module's path.

Training applies them on the fly (`interceptor`, entered around the UNet's apply in `model/capture.py`), so
gradients and optimiser state exist for the adapters only; sampling merges them into the weights once
(`merge`). The file users take elsewhere is PEFT's layout, which PyTorch diffusers' `load_lora_weights`
reads (`to_peft`, `from_peft`): `unet.<module>.lora_A.weight` r x in, `...lora_B.weight` out x r (1x1 convs:
r x in x 1 x 1 and out x r x 1 x 1), the rank and alpha in the file's `lora_adapter_metadata`.

Shape letters: I/O the layer's input/output features, R the rank.
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import adapter
from .. import settings

# target groups users name in joint.lora_targets ("attention+ff+proj"): the modules of every transformer block
GROUPS = {
    "attention": (("attn1", "to_q"), ("attn1", "to_k"), ("attn1", "to_v"), ("attn1", "to_out_0"),
                  ("attn2", "to_q"), ("attn2", "to_k"), ("attn2", "to_v"), ("attn2", "to_out_0")),
    "ff": (("ff", "net_0", "proj"), ("ff", "net_2")),
    "proj": (("proj_in",), ("proj_out",)),  # the Transformer2D's projections (1x1 convs in SD 1.x, dense in 2.x)
}
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights records the LoraConfig
PREFIX = "unet."


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Rank, alpha and target groups (hashable: part of a compiled program's identity)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = ("attention",)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


parse_targets = settings.lora_targets  # "attention+ff" -> ("attention", "ff")
assert tuple(GROUPS) == settings.LORA_TARGETS


def _is_target(path: tuple[str, ...], targets) -> bool:
    in_block = any(p.startswith("transformer_blocks_") for p in path)
    for group in targets:
        for tail in GROUPS[group]:
            if tuple(path[-len(tail):]) == tail and (group == "proj" or in_block):
                return True
    return False


def target_paths(unet_params, targets) -> list[tuple[str, ...]]:
    """Module paths (tuples of names) of the layers adapted: dense kernels I x O and 1x1 conv kernels."""
    out = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(unet_params)[0]:
        names = tuple(str(k.key) for k in key_path)
        if names[-1] != "kernel" or not _is_target(names[:-1], targets):
            continue
        if leaf.ndim == 2 or (leaf.ndim == 4 and leaf.shape[:2] == (1, 1)):
            out.append(names[:-1])
    return out


def _io(kernel) -> tuple[int, int]:
    return int(kernel.shape[-2]), int(kernel.shape[-1])


def _get(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return out


def _flat(tree, prefix=()) -> dict:
    """{module path: {"a", "b"}} of an adapters tree."""
    if "a" in tree and "b" in tree:
        return {prefix: tree}
    out = {}
    for name, sub in tree.items():
        out.update(_flat(sub, prefix + (name,)))
    return out


def init(key, unet_params, spec: LoraSpec) -> dict:
    """Adapters for every target layer: A uniform in +-1/sqrt(I) (PEFT's Kaiming init), B zero."""
    paths = target_paths(unet_params, spec.targets)
    if not paths:
        raise ValueError(f"the UNet has no layer matching LoRA targets {'+'.join(spec.targets)}")
    flat = {}
    for i, path in enumerate(paths):
        d_in, d_out = _io(_get(unet_params, path + ("kernel",)))
        bound = 1.0 / np.sqrt(d_in)
        a_IxR = jax.random.uniform(jax.random.fold_in(key, i), (d_in, spec.rank), jnp.float32, -bound, bound)
        flat[path] = {"a": a_IxR, "b": jnp.zeros((spec.rank, d_out), jnp.float32)}
    return _nest(flat)


def count(adapters) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))


def interceptor(adapters, scale: float):
    """A `nn.intercept_methods` function adding scale * (x A) B to every adapted Dense / 1x1 Conv's output."""
    flat = _flat(adapters)

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
            return out
        ab = flat.get(tuple(module.scope.path))
        if ab is None:
            return out
        x = args[0]
        low = jnp.einsum("...i,ir->...r", x.astype(jnp.float32), ab["a"])
        delta = jnp.einsum("...r,ro->...o", low, ab["b"]) * scale
        return out + delta.astype(out.dtype)

    return intercept


def merge(unet_params, adapters, scale: float):
    """The UNet's params with every adapter folded into its kernel (W + scale A B), for sampling."""
    flat = _flat(adapters)

    def fold(key_path, leaf):
        names = tuple(str(k.key) for k in key_path)
        ab = flat.get(names[:-1]) if names[-1] == "kernel" else None
        if ab is None:
            return leaf
        delta_IxO = (jnp.asarray(ab["a"], jnp.float32) @ jnp.asarray(ab["b"], jnp.float32)) * scale
        return (leaf.astype(jnp.float32) + delta_IxO.reshape(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fold, unet_params)


def _pt_module(path: tuple[str, ...]) -> str:
    """PyTorch diffusers' module name of a Flax UNet module path ("down_blocks_0/.../to_out_0" ->
    "down_blocks.0....to_out.0")."""
    name, _ = adapter.flax_to_pt_key(path + ("kernel",), np.zeros((1, 1), np.float32))
    return name.removesuffix(".weight")


def to_peft(adapters, spec: LoraSpec, unet_params) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a PEFT LoRA file for PyTorch diffusers' `pipe.load_lora_weights`."""
    tensors, modules = {}, []
    for path, ab in sorted(_flat(adapters).items()):
        module = _pt_module(path)
        a_IxR, b_RxO = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        conv = _get(unet_params, path + ("kernel",)).ndim == 4
        a, b = np.ascontiguousarray(a_IxR.T), np.ascontiguousarray(b_RxO.T)
        if conv:
            a, b = a[:, :, None, None], b[:, :, None, None]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
        modules.append(module)
    config = {"r": spec.rank, "lora_alpha": float(spec.alpha), "target_modules": modules,
              "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False}
    meta = {f"unet.{k}": v for k, v in config.items()}
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True),
                     "jaxconcept_lora_targets": "+".join(spec.targets)}


def from_peft(tensors: dict, metadata: dict, unet_params) -> tuple[dict, LoraSpec]:
    """The adapters and spec of a file `to_peft` wrote (or any PEFT UNet LoRA on these layers)."""
    try:
        meta = json.loads((metadata or {})[METADATA_KEY])
        rank, alpha = int(meta["unet.r"]), float(meta["unet.lora_alpha"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"not a PEFT LoRA file with its rank and alpha recorded ({e})") from e
    targets = tuple((metadata.get("jaxconcept_lora_targets") or "attention").split("+"))
    by_module = {_pt_module(p): p for p in target_paths(unet_params, tuple(GROUPS))}
    flat = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        if module not in by_module:
            raise ValueError(f"LoRA layer {module!r} is not an adaptable layer of this UNet")
        a = np.asarray(tensors[key], np.float32).reshape(rank, -1)
        b = np.asarray(tensors[f"{PREFIX}{module}.lora_B.weight"], np.float32).reshape(-1, rank)
        flat[by_module[module]] = {"a": jnp.asarray(a.T), "b": jnp.asarray(b.T)}
    if not flat:
        raise ValueError("the LoRA file holds no UNet layer")
    return _nest(flat), LoraSpec(rank, alpha, targets)
