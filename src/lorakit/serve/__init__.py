"""`lorakit serve`: one base, many adapters, behind the OpenAI API.

engine.py owns the model and the batching (one thread, one forward per decode step for every
running request, whatever its adapter); registry.py owns which adapters are loaded and which
paths may be loaded; app.py only parses, validates, authenticates and streams."""
