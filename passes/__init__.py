"""graphopt.passes: one module per pass; importing this package registers them all and exposes
each module's public names, so `graphopt.passes.Quantize(weight_bits=4)` builds a pass."""

import importlib
import pkgutil

__all__: list[str] = []

for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
