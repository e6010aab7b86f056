"""The pass contract: options as a frozen dataclass, run_fx / run_onnx entry points, a name registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.ir import Form, Model
from graphopt.pipeline.options import Options

__all__ = ["Pass", "PassResult", "PassContext", "register_pass", "PASSES"]

PASSES: dict[str, type["Pass"]] = {}


@dataclass
class PassResult:
    """What a pass returns: the model (possibly the same object), whether it changed, and stats."""

    model: Model
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What the pass manager hands every pass: calibration feeds, a progress switch, a lowering.

    calib: feeds (input name -> numpy array) for calibration; None when the user gave none.
    progress: whether long work may show a progress bar.
    lower: the manager's FX -> ONNX lowering (see `lowered`).
    """

    calib: list[dict[str, np.ndarray]] | None = None
    progress: bool = True
    lower: Callable[[Model], Model] | None = None

    def lowered(self, model: Model) -> Model:
        """The ONNX form of an FX `model`, made by the pass manager's lowering (cached by content),
        for a pass whose FX form reads structure found on the ONNX graph; the model is not changed."""
        if self.lower is None:
            from graphopt.lowering import lower

            return lower(model, log=lambda _: None)
        return self.lower(model)

    def require_calib(self, who: str) -> list[dict[str, np.ndarray]]:
        if not self.calib:
            raise OptionError(
                f"{who} needs calibration data: pass calib=[...] to Pipeline.run, or add a "
                "'calibration:' section to the recipe"
            )
        return self.calib


def register_pass(cls: type["Pass"]) -> type["Pass"]:
    """Class decorator: make a pass findable by its recipe key."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise TypeError(f"two passes named {cls.name!r}: {PASSES[cls.name].__name__} and {cls.__name__}")
    PASSES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Pass(Options):
    """Base class of every pass. Subclasses are frozen dataclasses whose fields are their options.

    A subclass sets `name` (its recipe key), implements `run_fx` and/or `run_onnx`, and may
    override `check()` to validate option values (raise OptionError naming the option).
    `mutates_input` declares whether the pass edits the model it receives in place; the pass
    manager copies the model first when it does and the caller still needs the input.
    Weight arrays are shared between copies (see `Model.copy`): replace them, never write into them.
    """

    name: ClassVar[str] = ""
    mutates_input: ClassVar[bool] = True

    def run_fx(self, model: Model, ctx: PassContext) -> PassResult:
        raise UnsupportedGraphError(f"pass '{self.name}' has no FX form")

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        raise UnsupportedGraphError(f"pass '{self.name}' has no ONNX form")

    @classmethod
    def forms(cls) -> tuple[Form, ...]:
        """The IR forms this pass implements, in order of preference."""
        found = []
        if cls.run_fx is not Pass.run_fx:
            found.append("fx")
        if cls.run_onnx is not Pass.run_onnx:
            found.append("onnx")
        return tuple(found)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if model.form not in self.forms():
            raise UnsupportedGraphError(
                f"pass '{self.name}' runs on {', '.join(self.forms()).upper()} only, got {model.form.upper()}"
            )
        if model.form == "fx":
            return self.run_fx(model, ctx)
        return self.run_onnx(model, ctx)
