"""The EM concept learner: the loop, its stage functions and the jitted steps they drive.

`learner` (the loop: stages, rounds, resume), `stages` (the stage functions a single run's loop drives),
`jobs` (J concept sets in one vmapped program), `steps` (jitted token step, joint step, E-step attention pass),
`losses` (masked diffusion loss, cross-attention loss), `data` (cached latents, prompt table, batch draw),
`prepare` (a run prepared before the loop: inputs checked, concept tokens, latents, prompt table).
"""
