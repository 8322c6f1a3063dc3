"""Conversation -> TokenizedSample: render with the chat template, mask all but what is trained."""
from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass
class TokenizedSample:
    """Token ids and labels of one sample; labels are IGNORE_INDEX where nothing is trained.

    Labels are aligned with `input_ids` (not shifted): label[i] says whether token i is a
    training target. Shifting happens once, in packing.
    """

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    @property
    def num_trained(self) -> int:
        """How many tokens carry a loss."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)
