"""Masks from cross-attention: aggregation, the E-step, labels, settling and both CRFs.

`aggregate` (heads → layers → resolutions → tokens, shared by the loss and the masks), `estep` (the host
E-step: soft maps → labels, CRF, clean-up per image; round metrics), `labels` (maps → non-overlapping labels,
clean-up, IoU), `settle` (how EM's masks settle across rounds), `crf` (host DenseCRF), `crf_exact` (exact
dense CRF in JAX on the device).
"""
