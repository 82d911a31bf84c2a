"""serve/: chosen elites of a CycleQD run as weights, on supervised vLLM engines, with the serving manifest."""
