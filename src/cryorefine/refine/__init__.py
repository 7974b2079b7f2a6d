"""The refinement: one iteration on arrays (:mod:`.iteration`), e2refine's options
(:mod:`.options`), the driver with its output folder, resume and stopping rule
(:mod:`.driver`), the files it writes (:mod:`.outputs`), the report (:mod:`.report`)
and the start-up checks with their estimates (:mod:`.estimate`)."""

from cryorefine.refine.iteration import Iteration, gold_standard_starts, half_sets, iterate

__all__ = ["Iteration", "gold_standard_starts", "half_sets", "iterate"]
