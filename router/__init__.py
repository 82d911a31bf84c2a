"""router/: the OpenAI-compatible gateway that sends each agent task to the best served elite."""
