"""graphopt.backends: one module (or package) per target; importing this package registers them all and
exposes each one's public names (`graphopt.backends.OrtMobile`)."""

import importlib
import pkgutil

__all__: list[str] = []

for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
