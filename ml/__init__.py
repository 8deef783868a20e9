"""Models, training and inference for T1 <-> T2 MRI synthesis.

Modules (import them explicitly; this package imports nothing heavy, torch
included, so the receiving process stays light):

* :mod:`ml.inference` - ``load_model`` / ``synthesize``, the API the node uses
* :mod:`ml.networks` - U-Net, CycleGAN generator / discriminator, one factory
* :mod:`ml.data` - 16-bit safe reading, canonical orientation, masks, normalization
* :mod:`ml.checkpoint` - safetensors + JSON checkpoints, ``CheckpointError``
* :mod:`ml.train` (with :mod:`ml.train_folds`, :mod:`ml.train_cyclegan`, :mod:`ml.warmstart`), :mod:`ml.precision`, :mod:`ml.evaluate`, :mod:`ml.metrics` - research side
* ``ml/weights/`` - the shipped default models (see MODEL_CARD.md)
"""
