"""The EM concept learner: the loop, its stage functions and the jitted steps they drive.

`learner` (the loop: stages, rounds, resume), `stages` (the stage functions the loop drives, their one builder
and a single run's placement), `jobs` (J concept sets in one vmapped program: their placement, preparing and
learning them), `steps` (jitted token step, joint step, E-step attention pass), `losses` (masked diffusion loss,
cross-attention loss), `data` (cached latents, prompt table, batch draw), `prepare` (a run prepared before the
loop: inputs checked, concept tokens, latents, prompt table).
"""
