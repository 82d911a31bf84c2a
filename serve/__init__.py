"""serve/: turn chosen elites of a CycleQD run into weights, run them on supervised vLLM engines, publish the manifest."""
