"""A run's inputs and files: what is read before training and written (and read back) after.

`inputs` (images and concepts: the `--concepts` grammar, user masks), `images` (image files: read as
displayed, crop or pad), `runfolder` (fingerprint, lock, metrics, results), `outputs` (the files a run
writes), `runs` (loading a finished run back), `checkpoints` (Orbax checkpoints), `viz` (heat maps,
overlays, labelled grids).
"""
