"""Decoding methods. Each module registers one proposer with ``@register``; importing this
package imports every module in it, so adding a method never edits the core."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
