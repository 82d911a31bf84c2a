"""Test fakes that the tests and benchmarks share (a scripted OpenAI-compatible upstream, SSE helpers).

Not part of the installed package: the wheel ships evolve/, serve/, router/ and cycleqd/ only, so nothing a
user deploys carries code written to imitate a server.
"""
