"""Accelerators: one table of chips, TPU slices compiled for ahead of time, the memory plan of a
study's train steps, and what a planned step costs."""
