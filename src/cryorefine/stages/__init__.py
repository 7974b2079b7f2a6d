"""The stages e2refine chains, as array functions with thin file wrappers."""
