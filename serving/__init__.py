"""The gRPC frontend: protocol, request validation, slice routing, auth, metrics.

Only the CLI (tools/serve.py, tools/generate.py --target, tools/bench_serving.py)
imports this package; it builds on engine/ and nothing below imports it.
"""
