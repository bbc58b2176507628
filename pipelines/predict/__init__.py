"""``step predict``: apply a trained or registered STEP model to a folder of images.

settings.py   PredictSettings (one typed model: YAML, ``--set`` and flags)
source.py     what ``--model`` names: a checkpoint, or ``models:/NAME/VERSION`` (its
              checkpoint, thresholds and dataset, through :mod:`pipelines.tracking`)
palette.py    colours of the class masks (the dataset's own, else a fixed one)
images.py     listing and decoding the input images; bad ones become skip records
writer.py     the per-image PNGs (class ids, colours, token maps) and the summary
predictor.py  the model on one worker: batches by image size, GFLOPs, tokens, outputs
runner.py     the command: local loop, or Ray Data ``map_batches`` over a cluster
"""
