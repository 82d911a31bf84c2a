"""Offline side: the embedded skill world, model bootstrap and CycleQD over genomes (the run directory)."""
