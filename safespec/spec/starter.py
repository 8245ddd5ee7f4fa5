"""The starter spec that ``safespec init`` writes (the text is ``starter.yaml``, a data file of the
package, so that it reads as the YAML it is)."""

from __future__ import annotations

import string
from importlib import resources

from .models import SPEC_VERSION

# ------------------------------------------------------------------------------------------- starter
STARTER_DATA = ("data/protected.csv", "data/target.csv", "data/validation.csv", "data/heldout.csv")


def starter_spec(name: str = "my-cycle") -> str:
    """A commented starter spec (what ``safespec init`` writes); it validates once its data exists."""
    text = resources.files(__package__).joinpath("starter.yaml").read_text(encoding="utf-8")
    return string.Template(text).substitute(
        name=name,
        version=SPEC_VERSION,
        protected=STARTER_DATA[0],
        target=STARTER_DATA[1],
        validation=STARTER_DATA[2],
        heldout=STARTER_DATA[3],
    )
