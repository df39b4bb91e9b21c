"""The package version: the one place it is written (``radial_jax.__version__``, ``setup.py``, ``--version``)."""
__version__ = "0.2.0"
