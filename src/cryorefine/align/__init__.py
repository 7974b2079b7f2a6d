"""2D alignment: EMAN2's 2D transforms, comparators, aligners and the batched engine."""
