"""Packaging beyond what pyproject.toml can say: the config tree ``conf/`` ships inside the package as ``jdiff.conf``
(installed as jdiff/conf/, its groups as data folders), while in the checkout it stays at the top, where the
developers edit it. Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

CONF = ["jdiff.conf", *(f"jdiff.conf.{group}" for group in find_namespace_packages(where="conf"))]

# hydra_plugins.jdiff_gpu_pool: the sweep launcher (Hydra finds launchers only in the hydra_plugins namespace)
setup(packages=[*find_namespace_packages(include=["jdiff", "jdiff.*"]), "hydra_plugins.jdiff_gpu_pool", *CONF],
      package_dir={"jdiff.conf": "conf"})
