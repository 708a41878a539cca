"""The bundled demo: support tickets of the fictional shop Northwind Outfitters.

`data/{train,val,test}.jsonl` are Alpaca rows (instruction / input / output) written by
`python scripts/make_demo_data.py OUT_DIR` (a build-time script of the repository, not part of
the package) from a fixed seed, and committed as data.  About half of the rows are tasks whose
answer can be checked exactly (ticket routing, order-number extraction, one-line policy facts);
the other half are short free-form support replies in the guide's style.  `test.jsonl` holds
only exactly-checkable rows, each marked `"check": "exact"`, so `lorakit eval` can show the
tuned model beating the base with exact match.
"""
