"""The method seam: a run = a parameter set (what trains) x an objective (what the loss is).

`--method full|lora` picks a `ParameterSet` (how the model is loaded, wrapped, saved);
`--objective sft|pretrain` picks an `Objective` (which samples it consumes, its loss, its
metrics, its default learning rate). Both come from the registries here and nowhere else
in the code branches on their names. A new method is one entry in `params.py`; a new
loss is one entry in `objectives.py`.

This package imports no torch at import time (the CLI reads the names for `--help`).
"""
from tunesmith.methods.objectives import OBJECTIVES, Objective
from tunesmith.methods.params import PARAMETER_SETS, ParameterSet
from tunesmith.methods.recipe import Recipe, recipe

__all__ = ["OBJECTIVES", "PARAMETER_SETS", "Objective", "ParameterSet", "Recipe", "recipe"]
