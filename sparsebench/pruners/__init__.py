"""Pruning methods: one file each, registered in METHODS by `@METHODS.register("<name>")`,
with its options in conf/method/<name>.yaml (docs/contributing.md).

Importing this package imports every module in it, so a new method file is found without
editing a list here. Methods may import the package's foundations (errors, registry,
sparsity, masks, models, data, lowrank), plan.Terms and engine/ (the driver, the training loop, the
ADMM engine); never records/, evaluation/ or run.
"""

import importlib
import pkgutil

from .base import PruneContext, Pruner  # noqa: F401

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # each registers its methods
