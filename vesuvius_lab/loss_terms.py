"""The loss terms, each defined once: its name, default weight and own settings.

Everything else about a term is derived from its record here: the ``loss`` config keys
(``loss.<term>``, ``loss.<term>_start``, ``loss.<term>_ramp`` and its settings, with their ranges in
``config.RULES``), the ``<term>`` and ``weight_<term>`` fields of metrics.jsonl, the
``train/<term>`` TensorBoard tags and the live plot's lines. The term's value is computed by its
entry in ``losses.FUNCTIONS`` (which needs torch; this module does not, so reading a config stays light).
"""

from __future__ import annotations

from dataclasses import dataclass

from vesuvius_lab.rules import COUNT, POSITIVE, Rule


@dataclass(frozen=True)
class Setting:
    """A key of the ``loss`` section that tunes one term (``loss.<key>``)."""

    key: str
    default: int | float  # its type is the key's type
    rule: Rule
    doc: str


@dataclass(frozen=True)
class Term:
    """One weighted term of the objective; weight 0 turns it off at no cost."""

    name: str
    weight: float  # default weight
    doc: str
    settings: tuple[Setting, ...] = ()
    heads: bool = True  # may also be applied to the deep-supervision heads (loss.deep_supervision_terms)


REGISTRY: tuple[Term, ...] = (
    Term("bce", 1.0, "weighted BCE",
         (Setting("pos_weight", 2.0, POSITIVE, "label-1 voxels count this much more"),)),
    Term("dice", 1.0, "soft Dice"),
    Term("cldice", 0.5, "clDice: soft skeleton of the prediction against the medial surface",
         (Setting("cldice_iterations", 3, COUNT, "soft-skeleton iterations; sheets are 2-4 voxels thick"),)),
    Term("skeleton_recall", 0.5, "morphological skeleton: recall of the precomputed medial surface"),
    Term("surface", 0.1, "boundary loss against the precomputed signed distance map"),
    Term("topo", 0.0, "TopLoss (cubical persistence with cripser)",
         (Setting("topo_every", 10, COUNT, "steps between TopLoss evaluations"),
          Setting("topo_downsample", 4, COUNT, "probability map pooled by this factor before persistence")),
         heads=False),
)
