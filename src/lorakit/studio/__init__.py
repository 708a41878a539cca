"""`lorakit studio`: a local web app over a folder of runs — the runs table, a run's live curves,
its eval answers one by one, several runs compared.

It is not a second implementation of lorakit: what it shows is read by the readers `lorakit runs`
and report.html use (`read`, `views`), drawn by the report's own section functions, and served
by FastAPI as `lorakit serve` is (`app`), behind one guard (`guard`: Host check, token off the
loopback, no cross-site writes). `run` starts it.
"""
