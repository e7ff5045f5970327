"""Model tooling: synthetic spectra for tests and demos, training of a model on them, and the
import of astroNN's published Keras model into a checkpoint the worker loads.

Imports the science core; neither the science core nor the service imports this package (the
command line's ``synth``, ``train`` and ``import-model`` do).
"""
