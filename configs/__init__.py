"""Presets (ml_collections ``get_config()`` modules) and cluster profiles (``clusters/*.toml``).

Users name presets with dashes (``tiny-sd3``); the module is the underscore form (``configs/tiny_sd3.py``).
Every preset starts from :func:`configs.common.base_config`, which documents each field once.
"""
