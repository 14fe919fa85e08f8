"""Images (dataset.modality: image): the parts each stage dispatches to (docs/images.md).

- sources.py: ingest: a class-folder directory, a Parquet table of image bytes or IDX files, into one raw table;
- decode.py: decoding and checking one image, and turning images into uint8 (C, H, W) arrays;
- validate.py: validate: every image decoded and checked against the suite, failures quarantined with reasons,
  class balance against the reference;
- shards.py: preprocess: decode and resize on Dask into uint8 .npy shards per split, with per-channel
  normalisation statistics fitted on train;
- loader.py: train: the shards streamed in a global order every rank shares, each rank its slice of every
  batch, read and augmented in a background thread;
- predict.py: batch inference on a directory or a table of images, undecodable ones rejected with reasons.
"""
