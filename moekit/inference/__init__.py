"""Predictions on new files and self-contained model artifacts.

- :mod:`moekit.inference.inputs`: a run's input pipeline (modalities, preprocessing,
  normalisation), read off its dataset, applied to image files, folders and CSV tables;
- :mod:`moekit.inference.predictor`: one input through the model: probabilities, decisions
  at the run's thresholds, dense maps on the photograph's own pixels, the experts selected;
- :mod:`moekit.inference.outputs` and :mod:`moekit.inference.overlay`: ``predictions.csv``,
  mask PNGs and one overlay figure per input;
- :mod:`moekit.inference.artifact`: ``moekit export`` and :func:`load_artifact`, a folder that
  predicts without the run directory or its dataset.

Nothing here names a dataset: what is specific to one (a fundus photograph's field of view)
comes from its ``PREPROCESS`` step and its task config.
"""
