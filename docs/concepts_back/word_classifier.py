"""Does the base model's own denoising tell which init word is which object? (a diffusion classifier, section 22)

For each bench scene: the two objects' true regions; for each object's word ("a ring", "a circle": its shape, or its
colour with the last argument `color`), the base model's noise-prediction error over N draws of (t, noise), the same
draws for every word, averaged over each region. The words are assigned right when the sum over the right pairs is
the smaller: the word names the object whose pixels it helps denoise. No training; the init words only.
python docs/concepts_back/word_classifier.py SET SEEDS N [TMIN TMAX [PROMPT_FORM [shape|color]]]
e.g. python docs/concepts_back/word_classifier.py hard 0,1,2,3,4,5,6,7,8 64 300 700 "a {w}" shape"""
import sys, numpy as np, jax, jax.numpy as jnp
from jaxconcept.model import load_model, tokens as tk, capture, diffusion
from jaxconcept.em import steps
from jaxconcept.bench import fidelity as bf

which, seeds, n = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3])
tmin, tmax = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (100, 900)
b = load_model("toy"); sm = steps.step_model(b)
prompt_form = sys.argv[6] if len(sys.argv) > 6 else "a {w}"

@jax.jit
def errs(params, lat, ctx_P, key):
    kt, kn = jax.random.split(key)
    t = jax.random.randint(kt, (n,), tmin, tmax)
    eps = jax.random.normal(kn, (n,) + lat.shape)
    x = diffusion.add_noise(sm.alphas(), jnp.broadcast_to(lat, eps.shape), eps, t)
    def one(ctx):
        e = capture.unet_eps(b.unet, params["unet"], x, t, jnp.broadcast_to(ctx, (n,) + ctx.shape[1:]))
        return jnp.mean((e - eps) ** 2, axis=1)  # n x h x w
    return jax.vmap(one)(ctx_P)  # P x n x h x w
right = 0
for s in seeds:
    sc = bf.make_bench_scene(which, s, 64)
    img = jnp.asarray(sc.image, jnp.float32)[None] / 127.5 - 1
    mean, _ = diffusion.encode_images(b.vae, b.params["vae"], img)
    lat = mean[0] * b.latent_scale
    objs = sc.objects
    words = [getattr(o, sys.argv[7] if len(sys.argv) > 7 else "shape") for o in objs]
    prompts = [prompt_form.format(w=w) for w in words]
    ids = tk.tokenize(b.tokenizer, prompts, b.max_length)
    ctx = sm.condition(b.params, jnp.asarray(ids), lat.shape[1:])
    ctx = jnp.asarray(ctx)[:, None]
    E = np.asarray(errs(b.params, lat, ctx, jax.random.PRNGKey(s)))  # P x n x h x w
    h = lat.shape[1]
    regs = [np.asarray(sc.masks[o.name]).reshape(h, 64 // h, h, 64 // h).mean((1, 3)) > 0.5 for o in objs]
    C = np.array([[E[k][:, r].mean() for r in regs] for k in range(len(words))])
    # paired per-draw difference for a standard error
    d = np.array([E[0][:, regs[0]].mean(1) + E[1][:, regs[1]].mean(1) - E[0][:, regs[1]].mean(1) - E[1][:, regs[0]].mean(1)])
    ok = C[0, 0] + C[1, 1] < C[0, 1] + C[1, 0]
    right += ok
    print(which, s, words, [o.color + ' ' + o.pattern for o in objs], "C=", np.round(C, 4).tolist(), "diff %.4f se %.4f" % (d.mean(), d.std() / np.sqrt(n)), "OK" if ok else "WRONG", flush=True)
print("right", right, "of", len(seeds))
