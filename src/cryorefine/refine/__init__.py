"""The refinement: one iteration on arrays for one chain or two gold-standard halves
(:mod:`.step`), e2refine's options (:mod:`.options`), the driver with its output folder,
resume and stopping rule (:mod:`.driver`), the files it writes (:mod:`.outputs`), the
report (:mod:`.report`) and the start-up checks with their estimates (:mod:`.estimate`)."""

from cryorefine.refine.step import Step, gold_standard_starts, half_sets, run_step

__all__ = ["Step", "gold_standard_starts", "half_sets", "run_step"]
