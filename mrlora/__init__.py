"""mrlora: MapReduce LoRA for text-to-image flow models (algorithms that run on compute nodes).

Importing the package is cheap (no torch): login-node code imports ``mrlora.config`` and ``mrlora.runstore``.
"""

__version__ = "0.1.0"
