"""Put chosen elites on vLLM engines and publish a serving manifest (not implemented yet)."""
