"""Offline side: the embedded skill world, model bootstrap, and (next) CycleQD over genomes."""
