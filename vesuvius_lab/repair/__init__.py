"""Topology repair of a binary sheet mask: the holes and bridges the leaderboard's TopoScore and VOI punish.

A model's sheets carry holes (each one a tunnel, a Betti-1 feature the label does not have: with no
label tunnel to match, the Betti-1 F1 falls to its pseudocount) and touch their neighbours through
thin bridges (two label sheets counted as one component by Betti-0 and VOI). The steps are the ones
the competition's top teams wrote by hand, on the metric's own topology (foreground 6-connected in
the V-construction complex, background 26-connected; VOI's components 26-connected), one module
each, so a step can be read, tested and timed alone:

* ``pinholes.plug_pinholes``: holes one voxel wide, filled voxel by voxel in a raster sweep.
* ``sheet_holes.fill_sheet_holes``: wider holes, filled along each sheet's height map (or its own
  closing) where the exact Betti numbers say a tunnel goes.
* ``tunnels.close_tunnels``: the tunnels left, closed where the probability's persistence closes them.
* ``bridges.split_bridges``: sheets merged through thin bridges, cut along the seam between their cores.

``shared`` holds what they have in common (windows within the metric's octants, the checks a change
must pass, enclosed background); the Euler characteristic and Betti numbers are the metric's own
(``vesuvius_lab._betti``). Each step takes and returns a boolean mask; nothing changes where a step
finds nothing to do. ``vesuvius_lab.postprocess`` runs them by name (``REPAIR_STEPS``).
"""

from vesuvius_lab.repair.bridges import split_bridges
from vesuvius_lab.repair.pinholes import plug_pinholes
from vesuvius_lab.repair.shared import enclosed_background, tunnel_windows
from vesuvius_lab.repair.sheet_holes import fill_sheet_holes, piece_tunnels
from vesuvius_lab.repair.tunnels import close_tunnels

__all__ = ["close_tunnels", "enclosed_background", "fill_sheet_holes", "piece_tunnels", "plug_pinholes",
           "split_bridges", "tunnel_windows"]
