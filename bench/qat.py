"""A QAT row's build: fake-quantize the float model, distil it, fold the learned scales.

The spec (a row's `qat:` build step):

```yaml
qat:
  prepare: [rotate]              # FX passes before the quantizers (the recipe's own, e.g. rotate)
  fake_quantize: {...}           # the fake_quantize pass's options
  train: {...}                   # graphopt.training.distillation.TrainConfig fields
```

The teacher is the prepared float model, the student its copy with quantizers; the training
windows come from the protocol's `training` section (its last `validation_windows` held out for
`train`'s validation). The trained student is lowered, its scales exported as encodings and folded
into static QDQ by `fold_encodings`: the row measures the deployable model, and `Built.variants`
keeps the student itself ("torch") for the table's `torch_columns`.
"""

from __future__ import annotations

import time

import yaml

import graphopt
from bench.build import Built
from bench.context import Context
from bench.spec import BENCH, SuiteError
from graphopt.errors import GraphoptError
from graphopt.pipeline import get_pass
from graphopt.pipeline.passes import PassContext
from graphopt.recipe import parse_recipe
from graphopt.training import distillation, fake_quant

__all__ = ["qat_build"]


def qat_build(ctx: Context, model_key: str, spec: dict, where: str) -> Built:
    unknown = set(spec) - {"prepare", "fake_quantize", "train"}
    if unknown:
        raise SuiteError(f"{where}: qat: unknown key '{sorted(unknown)[0]}' (keys: prepare, fake_quantize, train)")
    try:
        config = distillation.TrainConfig(**{**spec.get("train", {}), "device": ctx.device, "progress": False})
        passes = parse_recipe(yaml.safe_dump({"passes": list(spec.get("prepare", []))
                                              + [{"fake_quantize": spec.get("fake_quantize", {})}]}),
                              BENCH / "suites.yaml").passes
    except (GraphoptError, TypeError) as exc:
        raise SuiteError(f"{where}: qat: {exc}") from exc
    start = time.perf_counter()
    teacher = ctx.model(model_key, "fx").copy()
    context = PassContext(calib=ctx.calibration(teacher), progress=False)
    for prepare in passes[:-1]:
        teacher = prepare.run(teacher, context).model
    inserted = passes[-1].run(teacher.copy(), context)
    student, share = inserted.model, inserted.stats.get("int16_share")
    train = ctx.protocol["training"]
    windows = ctx.windows(teacher, train["corpus"], "calibration", train["windows"], train["length"])
    held = train.get("validation_windows", 0)
    report = distillation.train(student, teacher, windows[:len(windows) - held], config,
                                validation=windows[len(windows) - held:] or None, log=ctx.log)
    lowered = graphopt.lower(fake_quant.strip_fake_quant(student), log=ctx.log)
    lowered.meta.encodings = fake_quant.export_encodings(student, lowered).to_meta()
    folded = get_pass("fold_encodings")().run(lowered, PassContext(progress=False)).model
    extra = {"train_s": report.seconds, "s_per_step": report.seconds_per_step, "train_steps": report.steps,
             "loss_first": report.losses[0], "loss_last10": sum(report.losses[-10:]) / len(report.losses[-10:]),
             "best_step": report.best_step}
    return Built(folded, time.perf_counter() - start, {"fake_quantize": {"int16_share": share}}, extra,
                 {"torch": student})
