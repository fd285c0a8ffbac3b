"""Rank discovery and launcher command lines (deepspeed, torchrun, mpirun, srun)."""
