"""Orientation conventions (EMAN and RELION Euler angles, EMAN2 transforms)."""
