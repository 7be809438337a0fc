"""Placement by interval (TIDE): the refresh schedule, the stores that act on it, the tau solver and
the cost model it uses, and calibrated static placement."""
