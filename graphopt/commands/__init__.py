"""graphopt.commands: one module per extra `graphopt` subcommand; importing this package registers them.

A module here calls `graphopt.cli.register_command(name, add_arguments, run, help)` at import time
and keeps heavy imports inside `run`, so `graphopt --help` stays fast.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
