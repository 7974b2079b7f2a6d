"""File formats: MRC, RELION STAR, EMAN2 HDF and LST, and the particle-stack model."""
