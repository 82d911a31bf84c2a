"""OpenAI-compatible gateway that routes each agent task to the best elite (not implemented yet)."""
