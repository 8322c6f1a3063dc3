"""A recipe: one parameter set x one objective, checked to make sense together."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from tunesmith.errors import UserError
from tunesmith.methods.objectives import OBJECTIVES, Objective
from tunesmith.methods.params import PARAMETER_SETS, ParameterSet


@dataclass(frozen=True)
class Recipe:
    """What a run trains (`params`) and how it scores it (`objective`)."""

    params: ParameterSet
    objective: Objective

    def default_lr(self) -> float:
        """The objective's default learning rate for this parameter set."""
        return self.objective.default_lr(self.params.adapter)

    def check_data(self, kinds: set[str], source: str) -> None:
        """Refuse data the objective cannot train on, naming the objectives that can."""
        wrong = sorted(kinds - set(self.objective.data_kinds))
        if not wrong:
            return
        fits = [o.name for o in OBJECTIVES.values() if set(wrong) <= set(o.data_kinds)]
        hint = (f"use --objective {' or '.join(fits)}" if fits else
                f"--objective {self.objective.name} trains on {', '.join(self.objective.data_kinds)} data")
        raise UserError(f"{source}: {', '.join(wrong)} data cannot train with --objective {self.objective.name}",
                        [f"fix: {hint}"])

    def check_installed(self) -> None:
        """Refuse before loading anything when a library the parameter set needs is missing."""
        for module, extra in self.params.requires:
            if importlib.util.find_spec(module) is None:
                raise UserError(f"--method {self.params.name} needs {module}, which is not installed",
                                [f'fix: pip install "tunesmith[{extra}]"'])


REFERENCE_MODES = ("cached", "live")  # how full fine-tuning gets a reference model's log-probs (train.reference)


def recipe(method: str, objective: str, *, merge: bool = False, reference: str = "cached") -> Recipe:
    """The registry entries for `--method` x `--objective`; impossible combinations refused here."""
    if method not in PARAMETER_SETS:
        raise UserError(f"invalid value for method: {method!r} (allowed: {' | '.join(PARAMETER_SETS)})")
    if objective not in OBJECTIVES:
        raise UserError(f"invalid value for objective: {objective!r} (allowed: {' | '.join(OBJECTIVES)})")
    if reference not in REFERENCE_MODES:
        raise UserError(f"invalid value for reference: {reference!r} (allowed: {' | '.join(REFERENCE_MODES)})")
    chosen = Recipe(PARAMETER_SETS[method], OBJECTIVES[objective])
    if reference == "live" and not chosen.objective.uses_reference:
        raise UserError(f"--reference live: --objective {objective} has no reference model",
                        ["fix: drop --reference (it applies to --objective dpo)"])
    if reference == "live" and chosen.params.adapter:
        raise UserError(f"--reference live: with --method {method} the reference is already live: the same "
                        "weights with the adapter switched off (no copy)",
                        ["fix: drop --reference, or use --method full"])
    if merge and not chosen.params.adapter:
        raise UserError(f"--merge: --method {method} trains every weight, so there is no adapter to merge",
                        ["fix: drop --merge (the output already holds full weights), or use --method lora"])
    return chosen
