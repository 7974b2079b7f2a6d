"""Fourier-space helpers: frequency grids, filters and the CTF."""
