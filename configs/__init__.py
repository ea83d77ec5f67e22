"""Experiment configs, one file per experiment (`get_config(arg)`).

Installed as the package `datafree_jax.configs` (datafree_jax/configs links here), so that
`--config=mnist5k` finds them after a non-editable install and config files can import each
other.
"""
