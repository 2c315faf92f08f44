"""The benchmark suite of trio_securechannel: ``python -m benchmarks`` (``--help`` for options).

Each measurement runs against its baseline in the same run, with a loopback TLS server in a
separate process; see ``docs/benchmarks.md`` for the measurements, targets and one full run.
"""
